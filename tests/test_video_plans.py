"""Plan features the video families need (no process group): folded splits (Latte's per-position timestep rows),
splits by tensor rank (Wan 2.2's per-token timestep) and SkyReels-V2's block-causal mask, which is rejected."""

from types import SimpleNamespace

import pytest
import torch

from lightning_dit_parallel import DiTPlan, Split, plan_for
from lightning_dit_parallel.parallel.batch import split_argument
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan.splits import cut_value


def state_of(rank: int, size: int) -> ShardingState:
    """A sharding state of one rank of ``size`` (the cut is pure arithmetic; no process group)."""
    return ShardingState(SimpleNamespace(size=size, rank=rank))


def lengths(state: ShardingState):
    return lambda name: state.sequences[name].length if name in state.sequences else None


@pytest.mark.parametrize("rank", [0, 1])
def test_folded_split_cuts_every_group_like_the_sequence(rank):
    """(G*S, C) rows g*S + s: each of the G groups keeps this rank's tokens, padding included (S=5 on 2 ranks)."""
    state = state_of(rank, 2)
    state.split(torch.zeros(1, 5, 1), Split("image", 1), "hidden")  # the sequence: 5 tokens, 3 per rank
    rows = torch.arange(2 * 5, dtype=torch.float32)[:, None]  # (G*S, 1), G = 2 samples
    got = cut_value(rows, Split("image", 0, folded=True), state.split, "timestep", lengths(state))
    expected = {0: [0, 1, 2, 5, 6, 7], 1: [3, 4, 0, 8, 9, 0]}[rank]  # padded tokens are zeros
    assert got.flatten().tolist() == expected


def test_folded_split_needs_the_sequence_cut_before():
    state = state_of(0, 2)
    with pytest.raises(RuntimeError, match="folded 'image', which was not cut earlier"):
        cut_value(torch.zeros(10, 1), Split("image", 0, folded=True), state.split, "timestep", lengths(state))
    state.split(torch.zeros(1, 4, 1), Split("image", 1), "hidden")
    with pytest.raises(ValueError, match="should hold groups of the 4 tokens"):
        cut_value(torch.zeros(10, 1), Split("image", 0, folded=True), state.split, "timestep", lengths(state))


def test_folded_split_is_not_cut_without_lengths():
    with pytest.raises(NotImplementedError, match="does not cut folded splits"):
        cut_value(torch.zeros(10, 1), Split("image", 0, folded=True), lambda x, s, w: x, "timestep")


def test_folded_split_cannot_be_gathered():
    with pytest.raises(ValueError, match="folded splits"):
        DiTPlan(
            split_outputs={"embed": Split("image", 1)},
            gather_outputs={"out": Split("image", 0, folded=True)},
            self_attention={"blocks.*": ("image",)},
        )


def test_split_by_rank_cuts_per_token_timesteps_only():
    """Wan's plan cuts a (B, S) timestep along tokens and leaves a (B,) one whole; both are batch tensors."""
    from diffusers import WanTransformer3DModel

    split = plan_for(WanTransformer3DModel).split_inputs["timestep"]
    state = state_of(1, 2)
    state.split(torch.zeros(1, 5, 1), Split("video", 1), "hidden")
    per_token = torch.arange(10.0).view(2, 5)
    assert cut_value(per_token, split, state.split, "timestep").tolist() == [[3, 4, 0], [8, 9, 0]]
    per_sample = torch.tensor([1.0, 2.0])
    assert cut_value(per_sample, split, state.split, "timestep") is per_sample
    # CFG parallel and micro-batches split both along the batch.
    assert split_argument(per_sample, 2, 1, 2, split).tolist() == [2.0]
    assert split_argument(per_token, 2, 1, 2, split).tolist() == [[5, 6, 7, 8, 9]]


def test_skyreels_block_causal_mask_is_rejected():
    """num_frame_per_block > 1 makes a block-causal mask over the frames, which depends on the query: sequence
    parallelism fails with an error that says so (the plan cuts its keys and the kernel checks it)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
        num_frame_per_block=2,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 4, 4, 4),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 3, 16),
        return_dict=False,
    )
    with torch.no_grad():
        model(**inputs)  # runs unparallelized
        handle = apply_sequence_parallel(model, plan_for(model), SequenceGroups())
        try:
            with pytest.raises(NotImplementedError, match="is a query-dependent attn_mask"):
                model(**inputs)
        finally:
            handle.remove()


@pytest.mark.parametrize("family, reason", [("latte", "in lockstep"), ("wan_vace", "by the block's index")])
def test_plans_whose_blocks_cannot_be_staged_reject_pipelines(family, reason):
    """The check runs before the pipeline group is used (pure: the same verdict on every rank)."""
    import importlib

    from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline

    model = importlib.import_module(f"tests.zoo.{family}").CASES[0].build()
    with pytest.raises(ValueError, match=f"cannot be cut into pipeline stages: .*{reason}.*Use pp_degree=1"):
        apply_pipeline(model, plan_for(model), PipelineOptions(), group=None)
