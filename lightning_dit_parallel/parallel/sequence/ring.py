"""Ring attention: key/value blocks travel around the ring while each rank attends to them.

Each of the R steps overlaps the point-to-point transfer of the next key/value block with attention on
the current one; partial results are merged exactly through their log-sum-exp.
Per layer and rank this sends (R-1)/R of the whole sequence's keys and values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.sequence.comm import RingExchange, group_rank, group_size
from lightning_dit_parallel.parallel.sequence.local_attention import attention_with_lse, merge_partial
from lightning_dit_parallel.parallel.sequence.masks import has_keys

#: key_valid(block) -> (Bm, Sk) mask of the keys of ring block ``block``, or (Bm, Sq, Sk) with a query part (bool or
#: additive, see ``masks.py``); None when every key is valid.
KeyValidFn = Callable[[int], "Tensor | None"]


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: ProcessGroup,
    key_valid: KeyValidFn,
    scale: float | None,
    attend: Callable[..., tuple[Tensor, Tensor]] = attention_with_lse,
) -> Tensor:
    """Exact softmax attention of local queries over the keys and values of every rank in ``group``.

    Args:
        q: (B, H, Sq, D) this rank's queries.
        k: (B, H, Sk, D) this rank's keys; every rank's block has the same shape.
        v: (B, H, Sk, D) this rank's values.
        group: the ring.
        key_valid: mask of real keys for the block that started on ring rank ``i``.
        scale: softmax scale (``None``: 1/sqrt(D)).
        attend: the block kernel, ``attention_with_lse``'s signature and results (e.g. the user's attention backend,
            ``backends.local_attend_with_lse``).

    Returns:
        (B, H, Sq, D), as if attention had run over the concatenation of all blocks.
    """
    size, rank = group_size(group), group_rank(group)
    kv = torch.stack([k, v])  # 2 x (B, H, Sk, D) -> (2, B, H, Sk, D): one message per step
    exchange = RingExchange(group)
    out: Tensor | None = None
    lse: Tensor | None = None
    for step in range(size):
        if step + 1 < size:
            exchange.start(kv)  # kv goes to rank+1 while we compute on it
        block = (rank - step) % size  # the ring rank this kv block started on
        valid = key_valid(block)
        if has_keys(valid):
            block_out, block_lse = attend(q, kv[0], kv[1], valid, scale)
            if out is None:
                out, lse = block_out.float(), block_lse
            else:
                out, lse = merge_partial(out, lse, block_out, block_lse)
        if step + 1 < size:
            kv = exchange.wait()  # (2, B, H, Sk, D) from rank-1
    assert out is not None, "every ring block was padding; a sequence has at least one real token"
    return out.to(q.dtype)
