"""Replicated-input guard: the ranks of a model-parallel group must call the DiT with identical inputs.

Every rank of a model-parallel group (the cfg, pp, ring, ulysses and tp axes: the ranks that work on one batch
together) runs the same ``predict_step`` and must pass the DiT the same arguments; each parallelizer then cuts
its own part out of them. A ``predict_step`` that draws its noise from a rank-dependent random state (no
``seed_everything``, or a seed derived from the rank) would not fail: every rank would cut a different latent
and the gathered sample would be silently wrong. The guard turns that into an error.

A forward pre-hook on the DiT, ahead of every other parallelizer's hooks (it sees the arguments before the CFG
split and the sequence cuts), computes a fingerprint of each argument of the DiT's forward, all-gathers the
fingerprints over the group (one small all-gather: 5 float64 numbers per argument) and raises a ``ValueError`` on
every rank when they differ, naming the argument and the ranks. Every rank reaches the same verdict from the same
gathered numbers, so all of them raise together and none is left waiting.

By default the check runs in the first DiT call of each batch (``begin_batch``, which the strategy calls before
every predict step): the later calls of a denoising loop are computed from the first call's inputs by the same code
on every rank. ``every_call`` checks every call, which also catches noise a stochastic scheduler draws per step from
a rank-dependent random state, for one all-gather per call.

The fingerprint of an argument: a CRC-32 of its structure (container types, tensor shapes and dtypes, the
values of Python scalars), its number of elements and, over its tensors, the float64 sum, the sum of squares and
the sum of the per-row sums weighted by the row index along dim 0 (which catches a batch whose samples come in
another order). Two draws of random noise differ in all of them; tensors equal up to float rounding
(non-deterministic kernels) pass (``RELATIVE_TOLERANCE``), and so do identical NaNs and infinities. Inputs
that the plan cuts inside the forward (a submodule's output, a block's inputs) are computed from these arguments
with the same weights, so they agree when the arguments agree.

Data-parallel ranks hold different samples by design and are never compared.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.utils.hooks import remove_handles

#: Mesh axes whose ranks feed the DiT identical inputs (all but ``dp``).
REPLICATED_AXES: tuple[str, ...] = ("cfg", "pp", "ring", "ulysses", "tp")

#: Sums that differ by less than this fraction of their scale count as equal (float rounding, not other data).
RELATIVE_TOLERANCE = 1e-6


def replicated_group(mesh) -> ProcessGroup:
    """The process group over ``REPLICATED_AXES`` of a mesh built by ``ParallelLayout.build_mesh``: this rank and
    the others of its model-parallel group (a collective: call on every rank)."""
    return mesh[REPLICATED_AXES]._flatten("replicated").get_group()


@dataclass
class InputGuard:
    """The guard installed on one DiT. Call ``remove()`` to take it off.

    Attributes:
        model: the DiT.
        group: the ranks that must feed it identical inputs.
        signature: the DiT's own forward signature (argument names, in order).
        ranks: the global rank of each member of ``group``, in group order.
    """

    model: nn.Module
    group: ProcessGroup
    signature: inspect.Signature
    ranks: list[int]
    every_call: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)
    checked: bool = False  # this batch's first call has been checked

    def remove(self) -> None:
        remove_handles(self.handles)

    def begin_batch(self) -> None:
        """A new batch starts: its first DiT call is checked."""
        self.checked = False

    def _check(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.checked and not self.every_call:
            return
        self.checked = True
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return  # the forward itself raises the same TypeError on every rank, before any collective
        names = list(self.signature.parameters)
        local = fingerprints([bound.arguments.get(name, _ABSENT) for name in names])  # (A, 5) float64
        gathered = [torch.empty_like(local) for _ in self.ranks]
        dist.all_gather(gathered, local, group=self.group)  # (A, 5) per rank -> N x (A, 5)
        table = torch.stack(gathered).cpu()  # (N, A, 5)
        for index, name in enumerate(names):
            classes = _equal_classes(table[:, index])
            if len(classes) > 1:
                raise ValueError(_message(_class_name(module), name, [[self.ranks[r] for r in c] for c in classes]))


def fingerprints(values: list) -> Tensor:
    """The (len(values), 5) float64 fingerprints of the arguments ``values``, on the device of their first tensor
    (the CPU without tensors). Per argument: structure CRC-32, number of elements, and over its tensors the sum,
    the sum of squares and the sum of the per-row sums (dim 0) weighted by ``(row + 1) / rows``.

    A value may be a tensor, a Python scalar or string, ``None``, or a (nested) tuple, list or dict of those.
    """
    headers: list[list[float]] = []
    stats: list[Tensor] = []
    owners: list[int] = []
    for index, value in enumerate(values):
        structure: list[str] = []
        tensors: list[Tensor] = []
        _walk(value, structure, tensors)
        headers.append([float(zlib.crc32(";".join(structure).encode())), float(sum(t.numel() for t in tensors))])
        stats.extend(_tensor_stats(t) for t in tensors)
        owners.extend(index for _ in tensors)
    device = stats[0].device if stats else torch.device("cpu")
    summed = torch.zeros(len(values), 3, dtype=torch.float64, device=device)  # (A, 3)
    if stats:
        # (T, 3) per tensor -> (A, 3) per argument
        summed.index_add_(0, torch.tensor(owners, device=device), torch.stack([s.to(device) for s in stats]))
    return torch.cat([torch.tensor(headers, dtype=torch.float64, device=device), summed], dim=1)  # (A, 5)


def _tensor_stats(t: Tensor) -> Tensor:
    """(3,) float64 on ``t``'s device: sum, sum of squares, row-weighted sum (rows along dim 0)."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    rows = x.reshape(x.shape[0] if x.dim() else 1, -1)  # (dim 0, rest)
    row_sums = rows.sum(dim=1, dtype=torch.float64)  # (dim 0,)
    weights = torch.arange(1, row_sums.numel() + 1, dtype=torch.float64, device=x.device) / row_sums.numel()
    square = torch.linalg.vector_norm(x, dtype=torch.float64).square()
    return torch.stack([row_sums.sum(), square, torch.dot(row_sums, weights)])  # (3,)


class _Absent:
    def __repr__(self) -> str:
        return "<default>"


_ABSENT = _Absent()


def _walk(value, structure: list[str], tensors: list[Tensor]) -> None:
    """Flatten ``value`` into a structure description and its tensors, in a fixed order."""
    if isinstance(value, Tensor):
        structure.append(f"T{tuple(value.shape)}{value.dtype}")
        if value.numel():
            tensors.append(value)
    elif isinstance(value, Mapping):
        structure.append(f"{type(value).__name__}{{")
        for key in sorted(value, key=repr):
            structure.append(repr(key))
            _walk(value[key], structure, tensors)
        structure.append("}")
    elif isinstance(value, (list, tuple)):
        structure.append(f"{type(value).__name__}[")
        for item in value:
            _walk(item, structure, tensors)
        structure.append("]")
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, _Absent)):
        structure.append(repr(value))
    else:  # other objects (an attention processor, a generator ...): only their type is compared
        structure.append(type(value).__qualname__)


def _equal_classes(rows: Tensor) -> list[list[int]]:
    """Group members (indices into ``rows``, (N, 5) float64) whose fingerprints agree, in order of first rank."""
    classes: list[list[int]] = []
    for member in range(rows.shape[0]):
        for members in classes:
            if _same(rows[members[0]].tolist(), rows[member].tolist()):
                members.append(member)
                break
        else:
            classes.append([member])
    return classes


def _same(a: list[float], b: list[float]) -> bool:
    """Equal structure and element count, and sums within ``RELATIVE_TOLERANCE`` of their scale."""
    (crc_a, numel_a, sum_a, square_a, weighted_a), (crc_b, numel_b, sum_b, square_b, weighted_b) = a, b
    if crc_a != crc_b or numel_a != numel_b:
        return False
    square = max(square_a, square_b)
    scale = math.sqrt(numel_a * square)  # |sum| and |weighted sum| <= sqrt(numel * sum of squares)
    return (
        _close(square_a, square_b, RELATIVE_TOLERANCE * square)
        and _close(sum_a, sum_b, RELATIVE_TOLERANCE * scale)
        and _close(weighted_a, weighted_b, RELATIVE_TOLERANCE * scale)
    )


def _close(a: float, b: float, tolerance: float) -> bool:
    """``|a - b| <= tolerance``, where equal infinities and two NaNs (inputs with NaN or inf) count as equal."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= tolerance  # False for a NaN tolerance or difference


def _class_name(module: nn.Module) -> str:
    """The model's own class name, past classes that wrappers such as FSDP2 put in front of it."""
    own = next((c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed")), type(module))
    return own.__name__


def _message(model: str, name: str, classes: list[list[int]]) -> str:
    held = "; ".join(
        f"rank{'s' if len(c) > 1 else ''} {', '.join(map(str, c))} hold{'' if len(c) > 1 else 's'} value {i + 1}"
        for i, c in enumerate(classes)
    )
    return (
        f"The ranks of a model-parallel group must call {model}.forward with identical inputs, but argument"
        f" {name!r} differs between them ({held}). A rank-dependent random state gives each rank different noise,"
        " and the parallel result would be silently wrong. Draw the noise from per-sample generators seeded from"
        " the global sample index (e.g. torch.Generator().manual_seed(seed + index), as"
        " lightning_dit_parallel.app.sampling.noise.sample_noise does), or call lightning.seed_everything(seed) before"
        " Trainer.predict so that every rank starts from the same random state. To turn this check off, pass"
        " check_inputs=False to the strategy."
    )


#: ``check_inputs`` values: off, the first DiT call of each batch, every DiT call.
CheckInputs = bool | Literal["every_call"]


def check_inputs_option(value: object) -> CheckInputs:
    """``value`` if it is a ``check_inputs`` setting (``True``, ``False`` or ``"every_call"``), else ``ValueError``."""
    if isinstance(value, bool) or value == "every_call":
        return value  # type: ignore[return-value]
    raise ValueError(f"check_inputs must be True, False or 'every_call'; got {value!r}.")


def apply_input_guard(model: nn.Module, group: ProcessGroup, every_call: bool = False) -> InputGuard:
    """Install the guard on the DiT ``model``: its forward checks that every rank of ``group`` (see
    ``replicated_group``) passes identical arguments, in the first call after each ``begin_batch()`` (and the first
    call after installing), or in every call with ``every_call``.

    Install it after the other parallelizers: its pre-hook is put first, so it sees the arguments before any of
    theirs has cut them.
    """
    ranks = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]
    # the class's forward, bound: a pipeline may have replaced ``model.forward`` by a (*args, **kwargs) driver
    guard = InputGuard(model, group, inspect.signature(type(model).forward.__get__(model)), ranks, every_call)
    guard.handles.append(model.register_forward_pre_hook(guard._check, with_kwargs=True, prepend=True))
    return guard
