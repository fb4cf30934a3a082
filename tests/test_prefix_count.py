"""``PrefixCount``: an integer counting the leading tokens of a cut sequence, cut to the count on each rank (no
process group)."""

import inspect

import pytest
import torch
from torch import nn

from lightning_dit_parallel import DiTPlan, PrefixCount, Split
from lightning_dit_parallel.parallel.sequence.module_inputs import module_input_hooks
from lightning_dit_parallel.plan.splits import cut_arguments, cut_value


def rank_of(rank: int, ranks: int):
    """The cut of sequence-parallel rank ``rank`` of ``ranks``: ceil(S/N) tokens each, the last padded with zeros."""

    def cut(x: torch.Tensor, split: Split, where: str) -> torch.Tensor:
        dim = split.dim % x.dim()
        local = -(-x.shape[dim] // ranks)
        pad = list(x.shape)
        pad[dim] = local * ranks - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)  # (..., S, ...) -> (..., N*local, ...)
        return x.narrow(dim, rank * local, local)  # -> (..., local, ...)

    return cut


@pytest.mark.parametrize("tokens, count, ranks", [(27, 9, 4), (27, 9, 2), (16, 4, 4), (15, 15, 4), (7, 0, 2)])
def test_count_is_the_leading_tokens_each_rank_holds(tokens, count, ranks):
    """Slicing a rank's shard at its count gives exactly its tokens among the first ``count`` of the sequence."""
    sequence = torch.arange(tokens)
    lengths = {"video": tokens}.get
    total = 0
    for rank in range(ranks):
        cut = rank_of(rank, ranks)
        local = cut_value(count, PrefixCount("video"), cut, "x", lengths)
        shard = cut(sequence, Split("video", 0), "x")
        real = shard[: max(0, min(shard.numel(), tokens - rank * shard.numel()))]
        assert torch.equal(real[:local], real[real < count])  # the counted tokens are the shard's leading ones
        total += local
    assert total == count


def test_count_in_arguments_and_tensor_counts():
    def forward(hidden_states, num_tokens=None):
        return hidden_states

    lengths = {"video": 27}.get
    args, _ = cut_arguments(
        inspect.signature(forward),
        {"num_tokens": PrefixCount("video")},
        (torch.zeros(1),),
        {"num_tokens": 9},
        rank_of(1, 4),
        "f",
        lengths,
    )
    assert args[1] == 2  # rank 1 of 4 holds tokens 7..13, of which 7 and 8 are first-frame tokens
    assert cut_value(torch.tensor(9), PrefixCount("video"), rank_of(0, 4), "x", lengths) == 7


@pytest.mark.parametrize(
    "count, lengths, error, match",
    [
        (9, None, NotImplementedError, "does not cut token counts"),
        (9, {}.get, RuntimeError, "not cut earlier"),
        (9.0, {"video": 27}.get, TypeError, "got a float"),
        (True, {"video": 27}.get, TypeError, "got a bool"),
        (28, {"video": 27}.get, ValueError, "which has 27"),
    ],
)
def test_count_errors(count, lengths, error, match):
    with pytest.raises(error, match=match):
        cut_value(count, PrefixCount("video"), rank_of(0, 2), "x", lengths)


def test_plan_needs_the_counted_sequence_cut():
    with pytest.raises(ValueError, match=r"PrefixCount of \['image'\] must count tokens of sequences that are split"):
        DiTPlan(
            split_outputs={"embed": Split("video", 1)},
            gather_outputs={"out": Split("video", 1)},
            split_module_inputs_each_call={"blocks.*": {"n": PrefixCount("image")}},
            self_attention={"a": ("video",)},
        )


class Plain(nn.Module):
    def forward(self, x, *args):  # a block variant that ignores the count it is passed
        return x


class Counting(nn.Module):
    def forward(self, x, num_tokens):
        return x


class Strict(nn.Module):
    def forward(self, x):
        return x


def test_each_call_arguments_may_be_left_to_star_args():
    plan = DiTPlan(
        split_outputs={"embed": Split("video", 1)},
        gather_outputs={"embed": Split("video", 1)},
        split_module_inputs_each_call={"blocks.*": {"num_tokens": PrefixCount("video")}},
        self_attention={"blocks.*": ("video",)},
    )
    model = nn.Module()
    model.embed = nn.Linear(2, 2)
    model.blocks = nn.ModuleList([Plain(), Counting()])
    assert [h.path for h in module_input_hooks(plan, model)] == ["blocks.0", "blocks.1"]
    model.blocks.append(Strict())
    with pytest.raises(ValueError, match=r"\['num_tokens'\] are not arguments of Strict.forward"):
        module_input_hooks(plan, model)
