"""CFG parallel: the doubled (unconditional, conditional) batch reaching the DiT is split over the cfg ranks.

A pre-hook on the DiT's forward cuts dim 0 of every batch-carrying argument (see ``lightning_dit_parallel.batch``): cfg rank
``r`` of ``n`` computes rows ``[r*B/n, (r+1)*B/n)``, with ``n = 2`` the unconditional half on rank 0 and the
conditional half on rank 1. A forward hook all-gathers the output's batch tensors back, in cfg-rank
order, so every rank returns the whole (B, ...) output. Rows of a batch do not interact in a DiT, so the
result is exact. The DiT's forward itself is not changed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.batch import first_batch_size, map_tensors, split_argument
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.utils.hooks import remove_handles


@dataclass
class CFGParallel:
    """CFG parallelism installed on one DiT. Call ``remove()`` to restore the plain model."""

    model: nn.Module
    plan: DiTPlan
    group: ProcessGroup
    signature: inspect.Signature
    handles: list[RemovableHandle] = field(default_factory=list)
    local_batch: int | None = None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def remove(self) -> None:
        remove_handles(self.handles)
        self.local_batch = None

    def _split_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self.signature.bind(*args, **kwargs)
        found = first_batch_size(bound.arguments)
        where = f"{type(module).__name__}.forward"
        # Local checks only: every cfg rank sees the same batch, so all of them raise here, before any collective.
        if found is None:
            raise ValueError(f"cfg parallel: {where} got no tensor argument with a batch dim to split.")
        name, batch = found
        if batch % self.size:
            raise ValueError(
                f"cfg parallel (cfg_degree={self.size}) splits the doubled (unconditional, conditional) batch, but"
                f" {where}({name}=...) has batch size {batch}, which does not divide by {self.size}. Classifier-free"
                " guidance must be on (guidance_scale != 1) so that the transformer sees the doubled batch."
            )
        rank = dist.get_rank(self.group)
        for arg, value in bound.arguments.items():
            bound.arguments[arg] = split_argument(value, batch, rank, self.size, self.plan.split_inputs.get(arg))
        self.local_batch = batch // self.size
        return bound.args, bound.kwargs

    def _gather_outputs(self, module: nn.Module, args: tuple, output):
        local, self.local_batch = self.local_batch, None
        if local is None:  # the pre-hook raised; nothing was split
            return output

        def gather(x: Tensor) -> Tensor:
            if x.dim() == 0 or x.shape[0] != local:
                return x
            return all_gather_dim(x, 0, self.group)  # (B/n, ...) -> (B, ...), cfg-rank order

        return map_tensors(output, gather)


def check_guided(module: nn.Module, degree: int) -> None:
    """Reject CFG parallelism for a sampler whose guidance is off (it has no doubled batch).

    Looks at a ``guided`` attribute (``DiffusionSampler`` has one); modules without it are checked per
    forward instead.

    Raises:
        ValueError: when ``module.guided`` is ``False``.
    """
    if getattr(module, "guided", None) is False:
        scale = getattr(module, "guidance_scale", None)
        raise ValueError(
            f"cfg_degree={degree} splits the doubled (unconditional, conditional) batch, but classifier-free guidance"
            f" is off in {type(module).__name__} (guided=False, guidance_scale={scale}), so there is no doubled batch."
            " Use cfg_degree=1, or a guidance_scale other than 1."
        )


def apply_cfg_parallel(model: nn.Module, plan: DiTPlan, group: ProcessGroup) -> CFGParallel:
    """Install the batch split (pre-hook) and the output all-gather (hook) on the DiT ``model``.

    The split runs before the DiT's other pre-hooks (sequence parallel cuts dim 1 afterwards; FSDP's
    parameter all-gather is independent of the batch).
    """
    # The class's forward, bound: a pipeline may have replaced ``model.forward`` by a (*args, **kwargs) driver.
    cfg = CFGParallel(model, plan, group, inspect.signature(type(model).forward.__get__(model)))
    cfg.handles.append(model.register_forward_pre_hook(cfg._split_inputs, with_kwargs=True, prepend=True))
    cfg.handles.append(model.register_forward_hook(cfg._gather_outputs, always_call=True))
    return cfg
