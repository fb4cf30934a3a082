"""Separate-call CFG: placeholders for the output a rank does not compute, and the exchange that fills them.

In a (conditional, unconditional) pair of DiT calls, cfg rank 0 computes the first call and cfg rank 1 the second.
Each rank returns, for the call it skips, a placeholder of the output's structure, shapes and dtypes (an
``OutputTemplates`` entry, recorded from an earlier computed call with the same argument signature) filled with
NaN. After the second call the ranks exchange: cfg rank 0 broadcasts the first output, which lands in place in cfg
rank 1's placeholder (the tensor the pipeline already holds), and cfg rank 1 broadcasts the second output into cfg
rank 0's. So both ranks end the pair holding both real outputs, having computed one call each.

This relies on the pipeline not reading the first call's output before it makes the second call, true for the
diffusers pipelines with separate calls (``noise_pred = transformer(...)[0]``, then the unconditional call, then
the guidance combination). A pipeline that copies the output in between (``.float()`` of a bfloat16 output, say)
would keep NaN: its next step's latents are NaN, which ``misuse_flag`` detects in the next pair (see
``CFGParallel``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.batch import map_tensors


class OutputTemplates:
    """Output structure, shapes and dtypes by call signature (``pattern.call_signature``), as meta tensors."""

    def __init__(self) -> None:
        self._by_signature: dict[Hashable, Any] = {}

    def record(self, signature: Hashable, output: Any) -> None:
        """Remember the structure of a computed (whole) output."""
        meta = map_tensors(output, lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"))
        self._by_signature[signature] = meta

    def __contains__(self, signature: Hashable) -> bool:
        return signature in self._by_signature

    def placeholder(self, signature: Hashable, device: torch.device) -> Any:
        """A new output of the recorded structure on ``device``, floating tensors filled with NaN (so that a read
        before the exchange fills it is loud), others uninitialised."""

        def make(meta: Tensor) -> Tensor:
            if meta.is_floating_point() or meta.is_complex():
                return torch.full(meta.shape, math.nan, dtype=meta.dtype, device=device)
            return torch.empty(meta.shape, dtype=meta.dtype, device=device)

        return map_tensors(self._by_signature[signature], make)


def leaves(value: Any) -> list[Tensor]:
    """The tensors of an output, in ``map_tensors`` order (the same on every rank for the same structure)."""
    found: list[Tensor] = []
    map_tensors(value, lambda x: found.append(x) or x)
    return found


def exchange_pair(first: Any, second: Any, group: ProcessGroup, receive_second: bool) -> int:
    """Fill each rank's skipped output of a pair in place with the other rank's computed one; the bytes this rank
    sent.

    Args:
        first: the first call's output: computed on cfg rank 0, a placeholder on cfg rank 1.
        second: the second call's output: computed on cfg rank 1; on cfg rank 0 a placeholder when
            ``receive_second``, else computed there too (then only ``first`` moves).
        group: the cfg group (2 ranks).
        receive_second: whether cfg rank 0 skipped the second call.
    """
    rank = dist.get_rank(group)
    sent = 0
    for x in leaves(first):
        _broadcast_into(x, dist.get_global_rank(group, 0), group)  # cfg rank 0 -> rank 1, into the placeholder
        sent += x.numel() * x.element_size() if rank == 0 else 0
    if receive_second:
        for x in leaves(second):
            _broadcast_into(x, dist.get_global_rank(group, 1), group)  # cfg rank 1 -> rank 0
            sent += x.numel() * x.element_size() if rank == 1 else 0
    return sent


def _broadcast_into(x: Tensor, src: int, group: ProcessGroup) -> None:
    """``dist.broadcast`` of ``x`` from global rank ``src``, in place on the receivers, for any strides.

    A computed output may be a non-contiguous view, e.g. ``(B, S_padded, D)[:, :S]`` after a sequence-parallel
    gather that removed the padding: gloo sends a tensor's storage in memory order, so such a view would arrive with
    the padding rows mixed in (a batch of 1 hides it: the slice is then a contiguous prefix). Broadcast a contiguous
    copy and write it back into ``x``.
    """
    if x.is_contiguous():
        dist.broadcast(x, src=src, group=group)
        return
    buffer = x.contiguous()  # same shape, dense
    dist.broadcast(buffer, src=src, group=group)
    if dist.get_rank() != src:
        x.copy_(buffer)


def misuse_flag(hidden: Tensor, group: ProcessGroup) -> bool:
    """Whether any cfg rank sees NaN in the latents of this call (one 1-element all-reduce over the cfg group):
    the pipeline consumed a placeholder before it was filled. Every rank gets the same answer."""
    flag = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    if hidden.is_floating_point():
        flag += torch.isnan(hidden).any().to(torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # (1,) -> (1,), max over the cfg ranks
    return bool(flag.item())
