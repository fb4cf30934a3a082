"""Which modules of a DiT tensor parallelism shards, and how: the layout, from the plan, diffusers' ``_tp_plan`` or
the default (``default.py``), completed with the attention modules whose heads it splits, and checked.

Resolution and checks are pure computation on the model's structure: every rank reaches the same verdict (and the
same ``ValueError``) before any collective.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.tensor.default import default_block_layout, per_sample_layout
from lightning_dit_parallel.parallel.tensor.features import resolve_outputs
from lightning_dit_parallel.parallel.tensor.heads import check_heads, head_count
from lightning_dit_parallel.parallel.tensor.lora import expand_lora, is_linear
from lightning_dit_parallel.parallel.tensor.norms import norm_features, norm_kind
from lightning_dit_parallel.parallel.tensor.styles import Spec, packed_sizes
from lightning_dit_parallel.plan import DiTPlan, HeadFeaturesSpec, Packed
from lightning_dit_parallel.utils.layers import holder_counts

#: q/k normalisations of an attention module that may normalise over all heads at once (diffusers' names; HiDream's
#: attention calls them ``q_rms_norm`` / ``k_rms_norm``, and ``*_t`` for its text stream).
QK_NORMS = (
    "norm_q",
    "norm_k",
    "norm_added_q",
    "norm_added_k",
    "q_rms_norm",
    "k_rms_norm",
    "q_rms_norm_t",
    "k_rms_norm_t",
)


@dataclass(frozen=True)
class TensorParallelLayout:
    """The modules of one DiT that tensor parallelism changes.

    Attributes:
        styles: module path (relative to the DiT, inside a block) -> style, for every module it shards.
        attention: paths of the attention modules whose heads are split (their head counts become local).
        blocks: paths of the blocks, in order (``parallelize_module`` runs once per block).
        source: where the layout came from, for messages.
        outputs: module path -> ``HeadFeatures`` spec, for the modules whose output is cut to this rank's heads
            (``DiTPlan.tensor_parallel_outputs``, see ``features.py``).
        root: module path -> ``"colwise_gather"`` for the Linears outside the blocks (``root_linears``): the ones whose
            output features the tp degree divides are split, their outputs all-gathered.
    """

    styles: Mapping[str, Spec]
    attention: tuple[str, ...]
    blocks: tuple[str, ...]
    source: str
    outputs: Mapping[str, HeadFeaturesSpec] = field(default_factory=dict)
    root: Mapping[str, Spec] = field(default_factory=dict)


def block_paths(model: nn.Module, plan: DiTPlan) -> list[str]:
    """Paths of every block of the plan's block lists (read with ``named_children``: a pipeline stage changes what
    iterating a list yields)."""
    return [f"{path}.{name}" for path, blocks in plan.block_lists(model) for name, _ in blocks.named_children()]


def block_of(path: str, blocks: list[str] | tuple[str, ...]) -> str | None:
    """The block containing the module at ``path`` (not the block itself), or ``None``."""
    return next((b for b in blocks if path.startswith(b + ".")), None)


def resolve_layout(model: nn.Module, plan: DiTPlan) -> TensorParallelLayout:
    """The tensor-parallel layout of ``model``: the plan's ``tensor_parallel`` as declared, else its class's diffusers
    ``_tp_plan`` completed with the per-sample modules (adaLN modulation, embedders) it leaves whole, else the
    default derived per block (``default.py``); plus the attention modules whose heads get split and
    ``"sharded_norm"`` for their q/k norms over all heads.

    Raises:
        ValueError: for a model with a module the plan's ``tensor_parallel_unsupported`` names (with its reason), a
            plan without blocks, a pattern that matches nothing or a module outside the blocks, two styles for one
            module, a style on a module of the wrong kind, or a q/k norm that cannot be sharded.
    """
    name = type(model).__name__
    check_supported(model, plan)
    blocks = block_paths(model, plan)
    if not blocks:
        raise ValueError(
            f"{name}: tensor parallelism shards the plan's blocks, but the plan names none (DiTPlan.blocks)."
        )
    modules = dict(model.named_modules())
    tp_plan = getattr(type(model), "_tp_plan", None)
    if plan.tensor_parallel:
        source = f"the plan's tensor_parallel for {name}"
        styles = _expand(plan.tensor_parallel, modules, blocks, source)
    elif isinstance(tp_plan, Mapping) and tp_plan:
        source = f"{name}._tp_plan (diffusers) with the per-sample modules it leaves whole"
        styles = _expand(translate_tp_plan(tp_plan, source), modules, blocks, source)
        for block in blocks:
            extra = per_sample_layout(modules[block], block)
            styles.update({path: spec for path, spec in extra.items() if path not in styles})
    else:
        source = f"the default layout of {name}'s diffusers modules"
        styles = {}
        for block in blocks:
            styles.update(default_block_layout(modules[block], block))
    if not styles:
        raise ValueError(f"{name}: {source} shards no module; declare DiTPlan.tensor_parallel.")
    attention = _split_attention(modules, styles)
    _add_sharded_norms(modules, styles, attention)
    _check_kinds(modules, styles, source)
    styles = expand_lora(modules, styles)  # LoRA layers: their base layer and adapter factors (lora.py)
    outputs = resolve_outputs(modules, plan.tensor_parallel_outputs, f"the plan of {name}")
    root = dict.fromkeys(root_linears(model, blocks), "colwise_gather")
    return TensorParallelLayout(dict(styles), tuple(attention), tuple(blocks), source, outputs, root)


def root_linears(model: nn.Module, blocks: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` layers outside the blocks (the DiT's root: timestep, text and image embedders,
    the output projection), whose weights no other module shares and that their parents call rather than read: a layer
    whose weight an enclosing module's ``forward`` reads by name (``self.q_proj.weight`` in diffusers'
    ``HunyuanDiTAttentionPool``, ``self.out_proj.weight`` in ``nn.MultiheadAttention``; see ``reads_weights``) stays
    whole.

    Every rank of a tp group computes the root with the same inputs, so such a layer can keep ``out/N`` rows of its
    weight and all-gather its output (``"colwise_gather"``): exact, one all-gather per call, and a rank no longer holds
    the root whole (Wan's ``condition_embedder.time_proj`` alone is 57 MB in float32 at 1.3B's width).
    """
    holders = holder_counts(model)
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and block_of(path, blocks) is None
        and path not in blocks
        and not reads_weights(model, path)
        and all(holders[id(p)] == 1 for p in module.parameters(recurse=False))
    ]


def check_supported(model: nn.Module, plan: DiTPlan) -> None:
    """Refuse a model with a module that the plan's ``tensor_parallel_unsupported`` names.

    Raises:
        ValueError: naming the class, the module and the plan's reason.
    """
    for key, reason in plan.tensor_parallel_unsupported.items():
        pattern, _, lacking = key.partition("!")  # "pattern!name": the matching modules without a submodule "name"
        if pattern == "*" and not lacking:
            found = [""]
        else:
            found = [
                p
                for p, m in model.named_modules()
                if p
                and fnmatch.fnmatchcase(p, pattern)
                and not (lacking and hasattr(m, lacking) and isinstance(getattr(m, lacking), nn.Module))
            ]
        if found:
            where = f" ({found[0]})" if found[0] else ""
            raise ValueError(
                f"{type(model).__name__}{where} cannot be split by tensor parallelism: {reason} Use tp_degree=1 (the"
                " other parallelisms, e.g. ulysses_degree or fsdp=True, apply)."
            )


def translate_tp_plan(tp_plan: Mapping[str, object], source: str) -> dict[str, Spec]:
    """diffusers' ``_tp_plan`` (``"colwise"``, ``"rowwise"``, ``PackedColwiseParallel``, ``PackedRowwiseParallel``)
    as plan styles; its keys are already module patterns relative to the model."""
    styles: dict[str, Spec] = {}
    for pattern, style in tp_plan.items():
        kind = type(style).__name__
        if style in ("colwise", "rowwise"):
            styles[pattern] = style
        elif kind in ("PackedColwiseParallel", "PackedRowwiseParallel"):
            blocks = getattr(style, "blocks", None)
            styles[pattern] = Packed("colwise" if "Colwise" in kind else "rowwise", tuple(blocks) if blocks else None)
        else:
            raise ValueError(f"{source}: style {style!r} of {pattern!r} has no tensor-parallel equivalent here.")
    return styles


def reads_weights(model: nn.Module, path: str) -> bool:
    """Whether the ``forward`` of a module enclosing ``path`` (its parent, ..., ``model``) names the layer's weight or
    bias directly (``<relative path>.weight``), e.g. to pass it to ``F.multi_head_attention_forward``: splitting such
    a layer would hand that code a shard. Read from the classes' source; a class without one (built-in, compiled)
    counts as reading."""
    parts = path.split(".")
    module = model
    for depth in range(len(parts)):
        relative = ".".join(parts[depth:])
        source = _forward_source(type(module))
        if source is None or any(f"{relative}.{name}" in source for name in ("weight", "bias")):
            return True
        module = getattr(module, parts[depth])
    return False


@functools.cache
def _forward_source(cls: type) -> str | None:
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return ""
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return None


def _expand(
    patterns: Mapping[str, Spec], modules: dict[str, nn.Module], blocks: list[str], source: str
) -> dict[str, Spec]:
    styles: dict[str, Spec] = {}
    for pattern, spec in patterns.items():
        matches = [p for p in modules if p and fnmatch.fnmatchcase(p, pattern)]
        if not matches:
            raise ValueError(f"{source}: {pattern!r} matches no module.")
        outside = [p for p in matches if block_of(p, blocks) is None]
        if outside:
            lists = sorted({b.rsplit(".", 1)[0] for b in blocks})
            raise ValueError(
                f"{source}: {pattern!r} matches {outside[:3]}, outside the plan's blocks {lists}; tensor parallelism"
                " shards modules inside blocks."
            )
        for path in matches:
            if styles.get(path, spec) != spec:
                raise ValueError(f"{source}: {path} gets two styles, {styles[path]!r} and {spec!r}.")
            styles[path] = spec
    return styles


def _is_colwise(spec: Spec) -> bool:
    return spec == "colwise" or (isinstance(spec, Packed) and spec.style == "colwise")


def _split_attention(modules: dict[str, nn.Module], styles: dict[str, Spec]) -> list[str]:
    """Modules with a head count whose own projections (direct children) are split column-wise."""
    found = []
    for path, spec in styles.items():
        parent = path.rpartition(".")[0]
        if _is_colwise(spec) and parent in modules and head_count(modules[parent]) is not None and parent not in found:
            found.append(parent)
    return found


def _add_sharded_norms(modules: dict[str, nn.Module], styles: dict[str, Spec], attention: list[str]) -> None:
    """q/k norms of split attention modules that normalise over all heads become ``"sharded_norm"``."""
    for path in attention:
        attn = modules[path]
        heads = head_count(attn)
        features = [
            modules[p].out_features
            for p, s in styles.items()
            if p.rpartition(".")[0] == path and s == "colwise" and is_linear(modules[p])
        ]
        inner = attn.__dict__.get("inner_dim") if isinstance(attn.__dict__.get("inner_dim"), int) else None
        inner = inner or (features[0] if features else None)
        head_dim = getattr(attn, "head_dim", None) or (inner // heads if inner and heads else None)
        for name in QK_NORMS:
            norm, norm_path = getattr(attn, name, None), f"{path}.{name}"
            if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity) or norm_path in styles:
                continue
            size = norm_features(norm)
            if size is None or size == head_dim:
                continue  # per-head norm: every rank applies it to its own heads
            if norm_kind(norm) is None:
                raise ValueError(
                    f"{norm_path} ({type(norm).__name__}) normalises over {size} features, all heads at once; under"
                    " tensor parallelism only RMSNorm and LayerNorm can compute such statistics over the ranks."
                )
            styles[norm_path] = "sharded_norm"


def _check_kinds(modules: dict[str, nn.Module], styles: dict[str, Spec], source: str) -> None:
    for path, spec in styles.items():
        module = modules[path]
        if spec == "sharded_norm":
            if norm_kind(module) is None:
                raise ValueError(
                    f"{source}: {path} is a {type(module).__name__}; 'sharded_norm' needs an RMSNorm or LayerNorm."
                )
        elif spec == "colwise_gather" and isinstance(module, nn.Embedding):
            continue  # the table split over the embedding dim
        elif not is_linear(module):
            raise ValueError(
                f"{source}: {path} is a {type(module).__name__}; style {spec!r} needs an nn.Linear (or a"
                " peft LoRA layer around one)."
            )


def check_layout(model: nn.Module, plan: DiTPlan, tp_layout: TensorParallelLayout, layout: ParallelLayout) -> None:
    """Every split fits ``layout.tp``: head counts (times the Ulysses degree for planned self-attention) and every
    split feature count.

    Raises:
        ValueError: naming the module, the counts and a layout that works.
    """
    tp, ulysses, ring = int(layout.tp), int(layout.ulysses), int(layout.ring)
    modules = dict(model.named_modules())
    sequence_attention = {p for p, _, _ in plan.self_attention_modules(model)}
    for path in tp_layout.attention:
        heads = head_count(modules[path])
        check_heads(heads, tp, ulysses if path in sequence_attention else 1, ring, f"{type(model).__name__}.{path}")
    for path, spec in tp_layout.styles.items():
        module = modules[path]
        if isinstance(spec, Packed):
            sizes, what = packed_sizes(spec, module, path), "features of each part"
        elif spec == "sharded_norm":
            sizes, what = (norm_features(module) or 0,), "normalised features"
        elif spec == "rowwise":
            sizes, what = (module.in_features,), "input features"
        elif isinstance(module, nn.Embedding):
            sizes, what = (module.embedding_dim,), "embedding features"
        else:
            sizes, what = (module.out_features,), "output features"
        bad = [s for s in sizes if s % tp]
        if bad:
            working = max(d for d in range(1, tp + 1) if tp % d == 0 and all(s % d == 0 for s in sizes))
            raise ValueError(
                f"{type(model).__name__}.{path}: style {spec!r} splits its {what} {list(sizes)} over tp_degree={tp},"
                f" which does not divide {bad}; use tp_degree={working} (or another divisor)."
            )
