"""Point-to-point transfers between neighbouring pipeline stages and the broadcast of the final result.

Every function takes the pipeline group explicitly. Stage ``s`` is rank ``s`` of the group; sends go to
stage ``s + 1`` and receives come from stage ``s - 1``. A transfer is a *mask* (which of the tensors the
receiver holds are to be replaced) followed by the masked tensors, in order; the receiver uses its own
tensors of the same call as shape templates, which works because every stage runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass
class StageLink:
    """This rank's place in the pipeline group and its neighbours' global ranks."""

    group: ProcessGroup
    stage: int
    num_stages: int

    @classmethod
    def from_group(cls, group: ProcessGroup) -> StageLink:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def global_rank(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def send(self, tensors: list[Tensor], mask: list[bool]) -> tuple[list[dist.Work], list[Tensor]]:
        """Post non-blocking sends of ``mask`` and of the tensors it marks to the next stage.

        Returns the pending works and the buffers they send (the flags and contiguous copies included); the
        caller keeps both alive until the works are waited on.
        """
        dst = self.global_rank(self.stage + 1)
        flags = torch.tensor(mask, dtype=torch.uint8, device=tensors[0].device)  # (n,) one flag per tensor
        # (shape of each marked tensor in the call) = the receiver's template of the same call
        buffers = [flags, *(tensor.contiguous() for tensor, sent in zip(tensors, mask) if sent)]
        return [dist.isend(buffer, dst, group=self.group) for buffer in buffers], buffers

    def recv(self, templates: list[Tensor]) -> list[Tensor]:
        """Receive from the previous stage: the templates that the sender marked are replaced by received tensors.

        ``templates``: this rank's own tensors of the same call (shapes and dtypes as the sender's).
        """
        src = self.global_rank(self.stage - 1)
        flags = torch.empty(len(templates), dtype=torch.uint8, device=templates[0].device)  # (n,)
        dist.recv(flags, src, group=self.group)  # (n,) which templates the sender replaces
        out = list(templates)
        works, buffers = [], []
        for i, (template, sent) in enumerate(zip(templates, flags.tolist())):
            if sent:
                buffer = torch.empty_like(template, memory_format=torch.contiguous_format)
                works.append(dist.irecv(buffer, src, group=self.group))  # (shape of the template)
                buffers.append((i, buffer))
        for work in works:
            work.wait()
        for i, buffer in buffers:
            out[i] = buffer
        return out

    def broadcast_from_last(self, output, device: torch.device):
        """Every stage gets the last stage's ``output`` (any pytree of tensors; ``None`` on the other stages).

        The structure and tensor shapes travel first as one pickled object, then each tensor.
        """
        src = self.global_rank(self.num_stages - 1)
        if self.is_last:
            output = pytree.tree_map(lambda leaf: leaf.contiguous() if isinstance(leaf, Tensor) else leaf, output)
        box = [pytree.tree_map(_describe, output) if self.is_last else None]
        dist.broadcast_object_list(box, src, group=self.group)  # [pytree of _TensorMeta] from the last stage
        result = output if self.is_last else pytree.tree_map(lambda leaf: _allocate(leaf, device), box[0])
        for leaf in pytree.tree_leaves(result):
            if isinstance(leaf, Tensor):
                dist.broadcast(leaf, src, group=self.group)  # (shape of the output leaf), from the last stage
        return result


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _describe(leaf):
    return _TensorMeta(tuple(leaf.shape), leaf.dtype) if isinstance(leaf, Tensor) else leaf


def _allocate(leaf, device: torch.device):
    return torch.empty(leaf.shape, dtype=leaf.dtype, device=device) if isinstance(leaf, _TensorMeta) else leaf
