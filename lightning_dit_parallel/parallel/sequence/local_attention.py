"""Attention on one rank's blocks that also returns the log-sum-exp, and the merge of partial results.

Ring attention computes softmax(q k^T) v block by block; the blocks can only be combined exactly when
each partial result comes with its log-sum-exp. These helpers never drop it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.masks import mask_to_bias


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Softmax attention over one key/value block.

    Args:
        q: (B, H, Sq, D) queries.
        k: (B, H, Sk, D) keys.
        v: (B, H, Sk, D) values.
        key_valid: (Sk,), (Bm, Sk) or (Bm, Sq, Sk) with Bm 1 or B: bool (False for masked keys) or an additive float
            mask (``-inf`` for masked keys); ``None`` when all keys are valid.
        scale: softmax scale; ``None`` means 1/sqrt(D).

    Returns:
        ``out`` (B, H, Sq, D) in the dtype of ``q`` and ``lse`` (B, H, Sq) float32. A batch element whose keys are
        all masked gets ``out`` 0 and ``lse`` -inf, so that it adds nothing in ``merge_partial``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = None
    if key_valid is not None:
        bias = mask_to_bias(key_valid, q.dtype)  # -> (Bm, 1, 1 or Sq, Sk) additive
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)[:2]
    elif q.device.type == "cuda":
        expanded = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, expanded, compute_log_sumexp=True, scale=scale
        )[:2]
        lse = lse[..., : q.shape[2]]  # (B, H, Sq rounded up to the kernel's block) -> (B, H, Sq)
    else:
        return attention_with_lse_math(q, k, v, bias, scale)
    lse = lse.float()
    if bias is not None:
        # fused kernels give a fully masked row lse 0 (CPU) or garbage: make it an empty block
        empty = ~(bias > float("-inf")).any(dim=-1)  # (Bm, 1, 1 or Sq): rows without a key
        lse = lse.masked_fill(empty, float("-inf"))  # (B, H, Sq)
        out = out.masked_fill(empty[..., None], 0.0)  # (B, H, Sq, D)
    return out, lse


def attention_with_lse_math(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Reference math path (any device): explicit scores, float32 softmax statistics."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq); -inf where every key is masked
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # fully masked rows: 0 instead of nan
    out = torch.matmul(weights, v.float())  # (B, H, Sq, D)
    return out.to(q.dtype), lse


def merge_partial(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attention results over disjoint key sets into the result over their union.

    With ``lse = log(sum(exp(scores)))`` per query, the union's normaliser is ``logaddexp(lse, block_lse)``
    and each partial output is re-weighted by ``exp(its lse - new lse)`` (both weights are <= 1, so this
    is numerically stable). Shapes: ``out`` (B, H, S, D), ``lse`` (B, H, S) float32. The merged output is
    float32 so that a chain of merges accumulates at full precision; cast once at the end.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S)
    merged = out.float() * _weight(lse, new_lse) + block_out.float() * _weight(block_lse, new_lse)
    return merged, new_lse


def _weight(lse: Tensor, new_lse: Tensor) -> Tensor:
    """exp(lse - new_lse) as (B, H, S, 1); 0 for a part with no keys (lse -inf, also when new_lse is -inf)."""
    return torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
