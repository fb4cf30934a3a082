"""Masks that sharded attention cannot honour exactly fail with an error that names the reason (one rank, no
process group: the checks run before any communication)."""

import pytest
import torch

from lightning_dit_parallel import plan_for
from lightning_dit_parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.sequence.parallelize import apply_sequence_parallel
from tests.zoo import chroma, cogview4, text_mask


def chroma_float_mask(model) -> dict:
    """Chroma's pipeline passes a float 0/1 mask: its blocks make the additive, query-dependent m_q * m_k."""
    kwargs = chroma.inputs(3, 5, 7)(model)
    kwargs["attention_mask"] = kwargs["attention_mask"].float()
    return kwargs


def cogview4_padded_mask(model) -> dict:
    """CogView4's processor turns a text mask into the float 0/1 outer product m_q * m_k (additive)."""
    return dict(cogview4.inputs(3, 5, 7)(model), attention_mask=text_mask(7))


@pytest.mark.parametrize(
    "build, make", [(chroma.build, chroma_float_mask), (cogview4.build, cogview4_padded_mask)], ids=["chroma", "cogview4"]
)
def test_query_dependent_masks_are_rejected(build, make):
    model = build()
    handle = apply_sequence_parallel(model, plan_for(model), SequenceGroups())
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError, match="depends on the query"):
            model(**make(model))
    finally:
        handle.remove()
