"""The shapes the planner reads from a DiT: one attention module and the per-token widths of one block (data,
filled by ``spec.py`` and, for tensor parallelism, ``tp_shape.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttentionKind = Literal["self", "cross", "linear", "tail"]


@dataclass(frozen=True)
class AttentionSpec:
    """One attention module of the plan.

    Args:
        path: module path inside the DiT.
        kind: ``"self"`` (over the cut sequences), ``"cross"`` (sharded queries, replicated text keys),
            ``"linear"`` (sums over keys, all-reduced) or ``"tail"`` (cut sequences plus a replicated tail).
        sequences: the named sequences it attends over, in the order its processor concatenates them.
        heads: number of query heads.
        q_width: width of the queries (heads x head dim).
        kv_width: width of the keys and values (fewer heads with grouped-query attention).
        block: global index of the block it belongs to; -1 outside the blocks.
    """

    path: str
    kind: AttentionKind
    sequences: tuple[str, ...]
    heads: int
    q_width: int
    kv_width: int
    block: int


@dataclass(frozen=True)
class BlockShape:
    """Per-token widths of one transformer block.

    Args:
        hidden: width of the residual stream (the attention's query width).
        mlp: widest per-token projection of the block (the MLP's inner width).
        token_params: parameters of the per-token linear layers (not the per-sample modulation inside norms).
        text_token_params: those of them that run on the text tokens only (the context stream of a double-stream
            block: diffusers names them ``*context*`` and ``add_*``); the others then run on the latent tokens
            only.
        sequences: the sequences the block carries from one block to the next (its self-attention's order; a
            cross-attention block carries only the image/video tokens).
        tp_reduce_width: with tensor parallelism, the summed output features of the block's row-wise layers (each
            output all-reduced per token); ``tp_reduce_text_width`` those of the text stream.
        tp_gather_width: the summed output features of its column-wise layers with a gathered output (the adaLN
            modulation, label embeddings: per sample, not per token).
        tp_sample_reduce_width: the summed output features of its row-wise per-sample layers (timestep embedders
            inside its norms), all-reduced once per sample.
        parallel: attention and MLP run side by side and their outputs are concatenated before one output
            projection (Flux's single-stream blocks: a Linear takes ``hidden + mlp`` features).
        tp_norms: the statistics its norms over tensor-parallel features all-reduce, one float32 each per token:
            ``(statistics, tokens)`` with tokens ``"latent"``, ``"text"`` or ``"carried"`` (all the block carries).
    """

    hidden: int
    mlp: int
    token_params: int
    sequences: tuple[str, ...]
    text_token_params: int = 0
    tp_reduce_width: int = 0
    tp_reduce_text_width: int = 0
    tp_gather_width: int = 0
    tp_sample_reduce_width: int = 0
    parallel: bool = False
    tp_norms: tuple[tuple[int, str], ...] = ()
