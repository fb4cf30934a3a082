"""DistriFusion's self-attention: this rank's queries over its own fresh keys and values and the other patches'
keys and values from the previous step, which travel (all-gather) while this step computes.

Every call all-gathers the rank's fresh keys and values over the patch group, asynchronously: the gather is waited
for at the same module's call in the next step, so it overlaps with a whole step of compute. That call attends over
every shard's keys (its own fresh, the others one step old). The first ``warmup_steps`` calls of a batch wait for
their gather at once and attend over fresh keys only: exactly sequence parallelism with all-gathered keys and values.
A model's key-padding mask travels with them (``mask_message.py``). Bytes per call: each rank sends its shard's keys
and values to every other rank, ``2 (N-1)/N p*hs`` per layer and rank, ``2 p*hs`` received in all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.sequence.attention import local_sdpa, unsupported_sdpa_arguments
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.mask_message import pack_local_mask, unpack_masks
from lightning_dit_parallel.parallel.sequence.masks import LocalMask
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.utils.collectives import all_gather_single

#: require_state(where) -> the sharding state of the forward in progress (raises outside one).
StateFn = Callable[[str], ShardingState]


def _all_gather(x: Tensor, group: ProcessGroup) -> tuple[Tensor, dist.Work]:
    """Start gathering ``x`` from every rank of ``group``: (...) -> (N, ...), rank ``i`` in row ``i``."""
    x = x.contiguous()
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # (N * X, ...): the inputs one after another along dim 0
    work = all_gather_single(out, x, group=group, async_op=True)
    return out.view(n, *x.shape), work  # (N * X, ...) -> (N, X, ...), filled once the work completes


@dataclass
class Exchange:
    """Every shard's keys and values (N, 2, B, H, L, D) of one attention module's call and the packed masks (N, Bm, W)
    sent with them, complete or still travelling; ``sent`` keeps the outgoing tensors alive until ``wait``."""

    kv: Tensor
    mask: Tensor | None
    read: LocalMask | None
    sent: list[Tensor] = field(default_factory=list)
    works: list[dist.Work] = field(default_factory=list)

    def wait(self) -> Exchange:
        for work in self.works:
            work.wait()
        self.works.clear()
        self.sent.clear()
        return self

    def matches(self, kv: Tensor, mask: Tensor | None) -> bool:
        return (
            tuple(self.kv.shape[1:]) == tuple(kv.shape)
            and self.kv.dtype == kv.dtype
            and (self.mask is None) == (mask is None)
            and (mask is None or tuple(self.mask.shape[1:]) == tuple(mask.shape))
        )


class StaleAttention:
    """The kernel factory for ``apply_sequence_parallel`` and the exchanges in flight, one per attention module.

    Args:
        groups: the patch group: one sequence-parallel axis (the other of size 1).
        warmup_steps: calls per batch that run exact.

    ``step`` is the DiT call of the batch in progress (1 for the first), kept by ``DistriFusion``.
    """

    def __init__(self, groups: SequenceGroups, warmup_steps: int) -> None:
        if groups.ulysses_size > 1 and groups.ring_size > 1:
            raise ValueError(
                f"DistriFusion gathers keys and values over one axis; got ulysses={groups.ulysses_size} and"
                f" ring={groups.ring_size}."
            )
        self.group = groups.ring if groups.ring is not None else groups.ulysses
        self.size, self.rank = groups.size, groups.rank
        self.warmup_steps = warmup_steps
        self.step = 0
        self.exchanges: dict[str, Exchange] = {}

    def clear(self) -> None:
        """Wait for every gather still travelling and forget them (a new batch, or removal)."""
        for exchange in self.exchanges.values():
            exchange.wait()
        self.exchanges.clear()

    def __call__(self, path: str, order: tuple[str, ...], require_state: StateFn) -> Callable:
        """The kernel of the self-attention module at ``path``, attending over the sequences ``order``."""

        def kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            problems = unsupported_sdpa_arguments(dropout_p, is_causal, enable_gqa)
            if problems:
                raise NotImplementedError(f"{path}: DistriFusion attention does not support {', '.join(problems)}.")
            return self._attend(path, order, require_state(path), query, key, value, attn_mask, scale)

        return kernel

    def _start(self, fresh: Tensor, packed: Tensor | None, read: LocalMask | None) -> Exchange:
        kv, work = _all_gather(fresh, self.group)  # (2, B, H, L, D) -> (N, 2, B, H, L, D)
        exchange = Exchange(kv, None, read, sent=[fresh], works=[work])
        if packed is not None:
            exchange.mask, mask_work = _all_gather(packed, self.group)  # (Bm, W) -> (N, Bm, W)
            exchange.sent.append(packed)
            exchange.works.append(mask_work)
        return exchange

    def _attend(
        self,
        path: str,
        order: tuple[str, ...],
        state: ShardingState,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        scale: float | None,
    ) -> Tensor:
        width = state.local_length(order)
        if not query.shape[-2] == key.shape[-2] == width or not query.shape == key.shape == value.shape:
            raise RuntimeError(
                f"{path}: DistriFusion expects q, k, v of one shape over this rank's {width} tokens of {order} (the"
                f" plan's order); got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} (B, H, S, D)."
            )
        fresh = torch.stack([key, value])  # 2 x (B, H, L, D) -> (2, B, H, L, D)
        packed, read = pack_local_mask(attn_mask, width, path) if attn_mask is not None else (None, None)
        previous = self.exchanges.get(path)
        if self.step <= self.warmup_steps or previous is None or not previous.matches(fresh, packed):
            if previous is not None:
                previous.wait()
            exchange = self._start(fresh, packed, read).wait()  # exact: every shard's keys of this call
            kv, masks = exchange.kv, exchange.mask
        else:
            previous.wait()  # started one step ago: long arrived unless the step was shorter than the transfer
            kv = previous.kv.clone()
            kv[self.rank] = fresh  # (N, 2, B, H, L, D): this rank's rows fresh, the others one step old
            masks = None
            if packed is not None:
                masks = previous.mask.clone()
                masks[self.rank] = packed  # (N, Bm, W)
            exchange = self._start(fresh, packed, read)  # for the next step; travels while this step computes
        self.exchanges[path] = exchange
        n, (two, b, h, local, d) = self.size, fresh.shape
        kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(two, b, h, n * local, d)  # (N, 2, B, H, L, D) -> (2, B, H, N*L, D)
        mask = self._mask(state, order, masks, read, query.dtype, query.device, path, width)
        return local_sdpa(query, kv[0], kv[1], attn_mask=mask, scale=scale)  # (B, H, L, D)

    def _mask(
        self,
        state: ShardingState,
        order: tuple[str, ...],
        masks: Tensor | None,
        read: LocalMask | None,
        dtype: torch.dtype,
        device: torch.device,
        where: str,
        width: int,
    ) -> Tensor | None:
        """(Bm, 1, 1 or L, N*L) additive mask of this rank's queries over every shard's keys, or ``None``."""
        padding = state.key_valid(order, list(range(self.size)), device)  # (N*L,) bool or None
        bias = None
        if masks is not None:
            keys, rows = unpack_masks(masks.transpose(0, 1), read, width, dtype, where, "DistriFusion attention")
            bias = keys.flatten(1)  # (Bm, N, L) -> (Bm, N*L)
            if rows is not None:
                bias = rows[:, self.rank, :, None] * bias[:, None, :]  # u_q * v_k: (Bm, L, N*L)
        if padding is not None:
            base = torch.zeros(padding.shape, dtype=dtype, device=device) if bias is None else bias
            bias = base.masked_fill(~padding, float("-inf"))  # padded keys masked
        if bias is None:
            return None
        return bias[:, None] if bias.dim() == 3 else bias.view(-1, 1, 1, bias.shape[-1])  # -> (Bm, 1, 1 or L, N*L)
