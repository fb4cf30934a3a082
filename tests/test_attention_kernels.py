"""Ulysses, Ring and USP kernels against F.scaled_dot_product_attention on 2 and 4 gloo ranks.

All cases of one world size run inside one multi-process launch. Attention is sharp (large q/k), so a
wrong merge or a wrong shard order cannot pass; a negative control checks that it really cannot.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_dit_parallel.parallel.sequence.attention import sequence_parallel_attention
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.local_attention import (
    attention_with_lse,
    attention_with_lse_math,
    merge_partial,
)
from lightning_dit_parallel.parallel.sequence.masks import local_key_mask, shard_key_masks
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan import Split
from tests.distributed import run_on_ranks

RTOL = 1e-5


def _groups(rank: int, world: int, ulysses: int) -> SequenceGroups:
    """Groups for a ring x ulysses grid over all ranks (every rank creates every group, as new_group requires)."""
    ring = world // ulysses
    uly_groups = [dist.new_group([r * ulysses + u for u in range(ulysses)]) for r in range(ring)]
    ring_groups = [dist.new_group([r * ulysses + u for r in range(ring)]) for u in range(ulysses)]
    return SequenceGroups(
        ulysses=uly_groups[rank // ulysses] if ulysses > 1 else None,
        ring=ring_groups[rank % ulysses] if ring > 1 else None,
    )


def _qkv(seq_lens: tuple[int, ...], heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    # scale 4 on q and k: logits ~ 16x larger than unit-variance inputs give, i.e. peaked attention
    return [torch.randn(2, heads, total, 16, generator=g) * s for s in (4.0, 4.0, 1.0)]


def _sharded_attention(groups: SequenceGroups, names: tuple[str, ...], seq_lens: tuple[int, ...], q, k, v):
    """Shard each named sequence separately (like joint text+image attention), attend, gather back."""
    state = ShardingState(groups)

    def shard(t):  # (B, H, S_total, D) -> (B, H, sum of local lengths, D), in the order of names
        parts = torch.split(t, list(seq_lens), dim=2)
        return torch.cat([state.split(p, Split(n, 2), "test") for p, n in zip(parts, names)], dim=2)

    ql, kl, vl = shard(q), shard(k), shard(v)
    out = sequence_parallel_attention(
        ql, kl, vl, groups, lambda shards, query_shards=None: state.key_valid(names, shards, q.device), None, "test"
    )
    locals_ = [state.sequences[n].local for n in names]
    pieces = torch.split(out, locals_, dim=2)
    return torch.cat([state.gather(p, Split(n, 2), "test") for p, n in zip(pieces, names)], dim=2)


def _model_mask(kind: str, token_valid: torch.Tensor) -> torch.Tensor:
    """A mask as a model builds it from a (B, S) token mask: bool key mask, bool outer product, or additive float."""
    if kind == "bool-keys":
        return token_valid[:, None, None, :]  # (B, 1, 1, S)
    if kind == "bool-outer":
        return token_valid[:, None, :, None] & token_valid[:, None, None, :]  # (B, 1, S, S)
    if kind == "float-outer":  # diffusers' Chroma / CogView4: a 0/1 token mask times itself, added to the logits
        m = token_valid.float()
        return m[:, None, None, :] * m[:, None, :, None]  # (B, 1, S, S)
    if kind == "float-outer-inf":  # padded query rows fully masked, real rows a key mask
        return (
            torch.zeros(token_valid.shape)
            .masked_fill(~token_valid, float("-inf"))[:, None, None, :]
            .expand(-1, -1, token_valid.shape[1], -1)
            .masked_fill(~token_valid[:, None, :, None], float("-inf"))
        )
    return torch.zeros(token_valid.shape).masked_fill(~token_valid, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)


def _masked_sharded_attention(groups, names, seq_lens, q, k, v, token_valid, kind):
    """Like ``_sharded_attention``, with the model's own mask built from this rank's cut token mask."""
    state = ShardingState(groups)

    def shard(t, dim):  # the tokens of each named sequence cut separately, concatenated in the order of names
        parts = torch.split(t, list(seq_lens), dim=dim)
        return torch.cat([state.split(p, Split(n, dim), "test") for p, n in zip(parts, names)], dim=dim)

    ql, kl, vl = shard(q, 2), shard(k, 2), shard(v, 2)
    local_valid = shard(token_valid.long(), 1).bool()  # (B, local tokens); sharding pads with 0 = masked
    key_valid = shard_key_masks(state, names, _model_mask(kind, local_valid), q.device, "test")
    out = sequence_parallel_attention(ql, kl, vl, groups, key_valid, None, "test")
    pieces = torch.split(out, [state.sequences[n].local for n in names], dim=2)
    return torch.cat([state.gather(p, Split(n, 2), "test") for p, n in zip(pieces, names)], dim=2)


def _masked_cases(rank: int, world: int) -> dict[str, float]:
    """Joint attention over (text, image) with the first sample's text partly padded, every mask kind."""
    errors = {}
    for ulysses in [u for u in (1, 2, 4) if world % u == 0]:
        groups = _groups(rank, world, ulysses)
        for lens, text_valid in [((7, 10), (7, 4)), ((3, 13), (1, 3)), ((8, 8), (8, 2))]:
            q, k, v = _qkv(lens)
            token_valid = torch.ones(2, sum(lens), dtype=torch.bool)
            token_valid[0, text_valid[0] : lens[0]] = False
            token_valid[1, text_valid[1] : lens[0]] = False
            for kind in ("bool-keys", "bool-outer", "float-keys", "float-outer", "float-outer-inf"):
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_model_mask(kind, token_valid))
                out = _masked_sharded_attention(groups, ("text", "image"), lens, q, k, v, token_valid, kind)
                # compare real queries only (padded ones are never read), except for the additive 0/1 product, where
                # padded queries attend to everything and are read by the real ones: every row must be exact
                rows = token_valid[:, None, :, None] | (kind == "float-outer")
                diff = torch.where(rows, (out - ref).abs(), 0.0).max() / torch.where(rows, ref.abs(), 0.0).max()
                errors[f"ulysses={ulysses} ring={world // ulysses} {lens} valid={text_valid} {kind}"] = diff.item()
    return errors


def _all_cases(rank: int, world: int) -> dict[str, float]:
    errors = {}
    for ulysses in [u for u in (1, 2, 4) if world % u == 0]:
        groups = _groups(rank, world, ulysses)
        for names, lens in [
            (("image",), (16,)),
            (("image",), (13,)),  # uneven: padded and masked
            (("image",), (3,)),  # fewer tokens than ranks at 4: whole shards of padding
            (("text", "image"), (7, 10)),  # joint attention, both sequences uneven
        ]:
            q, k, v = _qkv(lens)
            ref = F.scaled_dot_product_attention(q, k, v)
            out = _sharded_attention(groups, names, lens, q, k, v)
            key = f"ulysses={ulysses} ring={world // ulysses} {names}={lens}"
            errors[key] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_kernels_match_sdpa(world):
    for rank_errors in run_on_ranks(world, _all_cases):
        bad = {k: e for k, e in rank_errors.items() if not e <= RTOL}
        assert not bad, bad
        assert len(rank_errors) == 4 * len([u for u in (1, 2, 4) if world % u == 0])


@pytest.mark.parametrize("world", [2, 4])
def test_kernels_with_model_masks_match_sdpa(world):
    """A model's key-padding mask (bool, outer-product bool, additive float) over joint text+image attention."""
    for rank_errors in run_on_ranks(world, _masked_cases):
        bad = {k: e for k, e in rank_errors.items() if not e <= RTOL}
        assert not bad, bad
        assert len(rank_errors) == 15 * len([u for u in (1, 2, 4) if world % u == 0])


def test_query_dependent_masks_are_reported():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert "query-dependent" in local_key_mask(causal, 6, "blocks.0.attn").problem
    per_head = torch.ones(1, 2, 1, 6, dtype=torch.bool)
    per_head[0, 1, 0, 0] = False
    assert "per-head" in local_key_mask(per_head, 6, "blocks.0.attn").problem
    read = local_key_mask(torch.ones(6, dtype=torch.bool), 6, "x")
    assert read.keys.shape == (1, 6) and read.rows is None and read.problem is None
    not_rank_one = torch.ones(1, 1, 6, 6)
    not_rank_one[0, 0, 1, 2] = 2.0
    read = local_key_mask(not_rank_one, 6, "blocks.0.attn")
    assert "query-dependent" in read.problem and "query-dependent" in read.rank_one_problem
    with pytest.raises(NotImplementedError, match="over the 6 local keys"):
        local_key_mask(torch.ones(1, 1, 6, 5, dtype=torch.bool), 6, "blocks.0.attn")


def _causal_error(rank: int, world: int) -> str:
    """A causal mask on 2 ranks: rank 0's local block is causal, rank 1's too; both raise after one gather."""
    state = ShardingState(_groups(rank, world, world))
    state.split(torch.zeros(1, 8, 1), Split("image", 1), "test")
    try:
        shard_key_masks(state, ("image",), torch.ones(4, 4, dtype=torch.bool).tril(), torch.device("cpu"), "attn")
    except NotImplementedError as err:
        return str(err)
    return "no error"


def test_a_query_dependent_mask_fails_on_every_rank():
    for message in run_on_ranks(2, _causal_error, timeout_s=60):
        assert "attn: sequence-parallel attention supports key-padding masks" in message, message


def test_merge_partial_equals_full_softmax_and_naive_average_does_not():
    q, k, v = _qkv((24,))
    ref = F.scaled_dot_product_attention(q, k, v)
    o1, l1 = attention_with_lse(q, k[:, :, :10], v[:, :, :10], None, None)
    o2, l2 = attention_with_lse(q, k[:, :, 10:], v[:, :, 10:], None, None)
    merged, _ = merge_partial(o1.float(), l1, o2, l2)
    torch.testing.assert_close(merged, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())
    # negative control: the merge a kernel without log-sum-exp would do is far off with sharp attention
    assert ((o1 + o2) / 2 - ref).abs().max() > 100 * RTOL * ref.abs().max()


def test_local_kernels_agree_with_math_path_and_mask():
    q, k, v = _qkv((9,))
    valid = torch.tensor([True] * 6 + [False] * 3)
    out, lse = attention_with_lse(q, k, v, valid, None)
    bias = torch.zeros(9).masked_fill(~valid, float("-inf")).view(1, 1, 1, -1)
    out_m, lse_m = attention_with_lse_math(q, k, v, bias, 16**-0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(1, 1, 1, -1))
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(out_m, ref, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(lse, lse_m, rtol=RTOL, atol=1e-5)


@pytest.mark.gpu
def test_local_kernel_cuda_matches_math_path():
    q, k, v = (t.cuda() for t in _qkv((40,)))
    valid = torch.arange(40, device="cuda") < 33
    out, lse = attention_with_lse(q, k, v, valid, None)
    bias = torch.zeros(40, device="cuda").masked_fill(~valid, float("-inf")).view(1, 1, 1, -1)
    out_m, lse_m = attention_with_lse_math(q, k, v, bias, 16**-0.5)
    torch.testing.assert_close(out, out_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, lse_m, rtol=1e-4, atol=1e-4)


def _heads_error(rank: int, world: int) -> str:
    groups = _groups(rank, world, world)
    q = torch.randn(1, 3, 4, 8)  # 3 heads over ulysses=world
    try:
        sequence_parallel_attention(q, q, q, groups, lambda shards, query_shards=None: None, None, "blocks.0.attn")
    except ValueError as err:
        return str(err)
    return "no error"


def test_heads_not_divisible_suggests_ring_degree():
    messages = run_on_ranks(2, _heads_error)
    for message in messages:  # every rank raises, before any collective
        assert "3 attention heads cannot be split over ulysses_degree=2" in message
        assert "ulysses_degree=1, ring_degree=2" in message
