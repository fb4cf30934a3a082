"""``Concat``: one tensor holding several token sequences one after another, cut part by part (no process group)."""

import pytest
import torch

from lightning_dit_parallel import Concat, DiTPlan, Split
from lightning_dit_parallel.parallel.batch import map_batch
from lightning_dit_parallel.plan.splits import cut_arguments, cut_value


def first_of_two(x: torch.Tensor, split: Split, where: str) -> torch.Tensor:
    """Rank 0 of 2 ranks: the first ceil(S/2) tokens along ``split.dim``."""
    return x.narrow(split.dim % x.dim(), 0, -(-x.shape[split.dim] // 2))


LENGTHS = {"text": 3, "image": 4}


def test_each_part_is_cut_like_its_sequence():
    text, image = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    got = cut_value(torch.cat([text, image], 1), Concat(("text", "image")), first_of_two, "x", LENGTHS.get)
    # (2, 3 + 4, 5) -> (2, 2 + 2, 5): [text[:2], image[:2]]
    assert torch.equal(got, torch.cat([text[:, :2], image[:, :2]], 1))


def test_none_part_is_left_alone():
    image, rest = torch.randn(1, 4, 3), torch.randn(1, 5, 3)
    got = cut_value(torch.cat([image, rest], 1), Concat(("image", None)), first_of_two, "x", LENGTHS.get)
    assert torch.equal(got, torch.cat([image[:, :2], rest], 1))
    # the None part may be empty
    assert torch.equal(cut_value(image, Concat(("image", None)), first_of_two, "x", LENGTHS.get), image[:, :2])


def test_concat_in_tuples_and_arguments():
    import inspect

    def forward(mask, ids=None):
        return mask

    mask = torch.arange(7.0).view(1, 7)
    args, kwargs = cut_arguments(
        inspect.signature(forward),
        {"mask": Concat(("text", "image"), -1)},
        (mask,),
        {},
        first_of_two,
        "f",
        LENGTHS.get,
    )
    assert args[0].tolist() == [[0.0, 1.0, 3.0, 4.0]]
    pair = cut_value((mask, mask), (Concat(("text", "image")), None), first_of_two, "x", LENGTHS.get)
    assert pair[0].tolist() == [[0.0, 1.0, 3.0, 4.0]] and pair[1] is mask


@pytest.mark.parametrize(
    "x, concat, lengths, error, match",
    [
        (torch.zeros(1, 7), Concat(("text", "image")), None, NotImplementedError, "does not cut Concat"),
        (torch.zeros(1, 7), Concat(("text", "video")), LENGTHS.get, RuntimeError, r"\['video'\] were not cut earlier"),
        (torch.zeros(1, 8), Concat(("text", "image")), LENGTHS.get, ValueError, "make 7 tokens"),
        (torch.zeros(1, 2), Concat(("image", None)), LENGTHS.get, ValueError, "make 4 tokens"),
    ],
)
def test_concat_errors(x, concat, lengths, error, match):
    with pytest.raises(error, match=match):
        cut_value(x, concat, first_of_two, "x", lengths)


def test_concat_validation_and_plan_sequences():
    with pytest.raises(ValueError, match="at least one sequence"):
        Concat((None,))
    with pytest.raises(ValueError, match="at most one None"):
        Concat(("text", None, None))
    plan = DiTPlan(
        split_inputs={"hidden_states": Split("image"), "mask": Concat(("text", "image"))},
        gather_outputs={"proj_out": Split("image")},
        self_attention={"blocks.*.attn": ("text", "image")},  # "text" is cut only as a part of the Concat
    )
    assert plan.sequences == ("image", "text")


def test_batch_cuts_leave_a_token_dim_0_alone():
    ids = torch.zeros(2, 3)  # (T + S, 3) with T + S equal to the batch size by chance
    assert map_batch(ids, 2, Concat(("text", "image"), 0), lambda x: x[:1]) is ids
    mask = torch.ones(2, 7)  # (B, T + S): the batch is dim 0
    assert map_batch(mask, 2, Concat(("text", "image"), 1), lambda x: x[:1]).shape == (1, 7)
