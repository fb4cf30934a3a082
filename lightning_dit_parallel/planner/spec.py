"""What the planner needs to know about a DiT, read from the module (real or on the meta device) and its plan.

Nothing here runs the model: parameter shapes come from ``named_parameters``, the attention modules and their
widths from the plan's patterns, the block lists and shared modules from the plan. So a model built from its
config on the meta device (no memory, no weights) gives the same figures as the loaded one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_dit_parallel.parallel.fsdp.row_stream import streams_rows
from lightning_dit_parallel.parallel.sequence.head_parallel import head_parallel_modules
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.planner.shapes import AttentionKind, AttentionSpec, BlockShape
from lightning_dit_parallel.planner.tp_shape import inside_norm, is_text_stream, tensor_parallel_shape, with_norm_roles

#: Name of the sequence that carries the text tokens in every shipped plan.
TEXT_SEQUENCE = "text"


@dataclass(frozen=True)
class Unit:
    """A group of parameters that is sharded, gathered and released together.

    Args:
        kind: ``"block"`` (one transformer block, an FSDP unit and a pipeline stage's share), ``"shared"`` (a
            plan's ``shared_modules`` entry: part of a block that the DiT also calls outside its loop) or
            ``"root"`` (every parameter outside the blocks: embeddings, final layer).
        index: the global block index (blocks of all block lists in order) for blocks and shared parts; -1 for
            the root.
        shapes: the shape of every parameter of the unit, each storage once.
        tp_dims: per parameter, the dim tensor parallelism splits (``None``: kept whole); empty: none split.
        whole: per parameter, whether ``fsdp_units="rows"`` still gathers it whole (it is not a plain ``nn.Linear``'s:
            an embedding table, a convolution kernel, a norm); empty: unknown, every parameter of 3 dims or more.
        split: per parameter, whether it is an encoder's token table, which a sharded encoder splits by rows and never
            gathers (``fsdp/vocab_rows.py``); empty: none.
    """

    kind: Literal["block", "shared", "root"]
    index: int
    shapes: tuple[tuple[int, ...], ...]
    tp_dims: tuple[int | None, ...] = ()
    whole: tuple[bool, ...] = ()
    split: tuple[bool, ...] = ()

    def split_tables(self) -> list[bool]:
        """Per parameter, whether it is a token table split by rows (``split``)."""
        return list(self.split) if self.split else [False] * len(self.shapes)

    def gathered_whole(self) -> list[bool]:
        """Per parameter, whether rows streaming gathers it whole (``whole``, or by its number of dims)."""
        return list(self.whole) if self.whole else [len(s) >= 3 for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def local_shapes(self, tp: int = 1) -> list[tuple[int, ...]]:
        """Each parameter's shape on one tensor-parallel rank (split dims cut into ``tp`` parts)."""
        if tp == 1 or not self.tp_dims:
            return list(self.shapes)
        out = []
        for shape, dim in zip(self.shapes, self.tp_dims):
            if dim is not None and dim < len(shape):
                shape = (*shape[:dim], -(-shape[dim] // tp), *shape[dim + 1 :])
            out.append(shape)
        return out

    def shard_numel_split(self, ranks: int, tp: int = 1) -> tuple[int, int]:
        """``shard_numel`` in two: ``(streamed, whole)``, the elements of the parameters ``fsdp_units="rows"``
        broadcasts by rows (plain Linears') and of those it still all-gathers (``gathered_whole``)."""
        split = [0, 0]
        for shape, whole in zip(self.local_shapes(tp), self.gathered_whole()):
            split[whole] += _shard_numel(shape, ranks)
        return split[0], split[1]

    def local_numel(self, tp: int = 1) -> int:
        return sum(_numel(s) for s in self.local_shapes(tp))

    def shard_numel(self, ranks: int, tp: int = 1) -> int:
        """Elements one rank keeps when every (tensor-parallel local) parameter is cut along dim 0 over ``ranks``
        (FSDP2: each rank holds ``ceil(rows / ranks)`` rows, the last ones padded)."""
        return sum(_shard_numel(s, ranks) for s in self.local_shapes(tp))


@dataclass(frozen=True)
class ModelSpec:
    """A planned DiT as the planner sees it.

    Args:
        name: class name.
        units: the root, the shared parts and the blocks (see ``Unit``).
        block_lists: ``(path, number of blocks)`` of the plan's block lists, in order.
        blocks: per-block widths, in global block order.
        attention: every planned attention module.
        sequences: the sequences the plan cuts, in first-seen order.
        output_width: features per token of the gathered output (the last projection before unpatchify).
        root_token_params: parameters of per-token linear layers outside the blocks (patch embedding, output).
        forward_arguments: number of arguments of the DiT's forward (the input guard fingerprints each).
        pipeline_unsupported: why the blocks cannot be cut into stages ("" when they can).
        pipefusion_unsupported: why PipeFusion cannot run this plan ("" when it can).
        pipeline_with_sequence_unsupported: per pp degree, why pipeline stages do not combine with sequence
            parallelism for this plan ("" when they do).
        config: the model's config (a diffusers ``config`` dict), when it has one.
        dtype: the dtype of its parameters (``"float32"`` for a model built from its config).
        tp_unsupported: why tensor parallelism cannot shard this model ("" when it can).
        tp_sizes: every feature count tensor parallelism splits (a degree must divide them all).
        tp_root_gathers: ``(role, output features)`` of the root's Linears that tensor parallelism splits and gathers
            (``tp_shape.root_gather_role``: per latent token, per text token or per sample).
        ring_unsupported: why ring attention (and DistriFusion) cannot run this plan ("" when it can): attention
            that needs the whole sequence on a rank (``DiTPlan.head_parallel_attention``), Ulysses only.
    """

    name: str
    units: tuple[Unit, ...]
    block_lists: tuple[tuple[str, int], ...]
    blocks: tuple[BlockShape, ...]
    attention: tuple[AttentionSpec, ...]
    sequences: tuple[str, ...]
    output_width: int
    root_token_params: int
    forward_arguments: int
    pipeline_unsupported: str
    pipefusion_unsupported: str
    pipeline_with_sequence_unsupported: tuple[tuple[int, str], ...]
    config: dict
    dtype: str = "float32"
    tp_unsupported: str = ""
    tp_sizes: tuple[int, ...] = ()
    tp_root_gathers: tuple[tuple[str, int], ...] = ()
    ring_unsupported: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def self_attention(self) -> tuple[AttentionSpec, ...]:
        return tuple(a for a in self.attention if a.kind in ("self", "tail"))

    @property
    def min_heads(self) -> int:
        """Query heads of the sharded attention with the fewest (every one must split over Ulysses x TP)."""
        heads = [a.heads for a in self.attention if a.kind in ("self", "tail")]
        return min(heads) if heads else 1

    def head_counts(self) -> tuple[int, ...]:
        """Distinct query-head counts of the sharded attention modules."""
        return tuple(sorted({a.heads for a in self.attention if a.kind in ("self", "tail")}))

    @property
    def latent_sequences(self) -> tuple[str, ...]:
        """The cut sequences other than text (image, video ...)."""
        return tuple(s for s in self.sequences if s != TEXT_SEQUENCE)

    def pipeline_with_sequence_reason(self, pp: int) -> str:
        return dict(self.pipeline_with_sequence_unsupported).get(pp, "")


def model_spec(model: nn.Module, plan: DiTPlan, max_stages: int = 64) -> ModelSpec:
    """Read a ``ModelSpec`` from a DiT and its plan (the module may live on the meta device).

    Args:
        model: the DiT.
        plan: its plan.
        max_stages: pipeline degrees up to this are checked against sequence parallelism.

    Raises:
        ValueError: when a planned attention module has no readable head count or width.
    """
    lists = plan.block_lists(model) if plan.blocks else []
    block_modules = [block for _, blocks in lists for block in blocks.children()]
    output_width = _output_width(model, plan)
    tp = tensor_parallel_shape(model, plan, output_width)
    units = _units(model, plan, block_modules, tp.dims)
    attention = _attention_specs(model, plan, block_modules)
    blocks = tuple(
        _block_shape(
            block,
            [a for a in attention if a.block == i],
            tp.reduce.get(i, (0, 0)),
            tp.gather.get(i, 0),
            tp.sample_reduce.get(i, 0),
        )
        for i, block in enumerate(block_modules)
    )
    blocks = with_norm_roles(blocks, tp.norms, attention)
    in_blocks = {id(m) for b in block_modules for m in b.modules()}
    root_token_params = sum(
        _linear_numel(m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in in_blocks and not inside_norm(model, path)
    )
    return ModelSpec(
        name=type(model).__name__,
        units=units,
        block_lists=tuple((path, len(blocks)) for path, blocks in lists),
        blocks=blocks,
        attention=attention,
        sequences=plan.sequences,
        output_width=output_width,
        root_token_params=root_token_params,
        forward_arguments=len(inspect.signature(type(model).forward).parameters) - 1,  # without self
        pipeline_unsupported=plan.pipeline_unsupported or ("" if block_modules else "its plan names no block lists."),
        pipefusion_unsupported=_pipefusion_reason(model, plan),
        pipeline_with_sequence_unsupported=_pipeline_with_sequence(model, plan, min(max_stages, len(block_modules))),
        config=dict(getattr(model, "config", {}) or {}),
        dtype=str(next((p.dtype for p in model.parameters()), "float32")).removeprefix("torch."),
        tp_unsupported=tp.reason,
        tp_sizes=tp.sizes,
        tp_root_gathers=tp.root_gathers,
        ring_unsupported=(
            f"the attention of {list(plan.head_parallel_attention)} needs the whole sequence on a rank (Ulysses only)"
            if plan.head_parallel_attention
            else ""
        ),
    )


def _units(
    model: nn.Module, plan: DiTPlan, block_modules: list[nn.Module], tp_dims: dict[int, int | None]
) -> tuple[Unit, ...]:
    seen: set[int] = set()
    shared_ids: dict[int, int] = {}
    for path in plan.shared_modules:
        module = model.get_submodule(path)
        index = next((i for i, b in enumerate(block_modules) if any(m is module for m in b.modules())), -1)
        for p in module.parameters():
            shared_ids.setdefault(id(p), index)
    streamed = linear_parameters(model)
    units: list[Unit] = []
    shared: dict[int, list[nn.Parameter]] = {}
    for index, block in enumerate(block_modules):
        params = []
        for p in block.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in shared_ids:
                shared.setdefault(shared_ids[id(p)], []).append(p)
            else:
                params.append(p)
        units.append(unit_of("block", index, params, streamed, tp_dims))
    units = [unit_of("shared", i, params, streamed, tp_dims) for i, params in sorted(shared.items())] + units
    rest = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    return (unit_of("root", -1, rest, streamed, tp_dims), *units)


def linear_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters of ``model``'s plain ``nn.Linear`` layers (what ``fsdp_units="rows"`` streams)."""
    return {id(p) for m in model.modules() if streams_rows(m) for p in m.parameters(recurse=False)}


def unit_of(
    kind: str,
    index: int,
    params: list[nn.Parameter],
    streamed: set[int],
    tp_dims: dict[int, int | None] | None = None,
    split: set[int] = frozenset(),
) -> Unit:
    """The ``Unit`` of ``params``: their shapes, the dims tensor parallelism splits (``tp_dims``), which of them
    rows streaming still gathers whole (those not in ``streamed``, see ``linear_parameters``) and which are token
    tables split by rows (``split``: ids)."""
    dims = tuple((tp_dims or {}).get(id(p)) for p in params)
    return Unit(
        kind,
        index,
        tuple(tuple(p.shape) for p in params),
        dims if any(d is not None for d in dims) else (),
        tuple(id(p) not in streamed for p in params),
        tuple(id(p) in split for p in params) if split else (),
    )


def _attention_specs(model: nn.Module, plan: DiTPlan, block_modules: list[nn.Module]) -> tuple[AttentionSpec, ...]:
    owner = {id(m): i for i, b in enumerate(block_modules) for m in b.modules()}
    found: list[AttentionSpec] = []
    kinds: list[tuple[AttentionKind, Iterable]] = [
        ("self", plan.self_attention_modules(model)),
        # Ulysses at the projections: the traffic and heads of Ulysses attention over the cut sequence
        ("self", ((path, module, (heads.sequence,)) for path, module, heads in head_parallel_modules(plan, model))),
        ("tail", plan.replicated_tail_modules(model)),
        ("linear", plan.linear_attention_modules(model)),
        ("cross", ((path, module, ()) for path, module in plan.cross_attention_modules(model))),
    ]
    claimed: set[str] = set()
    for kind, matches in kinds:
        for path, module, order in matches:
            if path in claimed:
                continue
            claimed.add(path)
            heads, q_width, kv_width = attention_widths(module, path)
            found.append(AttentionSpec(path, kind, tuple(order), heads, q_width, kv_width, owner.get(id(module), -1)))
    return tuple(found)


def attention_widths(module: nn.Module, path: str) -> tuple[int, int, int]:
    """``(heads, query width, key/value width)`` of an attention module.

    Reads ``heads`` (or ``num_heads``) and the output features of ``to_q``/``to_k`` (or ``inner_dim``), the
    names diffusers' attention classes use.

    Raises:
        ValueError: when the module has no head count or width under those names.
    """
    heads = getattr(module, "heads", getattr(module, "num_heads", None))
    q = getattr(module, "to_q", None)
    k = getattr(module, "to_k", None)
    inner = getattr(module, "inner_dim", None)
    q_width = q.out_features if isinstance(q, nn.Linear) else inner
    kv_width = k.out_features if isinstance(k, nn.Linear) else getattr(module, "inner_kv_dim", q_width)
    if not isinstance(heads, int) or not isinstance(q_width, int):
        raise ValueError(
            f"Attention module {path!r} ({type(module).__name__}) has no readable head count (heads/num_heads) or query"
            " width (to_q/inner_dim); the planner cannot size its communication."
        )
    return heads, int(q_width), int(kv_width if isinstance(kv_width, int) else q_width)


def _block_shape(
    block: nn.Module, attention: list[AttentionSpec], tp_reduce: tuple[int, int], tp_gather: int, tp_sample_reduce: int
) -> BlockShape:
    self_attn = [a for a in attention if a.kind in ("self", "tail", "linear")]
    hidden = max((a.q_width for a in self_attn or attention), default=0)
    linears = [
        (path, m) for path, m in block.named_modules() if isinstance(m, nn.Linear) and not inside_norm(block, path)
    ]
    text_params = sum(_linear_numel(m) for path, m in linears if is_text_stream(path))
    linears = [m for _, m in linears]
    if not hidden:
        hidden = max((m.in_features for m in linears), default=0)
    mlp = max((m.out_features for m in linears), default=hidden)
    sequences = self_attn[0].sequences if self_attn else ()
    parallel = any(m.in_features == hidden + mlp for m in linears) and mlp > hidden
    return BlockShape(
        hidden,
        max(mlp, hidden),
        sum(_linear_numel(m) for m in linears),
        sequences,
        text_params,
        tp_reduce[0],
        tp_reduce[1],
        tp_gather,
        tp_sample_reduce,
        parallel,
    )


def _linear_numel(m: nn.Linear) -> int:
    return m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)


def _output_width(model: nn.Module, plan: DiTPlan) -> int:
    """Features per token of the first gathered module's output (a Linear's ``out_features``)."""
    from lightning_dit_parallel.plan import module_paths

    modules = dict(model.named_modules())
    for key in plan.gather_outputs:
        for path in module_paths(modules, key):
            module = modules[path]
            if isinstance(module, nn.Linear):
                return module.out_features
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1].out_features
    return 0


def _pipefusion_reason(model: nn.Module, plan: DiTPlan) -> str:
    from lightning_dit_parallel.parallel.pipeline.pipefusion import check_pipefusion_plan

    if plan.pipeline_unsupported:
        return plan.pipeline_unsupported
    try:
        check_pipefusion_plan(plan, model)
    except ValueError as exc:
        return str(exc)
    return ""


def _pipeline_with_sequence(model: nn.Module, plan: DiTPlan, max_stages: int) -> tuple[tuple[int, str], ...]:
    """Why ``pp`` stages do not combine with sequence parallelism, for every pp degree up to ``max_stages``."""
    from lightning_dit_parallel.parallel.compose import _check_pipeline_with_sequence
    from lightning_dit_parallel.parallel.layout import ParallelLayout
    from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions

    if plan.pipeline_unsupported or not plan.blocks:
        return ()
    reasons = []
    for pp in range(2, max_stages + 1):
        try:
            layout = ParallelLayout(pp=pp, ulysses=2).resolve(2 * pp)
            _check_pipeline_with_sequence([("", model, plan)], layout, PipelineOptions())
        except ValueError as exc:
            reasons.append((pp, str(exc)))
    return tuple(reasons)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shard_numel(shape: tuple[int, ...], ranks: int) -> int:
    if not shape:
        return 1  # a 0-dim parameter: counted whole
    rows = -(-shape[0] // ranks)
    return rows * _numel(shape[1:])
