"""FSDP2's all-gather with its output buffer freed as soon as the unit's parameters are copied out of it.

FSDP2 gathers a unit in two steps: the shards of every rank go into one flat buffer (``(N * shard numel,)``), which
is then copied out into the unit's unsharded parameters. In forward, FSDP2 keeps that buffer alive until the *next*
unit's all-gather has been issued (so that on a GPU this unit's copy-out overlaps the next all-gather; a training
design). For inference it means that while a rank gathers a unit, it holds the previous unit's buffer, the new
unit's buffer and the new unit's parameters: three times a large unit on top of the shards (two consecutive FFN
matrices of Wan's width: +161 MB for 54 MB each, measured on 2 CPU ranks), and the last unit's buffer stays until
the model runs again (through the text encode and the VAE decode).

``ReleasingAllGather`` is FSDP2's own all-gather (``set_custom_all_gather``, FSDP2's public hook for a custom
collective) that remembers its buffer; ``release()``, called right after FSDP2's pre-forward hook has copied the
parameters out, frees the buffer's storage. A rank then holds a unit twice only during its copy-out, and once while
it runs. The buffer is remembered by a weak reference: where FSDP2 drops it by itself (a gather outside a forward,
for a call that borrows a unit's submodule), nothing here keeps it alive. On a GPU the copy-out was issued on the
current stream: the buffer is recorded on that stream before it is freed, so the caching allocator reuses its memory
only after the copy-out has run.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.utils.collectives import all_gather_single


class ReleasingAllGather:
    """FSDP2's all-gather whose output buffer ``release()`` frees; one per unit. It has the two methods of FSDP2's
    ``AllGather`` interface (``allocate`` and the call), the same as FSDP2's default one."""

    def __init__(self) -> None:
        self.buffer: weakref.ref[torch.Tensor] | None = None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = torch.empty(*size, dtype=dtype, device=device)  # (N * shard numel,)
        self.buffer = weakref.ref(buffer)
        return buffer

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        # (shard numel,) per rank -> (N * shard numel,), rank r's shard at r * shard numel
        return all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    def release(self) -> None:
        """Free the buffer's storage if FSDP2 still holds it (the tensor object then has no bytes left)."""
        buffer = self.buffer() if self.buffer is not None else None
        self.buffer = None
        if buffer is None or buffer.untyped_storage().size() == 0:
            return
        if buffer.device.type != "cpu":
            # the copy-out reads the buffer on the current stream: reuse waits until it has run there
            buffer.record_stream(torch.get_device_module(buffer.device).current_stream())
        buffer.untyped_storage().resize_(0)


def release_gather_buffers(unit: nn.Module) -> RemovableHandle:
    """Give the FSDP2 unit ``unit`` (after ``fully_shard``) a ``ReleasingAllGather`` and free its buffer right after
    each gather: a forward pre-hook that runs after FSDP2's own (registered earlier), which unshards the unit."""
    comm = ReleasingAllGather()
    unit.set_custom_all_gather(comm)
    return unit.register_forward_pre_hook(lambda module, args: comm.release())
