"""peft LoRA layers under tensor parallelism: split with their base layer.

A LoRA-wrapped projection (``peft.tuners.lora.Linear``: ``base_layer``, and per adapter ``lora_A`` (in -> r) and
``lora_B`` (r -> out)) computes ``base(x) + sum_a scaling_a * lora_B_a(lora_A_a(x))``. Its style applies to the base
layer and to the adapter factor on the split side; the rank-r factor on the other side stays whole:

* column-wise (output features split): ``base_layer`` column-wise, each ``lora_B`` column-wise (the same output rows,
  packed parts alike); ``lora_A`` replicated. Rank r computes ``base(x)[rows] + lora_B(lora_A(x))[rows]``:
  (B, S, in) -> (B, S, out/N), no extra communication.
* row-wise (input features arrive split): ``base_layer`` row-wise (its bias added once, after the all-reduce), each
  ``lora_A`` row-wise over the same input columns, so its (B, S, r) partial sums are all-reduced (r values per
  token); ``lora_B`` replicated on the whole ``lora_A`` output.
* ``colwise_gather`` (a per-sample modulation whose output is gathered): ``base_layer`` split and gathered; the
  adapters replicated (their (B, k * hidden) term is computed whole).

A fused (merged) LoRA lives in the base weights and is split with them; its factors are split alike (unused while
merged). Removing tensor parallelism gathers every split factor back, so adapters can be switched, fused or unloaded
between two predicts. DoRA, other LoRA variants and LoRA on embeddings or convolutions are refused at setup.

The expansion works on module paths, before ``parallelize_module`` runs: ``path`` -> ``path.base_layer``,
``path.lora_A.<adapter>``, ``path.lora_B.<adapter>``, each an ``nn.Linear`` with a plain style.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lightning_dit_parallel.parallel.tensor.styles import Spec, packed_sizes
from lightning_dit_parallel.plan import Packed


def is_lora_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer around an ``nn.Linear`` (without importing peft when it is absent)."""
    base = getattr(module, "base_layer", None)
    return (
        isinstance(base, nn.Linear)
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
    )


def is_linear(module: object) -> bool:
    """An ``nn.Linear``, or a peft LoRA layer around one (split with it, see the module docstring)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_lora_linear(module))


def linear_of(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that holds a (possibly LoRA-wrapped) projection's base weights."""
    return module.base_layer if is_lora_linear(module) else module


def check_lora(module: nn.Module, path: str) -> None:
    """Refuse LoRA layers that this module cannot split exactly.

    Raises:
        ValueError: for DoRA or another peft LoRA variant, LoRA on an embedding, or an adapter factor that is no
            ``nn.Linear``.
    """
    variants = dict(getattr(module, "lora_variant", {}) or {})
    dora = [a for a, used in dict(getattr(module, "use_dora", {}) or {}).items() if used]
    if variants or dora or len(getattr(module, "lora_magnitude_vector", ()) or ()):
        names = sorted({*variants, *dora})
        raise ValueError(
            f"{path}: LoRA variant (DoRA or another peft lora_variant) on adapters {names}; tensor parallelism splits"
            " plain LoRA only. Fuse the adapter into the weights first (fuse_lora) or use tp_degree=1."
        )
    if len(getattr(module, "lora_embedding_A", ()) or ()):
        raise ValueError(f"{path}: LoRA on an embedding cannot be split by tensor parallelism; use tp_degree=1.")
    for side in ("lora_A", "lora_B"):
        for adapter, factor in getattr(module, side).items():
            if not isinstance(factor, nn.Linear):
                raise ValueError(
                    f"{path}.{side}.{adapter} is a {type(factor).__name__}; tensor parallelism splits"
                    " LoRA factors that are nn.Linear."
                )


def expand_lora(modules: Mapping[str, nn.Module], styles: Mapping[str, Spec]) -> dict[str, Spec]:
    """The styles with every LoRA-wrapped module replaced by the styles of its base layer and adapter factors.

    Raises:
        ValueError: from ``check_lora``, or for a style that LoRA layers do not support (``"sharded_norm"``).
    """
    expanded: dict[str, Spec] = {}
    for path, spec in styles.items():
        module = modules[path]
        if not is_lora_linear(module):
            expanded[path] = spec
            continue
        check_lora(module, path)
        expanded[f"{path}.base_layer"] = spec
        style = spec.style if isinstance(spec, Packed) else spec
        if style == "colwise_gather":
            continue  # the adapters' (B, k * hidden) term is computed whole on every rank
        if style not in ("colwise", "rowwise"):
            raise ValueError(f"{path}: a LoRA layer cannot take the tensor-parallel style {spec!r}.")
        side = "lora_B" if style == "colwise" else "lora_A"  # the factor that holds the split features
        part: Spec = spec
        if isinstance(spec, Packed):  # absolute part sizes: the factor carries no _tp_packed_*_blocks attribute
            part = Packed(spec.style, packed_sizes(spec, module.base_layer, f"{path}.base_layer"))
        for adapter in getattr(module, side):
            expanded[f"{path}.{side}.{adapter}"] = part
    return expanded
