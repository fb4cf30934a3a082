"""What tensor parallelism would do to a DiT, for the planner: which parameter dims it splits, the widths its
all-reduces and all-gathers carry per block, its sharded norms, the feature counts a degree must divide.

Read from the layout the package itself would apply (``tensor.resolve_layout``), so the planner follows the plan's
``tensor_parallel``, diffusers' ``_tp_plan`` or the default layout exactly as the strategy does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.planner.shapes import AttentionSpec, BlockShape


def inside_norm(root: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` sits inside a normalization module (adaptive norms hold the per-sample
    modulation projections, e.g. ``norm1.linear`` of AdaLayerNormZero, which do not run per token)."""
    parts = path.split(".")
    module = root
    for part in parts[:-1]:
        module = getattr(module, part)
        if "Norm" in type(module).__name__:
            return True
    return False


def is_text_stream(path: str) -> bool:
    """Whether a layer belongs to the text (context) stream of a double-stream block, by diffusers' names
    (``ff_context``, ``add_q_proj``, ``to_add_out``, ``norm1_context`` ...)."""
    return any("context" in part or part.startswith("add_") or "_add_" in part for part in path.split("."))


@dataclass(frozen=True)
class TensorParallelShape:
    dims: dict[int, int | None]  # id(parameter) -> split dim
    reduce: dict[int, tuple[int, int]]  # block index -> row-wise output features (latent stream, text stream)
    gather: dict[int, int]  # block index -> gathered column-wise output features (per sample)
    sample_reduce: dict[int, int]  # block index -> row-wise output features of per-sample layers
    norms: tuple[tuple[int, str, int], ...]  # (block index, norm path, statistics) of sharded norms
    sizes: tuple[int, ...]
    reason: str
    root_gathers: tuple[tuple[str, int], ...] = ()  # (role, output features) of the root's split Linears


#: Path parts of a root Linear that reads the latent tokens (patch embeddings) when no other rule applies.
_LATENT_INPUTS = ("x_embedder", "img_in", "proj_in", "patch")


def root_gather_role(model: nn.Module, path: str, output_width: int) -> str:
    """What a root Linear split by tensor parallelism runs on, so what its all-gather carries per call: ``"latent"``
    (the output projection to ``output_width`` features, patch embeddings: per latent token), ``"text"`` (text and
    context embedders: per text token) or ``"sample"`` (timestep embedders, pooled text, adaLN: once per sample).
    Read from diffusers' names; an estimate for the traffic table."""
    module = model.get_submodule(path)
    parts = path.split(".")
    if isinstance(module, nn.Linear) and output_width and module.out_features == output_width:
        return "latent"
    if inside_norm(model, path) or any(part.startswith("time") for part in parts):
        return "sample"
    if any(word in part for part in parts for word in ("context", "caption", "text", "txt")):
        return "text"
    if any(word in part for part in parts for word in _LATENT_INPUTS):
        return "latent"
    return "sample"


def tensor_parallel_shape(model: nn.Module, plan: DiTPlan, output_width: int = 0) -> TensorParallelShape:
    """What the package's tensor parallelism (``tensor.resolve_layout``) would split: per parameter the dim, per
    block the widths its all-reduces and all-gathers carry; or why it cannot."""
    from lightning_dit_parallel.parallel.tensor.resolve import block_of, resolve_layout
    from lightning_dit_parallel.parallel.tensor.styles import packed_sizes, split_dim
    from lightning_dit_parallel.plan import Packed

    try:
        layout = resolve_layout(model, plan)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # no tensor-parallel layout for this model
        return TensorParallelShape({}, {}, {}, {}, (), (), f"{type(exc).__name__}: {exc}")
    modules = dict(model.named_modules())
    index = {path: i for i, path in enumerate(layout.blocks)}
    dims: dict[int, int | None] = {}
    reduce: dict[int, tuple[int, int]] = {}
    gather: dict[int, int] = {}
    sample_reduce: dict[int, int] = {}
    norms: list[tuple[int, str, int]] = []
    sizes: set[int] = set()
    for path, spec in layout.styles.items():
        module = modules[path]
        style = spec.style if isinstance(spec, Packed) else spec
        block = index.get(block_of(path, layout.blocks) or "", -1)
        if style == "sharded_norm":
            for p in module.parameters(recurse=False):
                dims[id(p)] = 0
                sizes.add(p.shape[0])
            norms.append((block, path, 2 if isinstance(module, nn.LayerNorm) else 1))  # layer norms: mean and variance
            continue
        dim = split_dim(spec)
        if isinstance(module, nn.Embedding):  # torch's styles shard an embedding's table the other way round
            dim = 1 - dim
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor):
            dims[id(weight)] = dim
            if not isinstance(spec, Packed):
                sizes.add(weight.shape[dim])
        if isinstance(bias, torch.Tensor):
            dims[id(bias)] = 0 if style != "rowwise" else None  # a row-wise layer adds its bias after the reduce
        if isinstance(spec, Packed):
            sizes.update(packed_sizes(spec, module, path))
        per_sample = inside_norm(model, path)  # the conditioning embedders and adaLN modulation of a block
        if isinstance(module, nn.Embedding):
            if style == "colwise_gather":
                gather[block] = gather.get(block, 0) + module.embedding_dim
            continue
        if not isinstance(module, nn.Linear):
            continue
        if style == "rowwise" and per_sample:
            sample_reduce[block] = sample_reduce.get(block, 0) + module.out_features
        elif style == "rowwise":
            latent, text = reduce.get(block, (0, 0))
            text_stream = is_text_stream(path)
            reduce[block] = (
                latent + (0 if text_stream else module.out_features),
                text + (module.out_features if text_stream else 0),
            )
        elif style == "colwise_gather":
            gather[block] = gather.get(block, 0) + module.out_features
    root_gathers = []
    for path in layout.root:  # the root's Linears: out/N rows where the degree divides them (not a constraint)
        for p in modules[path].parameters(recurse=False):
            dims[id(p)] = 0
        root_gathers.append((root_gather_role(model, path, output_width), modules[path].out_features))
    return TensorParallelShape(
        dims, reduce, gather, sample_reduce, tuple(norms), tuple(sorted(sizes)), "", tuple(root_gathers)
    )


def with_norm_roles(
    blocks: tuple[BlockShape, ...], norms: tuple[tuple[int, str, int], ...], attention: tuple[AttentionSpec, ...]
) -> tuple[BlockShape, ...]:
    """Which tokens each sharded norm normalises: the text for the context stream's (``norm_added_*``) and a
    cross-attention's keys, the latent tokens for a cross-attention's or a double-stream block's queries and keys,
    else everything the block carries."""
    by_path = {a.path: a for a in attention}
    roles: dict[int, list[tuple[int, str]]] = {}
    for block, path, stats in norms:
        owner, _, name = path.rpartition(".")
        attn = by_path.get(owner)
        if is_text_stream(name) or (attn is not None and attn.kind == "cross" and "k" in name.removeprefix("norm_")):
            role = "text"
        elif (attn is not None and attn.kind == "cross") or (
            0 <= block < len(blocks) and blocks[block].text_token_params
        ):
            role = "latent"
        else:
            role = "carried"
        roles.setdefault(block, []).append((stats, role))
    return tuple(replace(b, tp_norms=tuple(roles.get(i, ()))) for i, b in enumerate(blocks))
