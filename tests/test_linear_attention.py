"""Linear attention under sequence parallelism: key-value statistics all-reduced, padded tokens masked (gloo, CPU)."""

import pytest
import torch
import torch.distributed as dist
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.linear_attention import TokenSums, install_linear_attention
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan import Split
from lightning_dit_parallel.testing.comm_counter import CommCounter
from tests.distributed import run_on_ranks

B, TOKENS, HEADS, HEAD_DIM = 2, 15, 4, 6  # 15 tokens: 8 per rank, the second rank's last one is padding
RTOL = 1e-5


def _attention(processor) -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=HEADS * HEAD_DIM, heads=HEADS, dim_head=HEAD_DIM, bias=True, processor=processor)
    with torch.no_grad():
        attn.to_k.bias.normal_().abs_()  # phi(k) of a padded (zero) token is relu(bias), not zero
    return attn.eval()


def _inputs() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, TOKENS, HEADS * HEAD_DIM, generator=g)
    angles = torch.randn(1, TOKENS, 1, HEAD_DIM // 2, generator=g).repeat_interleave(2, dim=-1)
    return hidden, (angles.cos(), angles.sin())  # rotary (cos, sin), each (1, S, 1, D)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _sharded_run(rank: int, world: int, version: int) -> dict:
    """One rank: the whole-sequence reference, the sequence-parallel output, the bytes sent, and the output of the
    same sums without masking the padded token (negative control)."""
    rotary = version == 3
    attn = _attention(SanaLinearAttnProcessor3_0() if rotary else SanaLinearAttnProcessor2_0())
    hidden, (cos, sin) = _inputs()
    with torch.no_grad():
        reference = attn(hidden, rotary_emb=(cos, sin)) if rotary else attn(hidden)

    groups = SequenceGroups(ulysses=dist.new_group(list(range(world))))
    state = ShardingState(groups)
    local = state.split(hidden, Split("image", 1), "test")  # (B, 15, C) -> (B, 8, C), padded
    kwargs = {"rotary_emb": (state.split(cos, Split("image", 1), "test"), state.split(sin, Split("image", 1), "test"))}
    kwargs = kwargs if rotary else {}
    handles = install_linear_attention(attn, "attn", ("image",), groups, lambda path: state)
    with torch.no_grad(), CommCounter() as counter:
        out = attn(local, **kwargs)
    for handle in handles:
        handle.remove()
    whole = state.gather(out, Split("image", 1), "test")  # (B, 8, C) -> (B, 15, C)

    with torch.no_grad(), TokenSums(local.shape[1], None, groups, "attn"):  # the padded token is not masked
        unmasked = state.gather(attn(local, **kwargs), Split("image", 1), "test")
    return {
        "error": _relative(whole, reference),
        "unmasked_error": _relative(unmasked, reference),
        "bytes": dict(counter.bytes_sent),
    }


@pytest.mark.parametrize("version", [2, 3], ids=["sana", "sana_video_rotary"])
def test_linear_attention_over_uneven_shards_equals_whole_sequence(version: int):
    for result in run_on_ranks(2, _sharded_run, version):
        assert result["error"] <= RTOL, result
        assert result["unmasked_error"] > 100 * RTOL, "padding must matter here: phi(0) is not zero"
        # one all-reduce per layer of (B, H, D+1, D) statistics (Sana: pad(v) phi(k)^T; Sana-Video: phi(k)v^T and
        # sum phi(k)), independent of the tokens; a ring all-reduce over 2 ranks sends it once
        assert result["bytes"] == {"all_reduce": B * HEADS * HEAD_DIM * (HEAD_DIM + 1) * 4}, result["bytes"]


def _one_rank(attn: Attention, tokens: int) -> torch.Tensor:
    state = ShardingState(SequenceGroups())
    local = state.split(torch.randn(1, tokens, HEADS * HEAD_DIM), Split("image", 1), "test")
    handles = install_linear_attention(attn, "attn", ("image",), SequenceGroups(), lambda path: state)
    try:
        with torch.no_grad():
            return attn(local)
    finally:
        for handle in handles:
            handle.remove()


def test_one_rank_changes_nothing():
    attn = _attention(SanaLinearAttnProcessor2_0())
    torch.manual_seed(2)
    hidden = torch.randn(1, 9, HEADS * HEAD_DIM)
    with torch.no_grad():
        reference = attn(hidden)
    torch.manual_seed(2)
    assert torch.equal(_one_rank(attn, 9), reference)


def test_softmax_attention_declared_linear_fails_clearly():
    from diffusers.models.attention_processor import AttnProcessor2_0

    with pytest.raises(RuntimeError, match="made no sum over its 9 local tokens"):
        _one_rank(_attention(AttnProcessor2_0()), 9)


def test_token_count_equal_to_head_dim_is_refused():
    with pytest.raises(ValueError, match=f"head dim {HEAD_DIM} over {HEAD_DIM} local tokens"):
        _one_rank(_attention(SanaLinearAttnProcessor2_0()), HEAD_DIM)


def test_ambiguous_contraction_is_refused():
    with TokenSums(5, None, SequenceGroups(), "attn"), pytest.raises(NotImplementedError, match="ambiguous"):
        torch.randn(2, 5) @ torch.randn(5, 5)  # (X, T) @ (T, T): which 5 is the tokens?
    with TokenSums(5, None, SequenceGroups(), "attn"):
        assert (torch.randn(3, 4) @ torch.randn(4, 5)).shape == (3, 5)  # over features: local, unchanged


def test_pipefusion_refuses_linear_attention_plans():
    from lightning_dit_parallel import plan_for
    from lightning_dit_parallel.parallel.pipeline.pipefusion import check_pipefusion_plan
    from tests.zoo.sana import build

    model = build()
    with pytest.raises(ValueError, match=r"\['linear_attention', 'token_grids'\].*microbatch"):
        check_pipefusion_plan(plan_for(model), model)
