"""Per-head values computed outside the split attention modules, cut to this rank's heads (``HeadFeatures``).

Some DiTs compute a table for all heads at once, before the blocks, and their attention processors apply it to the
projected features before splitting heads: LTX-Video's rotary ``(cos, sin)``, each ``(B, S, heads * head_dim)``,
multiplied into ``to_q(x)``. Under tensor parallelism ``to_q`` returns this rank's heads only,
``(B, S, heads/N * head_dim)``, the features ``[r * F/N, (r+1) * F/N)`` of the whole output; the plan names the
modules whose output holds such values (``DiTPlan.tensor_parallel_outputs``) and a forward hook keeps the same slice of
them. Exact: the rank applies to each of its features the very value the one-process model applies to it. No
communication.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.plan import HeadFeatures, HeadFeaturesSpec, module_paths


def resolve_outputs(
    modules: Mapping[str, nn.Module], patterns: Mapping[str, HeadFeaturesSpec], source: str
) -> dict[str, HeadFeaturesSpec]:
    """``tensor_parallel_outputs`` patterns as module paths.

    Raises:
        ValueError: for a pattern that matches no module.
    """
    found: dict[str, HeadFeaturesSpec] = {}
    for pattern, spec in patterns.items():
        paths = module_paths(modules, pattern)
        if not paths:
            raise ValueError(f"{source}: tensor_parallel_outputs {pattern!r} matches no module.")
        found.update({path: spec for path in paths})
    return found


def cut_heads(value: object, spec: HeadFeaturesSpec | None, rank: int, n: int, where: str) -> object:
    """This rank's part of ``value``: a tensor cut along its ``HeadFeatures`` dim, a tuple cut element-wise.

    Raises:
        ValueError: when the dim does not split into ``n`` equal parts or the output has another structure; the
            values are the same on every rank, so every rank raises it before the blocks' collectives.
    """
    if spec is None:
        return value
    if isinstance(spec, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(spec):
            raise ValueError(
                f"{where}: tensor_parallel_outputs expects a tuple of {len(spec)} values; the module"
                f" returned a {type(value).__name__}."
            )
        cut = [cut_heads(v, s, rank, n, f"{where}[{i}]") for i, (v, s) in enumerate(zip(value, spec))]
        return type(value)(cut) if isinstance(value, tuple) else cut
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{where}: tensor_parallel_outputs expects a tensor; the module returned a {type(value).__name__}."
        )
    dim = spec.dim_of(value.ndim)
    size = value.shape[dim]
    if size % n:
        raise ValueError(
            f"{where}: {size} values of dim {dim} (shape {tuple(value.shape)}) hold all heads and cannot"
            f" be cut into tp_degree={n} equal parts."
        )
    return value.narrow(dim, rank * (size // n), size // n)  # (..., F, ...) -> (..., F/N, ...): this rank's heads


def install_output_cuts(
    modules: Mapping[str, nn.Module], outputs: Mapping[str, HeadFeaturesSpec], rank: int, n: int, name: str
) -> list[RemovableHandle]:
    """A forward hook on every module of ``outputs`` that returns its output cut to this rank's heads."""
    handles = []
    for path, spec in outputs.items():
        where = f"{name}.{path}"

        def hook(module: nn.Module, args: tuple, output: object, spec=spec, where=where) -> object:
            return cut_heads(output, spec, rank, n, where)

        handles.append(modules[path].register_forward_hook(hook))
    return handles


__all__ = ["HeadFeatures", "cut_heads", "install_output_cuts", "resolve_outputs"]
