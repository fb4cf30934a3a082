"""Plan features applied at every call: ``Split.ndim``, ``split_module_inputs_each_call``, ``gather_module_inputs``
and ``replicated_tail_attention`` (the kernel on 2 and 4 gloo ranks against ``F.scaled_dot_product_attention``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.module_inputs import module_input_hooks
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.parallel.sequence.replicated_tail import replicated_tail_attention
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan import DiTPlan, Split
from lightning_dit_parallel.plan.splits import cut_value
from tests.distributed import run_on_ranks
from tests.test_attention_kernels import _groups, _qkv

RTOL = 1e-5


def test_split_ndim_cuts_only_tensors_of_that_many_dims():
    state = ShardingState(SequenceGroups())
    seen = []

    def cut(x, split, where):
        seen.append(tuple(x.shape))
        return state.split(x, split, where)

    per_token = Split("video", 1, ndim=2)
    per_sample = torch.ones(2)
    assert cut_value(per_sample, per_token, cut, "timestep") is per_sample  # (B,): left whole
    cut_value(torch.ones(2, 5), per_token, cut, "timestep")  # (B, S): cut
    assert seen == [(2, 5)]
    with pytest.raises(ValueError, match="has no dim 2"):
        Split("video", 2, ndim=2)


class Attention(nn.Module):
    """Attention from ``x`` (B, S, C) to ``context`` (default: ``x``), 4 heads."""

    heads = 4

    def forward(self, x, context=None):
        context = x if context is None else context
        q, kv = (t.unflatten(2, (self.heads, -1)).transpose(1, 2) for t in (x, context))  # (B, S, C) -> (B, 4, S, C/4)
        return F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).flatten(2)  # -> (B, S, C)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.cross = Attention()

    def forward(self, x, y, temb):
        x = x + self.attn(x * 2 + (temb if temb.dim() == 3 else temb[:, None]))  # per token (B, S, C) or (B, C)
        return x + self.cross(x * 2, context=y * 2)


class Toy(nn.Module):
    """Two token streams: ``x`` attends to itself and to all of ``y``; ``temb`` is passed whole to every block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Identity()

    def forward(self, x, y, temb):
        for block in self.blocks:
            x = block(x, y, temb)
        return self.out(x)


def _toy_plan(**fields) -> DiTPlan:
    base = dict(
        split_inputs={"x": Split("x", 1), "y": Split("y", 1)},
        gather_outputs={"out": Split("x", 1)},
        blocks=("blocks",),
        self_attention={"blocks.*.attn": ("x",)},
        cross_attention=("blocks.*.cross",),
        split_module_inputs_each_call={"blocks.?": {"temb": Split("x", 1, ndim=3)}},
        gather_module_inputs={"blocks.*.cross": {"context": Split("y", 1)}},
    )
    return DiTPlan(**(base | fields))


def test_replicated_tail_plans_need_no_self_attention():
    plan = _toy_plan(self_attention={}, replicated_tail_attention={"blocks.*.attn": ("x",)})
    assert plan.sequences == ("x", "y")
    assert [path for path, _, _ in plan.replicated_tail_modules(Toy())] == ["blocks.0.attn", "blocks.1.attn"]
    with pytest.raises(ValueError, match="must name sequences that are split"):
        _toy_plan(replicated_tail_attention={"blocks.*.attn": ("text",)})


def test_per_call_patterns_are_checked_against_the_model():
    hooks = module_input_hooks(_toy_plan(), Toy())
    assert [(h.kind, h.path) for h in hooks] == [
        ("split", "blocks.0"),
        ("split", "blocks.1"),
        ("gather", "blocks.0.cross"),
        ("gather", "blocks.1.cross"),
    ]
    pattern = {"blocks.*.attn": {"temb": Split("x", 1)}}
    with pytest.raises(ValueError, match=r"split_module_inputs_each_call\['blocks.\*.attn'\] \['temb'\] are not"):
        module_input_hooks(_toy_plan(split_module_inputs_each_call=pattern), Toy())
    with pytest.raises(ValueError, match=r"gather_module_inputs\['head'\] matches no module"):
        module_input_hooks(_toy_plan(gather_module_inputs={"head": {"x": Split("x", 1)}}), Toy())
    with pytest.raises(ValueError, match="replicated_tail_attention patterns .* match no module"):
        apply_sequence_parallel(Toy(), _toy_plan(replicated_tail_attention={"blocks.*.mlp": ("x",)}), SequenceGroups())


def _toy_cases(rank: int, world: int) -> dict[str, float]:
    """The toy on ``world`` ranks against one process: per-token and per-sample ``temb``, uneven streams."""
    errors = {}
    for ulysses in (1, world):
        groups = _groups(rank, world, ulysses)
        for tokens, context, temb_tokens in [(8, 4, 8), (7, 5, 7), (9, 3, 0)]:
            g = torch.Generator().manual_seed(tokens)
            x, y = torch.randn(2, tokens, 8, generator=g), torch.randn(2, context, 8, generator=g)
            temb = torch.randn(2, temb_tokens, 8, generator=g) if temb_tokens else torch.randn(2, 8, generator=g)
            model = Toy()
            ref = model(x, y, temb)
            handle = apply_sequence_parallel(model, _toy_plan(), groups)
            try:
                out = model(x, y, temb)
            finally:
                handle.remove()
            key = f"ulysses={ulysses} x={tokens} y={context} temb={tuple(temb.shape)}"
            errors[key] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_each_call_splits_and_gathers_match_one_process(world):
    for rank_errors in run_on_ranks(world, _toy_cases):
        bad = {k: e for k, e in rank_errors.items() if not e <= RTOL}
        assert not bad, bad
        assert len(rank_errors) == 6


def _tail_cases(rank: int, world: int) -> dict[str, float]:
    """Joint attention over [video (cut), tail (whole on every rank)] for tails that do and do not divide."""
    errors = {}
    for ulysses in [u for u in (1, 2, 4) if world % u == 0]:
        groups = _groups(rank, world, ulysses)
        for video, tail in [(16, 8), (13, 5), (9, 3), (7, 0)]:
            q, k, v = _qkv((video, tail), seed=video + tail)
            ref = F.scaled_dot_product_attention(q, k, v)
            state = ShardingState(groups)

            def local(t):  # (B, H, video + tail, D) -> (B, H, video/N + tail, D)
                cut = state.split(t[:, :, :video], Split("video", 2), "test")
                return torch.cat([cut, t[:, :, video:]], dim=2)

            out = replicated_tail_attention(local(q), local(k), local(v), state, ("video",), None, "test")
            shard = state.sequences["video"].local
            whole = torch.cat([state.gather(out[:, :, :shard], Split("video", 2), "test"), out[:, :, shard:]], dim=2)
            key = f"ulysses={ulysses} ring={world // ulysses} video={video} tail={tail}"
            errors[key] = ((whole - ref).abs().max() / ref.abs().max()).item()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_tail_attention_matches_sdpa(world):
    for rank_errors in run_on_ranks(world, _tail_cases):
        bad = {k: e for k, e in rank_errors.items() if not e <= RTOL}
        assert not bad, bad
        assert len(rank_errors) == 4 * len([u for u in (1, 2, 4) if world % u == 0])
