"""Kinds of layers the parallelizers treat alike: modules whose forward reads their children's weights directly, and
parameters that several modules hold (tied weights)."""

from __future__ import annotations

from torch import nn

#: Modules whose forward reads the weights of their weight layers directly (``F.multi_head_attention_forward`` takes
#: ``out_proj.weight``): their layers are never called, so a parallelizer cannot act on those layers' forward (an FSDP
#: unit of their own, a tensor-parallel style).
UNCALLED_LAYERS = (nn.MultiheadAttention,)


def uncalled_layers(root: nn.Module) -> set[int]:
    """Ids of the modules inside an ``UNCALLED_LAYERS`` module of ``root`` (the parent included)."""
    return {id(m) for parent in root.modules() if isinstance(parent, UNCALLED_LAYERS) for m in parent.modules()}


def holder_counts(root: nn.Module) -> dict[int, int]:
    """``id(parameter) -> how many modules of root hold it``: more than one for a tied weight (T5's ``shared`` and
    ``encoder.embed_tokens``), which cannot be split or sharded with one layer alone."""
    holders: dict[int, int] = {}
    for module in root.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    return holders
