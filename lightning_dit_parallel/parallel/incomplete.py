"""Modules whose weights a failed predict left incomplete on this rank, and the error for using them again.

Undoing FSDP, tensor parallelism and pipeline stages gathers the weights over the ranks (collectives). When a
predict fails and the ranks cannot agree that all of them are in teardown (``strategies/failure.py``), a
parallelizer is *discarded* instead: its hooks go without any collective, and each tensor this rank holds only a
part of (a shard, a released block) becomes a meta tensor of its full shape. The module is marked, so that the next
``parallelize`` (another ``trainer.predict``) and a plain forward raise a ``ValueError`` that says to reload it.
Neither can give a silently wrong result.
"""

from __future__ import annotations

import torch
from torch import nn

#: Instance attribute holding the reason a module is incomplete.
_MARK = "_lightning_dit_parallel_incomplete"


def mark_incomplete(module: nn.Module, reason: str) -> None:
    """Record that ``module``'s weights are incomplete on this rank, and why; its forward raises that from now on."""
    if _MARK not in module.__dict__:
        module.register_forward_pre_hook(lambda m, args: check_complete(m))
    module.__dict__[_MARK] = reason


def unmark_incomplete(module: nn.Module) -> None:
    """Forget the marks of ``module`` and its submodules: their weights are read again before the next use (deferred
    weights, ``loading.release``)."""
    for part in module.modules():
        part.__dict__.pop(_MARK, None)


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``tensor``'s full (global) shape and dtype; a parameter stays a parameter."""
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


def check_complete(root: nn.Module) -> None:
    """Raise ``ValueError`` when ``root`` or a submodule was left incomplete by a failed predict."""
    for path, module in root.named_modules():
        reason = module.__dict__.get(_MARK)
        if reason is not None:
            name = path or type(root).__name__
            raise ValueError(
                f"{name} ({type(module).__name__}) was left incomplete on this rank by a predict that failed: {reason}"
                " Its weights are meta tensors now; load the model again (e.g. from_pretrained) before another"
                " predict or forward."
            )
