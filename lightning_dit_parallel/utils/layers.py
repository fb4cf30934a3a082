"""Kinds of layers the parallelizers treat alike: modules whose forward reads their children's weights directly."""

from __future__ import annotations

from torch import nn

#: Modules whose forward reads the weights of their weight layers directly (``F.multi_head_attention_forward`` takes
#: ``out_proj.weight``): their layers are never called, so a parallelizer cannot act on those layers' forward (an FSDP
#: unit of their own, a tensor-parallel style).
UNCALLED_LAYERS = (nn.MultiheadAttention,)


def uncalled_layers(root: nn.Module) -> set[int]:
    """Ids of the modules inside an ``UNCALLED_LAYERS`` module of ``root`` (the parent included)."""
    return {id(m) for parent in root.modules() if isinstance(parent, UNCALLED_LAYERS) for m in parent.modules()}
