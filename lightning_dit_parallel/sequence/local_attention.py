"""Attention on one rank's blocks that also returns the log-sum-exp, and the merge of partial results.

Ring attention computes softmax(q k^T) v block by block; the blocks can only be combined exactly when
each partial result comes with its log-sum-exp. These helpers never drop it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor]:
    """Softmax attention over one key/value block.

    Args:
        q: (B, H, Sq, D) queries.
        k: (B, H, Sk, D) keys.
        v: (B, H, Sk, D) values.
        key_valid: (Sk,) bool, False for padded keys; ``None`` when all are valid. At least one must be valid.
        scale: softmax scale; ``None`` means 1/sqrt(D).

    Returns:
        ``out`` (B, H, Sq, D) in the dtype of ``q`` and ``lse`` (B, H, Sq) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = None
    if key_valid is not None:
        # (Sk,) bool -> (1, 1, 1, Sk) additive bias, broadcast over batch, heads and queries.
        bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device).masked_fill(~key_valid, float("-inf"))
        bias = bias.view(1, 1, 1, -1)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        return out, lse.float()
    if q.device.type == "cuda":
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, compute_log_sumexp=True, scale=scale
        )[:2]
        # lse: (B, H, Sq rounded up to the kernel's block) -> (B, H, Sq)
        return out, lse[..., : q.shape[2]].float()
    return attention_with_lse_math(q, k, v, bias, scale)


def attention_with_lse_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Reference math path (any device): explicit scores, float32 softmax statistics."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())  # (B, H, Sq, D)
    return out.to(q.dtype), lse


def merge_partial(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attention results over disjoint key sets into the result over their union.

    With ``lse = log(sum(exp(scores)))`` per query, the union's normaliser is ``logaddexp(lse, block_lse)``
    and each partial output is re-weighted by ``exp(its lse - new lse)`` (both weights are <= 1, so this
    is numerically stable). Shapes: ``out`` (B, H, S, D), ``lse`` (B, H, S) float32. The merged output is
    float32 so that a chain of merges accumulates at full precision; cast once at the end.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S)
    merged = out.float() * torch.exp(lse - new_lse)[..., None] + block_out.float() * torch.exp(block_lse - new_lse)[..., None]
    return merged, new_lse
