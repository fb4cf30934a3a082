"""CFG parallel: the unconditional and conditional DiT work of each denoising step is split over the cfg ranks.

Two call patterns are served (learned per batch from its first step, see ``pattern.py``):

* **Doubled batch** (one DiT call per step on the (unconditional, conditional) batch): a pre-hook cuts dim 0 of every
  batch-carrying argument (see ``lightning_dit_parallel.parallel.batch``): cfg rank ``r`` of ``n`` computes rows
  ``[r*B/n, (r+1)*B/n)``, with ``n = 2`` the unconditional half on rank 0 and the conditional half on rank 1. A
  forward hook all-gathers the output's batch tensors back, in cfg-rank order.
* **Separate calls** (conditional, then unconditional call per step, e.g. diffusers ``WanPipeline``,
  ``FluxPipeline`` with ``true_cfg_scale``): cfg rank 0 computes the first call of each pair and cfg rank 1 the
  second; the rank that skips a call returns a NaN placeholder of the output's shape, and after the second call the
  outputs are exchanged and the placeholders filled in place (``exchange.py``). The prompts are not split.

Rows of a batch, and the two calls, do not interact in a DiT, so the result is exact. The DiT's forward is not
changed: a pre-hook decides, the instance ``forward`` is wrapped to skip a call (all hooks still run, so the
replicated-input guard and the other parallelizers' pre-hooks see every call on every rank), and a forward hook, the
last one, gathers or exchanges.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.batch import first_batch_size, map_tensors, split_argument
from lightning_dit_parallel.parallel.guidance.exchange import OutputTemplates, exchange_pair, misuse_flag
from lightning_dit_parallel.parallel.guidance.pattern import (
    STEP_ARGUMENTS,
    CallPattern,
    Decision,
    call_signature,
    step_key,
)
from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import remove_handles

_MISSING = object()


@dataclass
class _Call:
    """The call in progress: its decision and what the forward hook needs."""

    decision: Decision
    signature: Any
    hidden: Tensor  # the first batch-carrying argument (the latents): the placeholders' device, the misuse check
    local_batch: int | None = None  # "split": this rank's rows
    placeholder: Any = None  # a skipped call's output


@dataclass
class CFGParallel:
    """CFG parallelism installed on one DiT. Call ``remove()`` to restore the plain model.

    Attributes:
        pattern: the call pattern of the current batch (``pattern.CallPattern``).
        templates: output shapes by call signature, for placeholders.
        computed_calls: DiT forwards this rank ran (for tests and benchmarks); ``skipped_calls``: calls it skipped.
        bytes_sent: bytes this rank sent in gathers and exchanges.
    """

    model: nn.Module
    plan: DiTPlan
    group: ProcessGroup
    signature: inspect.Signature
    pattern: CallPattern
    templates: OutputTemplates = field(default_factory=OutputTemplates)
    handles: list[RemovableHandle] = field(default_factory=list)
    previous_forward: Any = _MISSING  # the instance ``forward`` before (a pipeline driver), ``None`` for the class's
    inner_forward: Callable[..., Any] | None = None  # what the wrapper calls: the forward in place before
    call: _Call | None = None
    first_output: Any = None  # the open pair's first output (computed on cfg rank 0, a placeholder on rank 1)
    computed_calls: int = 0
    skipped_calls: int = 0
    bytes_sent: int = 0

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def separate_calls(self) -> bool:
        """Whether this batch's DiT calls come in separate (conditional, unconditional) pairs, each computed on one cfg
        rank: then the cfg ranks no longer run the same call at the same time (known from the second step on)."""
        return self.pattern.mode == "separate"

    def remove(self) -> None:
        remove_handles(self.handles)
        if self.previous_forward is not _MISSING:
            if self.previous_forward is None:
                del self.model.forward
            else:
                self.model.forward = self.previous_forward
            self.previous_forward = _MISSING
        self.call, self.first_output = None, None

    def begin_batch(self) -> None:
        """A new batch: its call pattern is learned again from its first step."""
        self.pattern.begin_batch()
        self.call, self.first_output = None, None

    def end_batch(self) -> None:
        """The batch is over. Raises ``ValueError`` (on every rank alike) when its last step left a pair unfinished
        or it had no guidance to parallelize (see ``CallPattern.end_batch``)."""
        try:
            self.pattern.end_batch()
        finally:
            self.first_output = None

    # -- hooks ------------------------------------------------------------------------------------------------

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Decide this call's role (pure, the same on every rank) and cut the batch for ``"split"``."""
        self.call = None
        bound = self.signature.bind(*args, **kwargs)
        found = first_batch_size(bound.arguments)
        if found is None:
            raise ValueError(f"cfg parallel: {self.pattern.where} got no tensor argument with a batch dim.")
        step = self.pattern.step_argument
        key = step_key(bound.arguments.get(step)) if step is not None else None
        signature = call_signature(bound.arguments, step)
        decision = self.pattern.next_call(key, found, signature)
        hidden = bound.arguments[found[0]]
        call = _Call(decision, signature, hidden)
        if decision.kind == "split":
            name, batch = found
            rank = dist.get_rank(self.group)
            for arg, value in bound.arguments.items():
                bound.arguments[arg] = split_argument(value, batch, rank, self.size, self.plan.split_inputs.get(arg))
            call.local_batch = batch // self.size
        elif not decision.compute:
            call.placeholder = self.templates.placeholder(signature, hidden.device)
        self.call = call
        return bound.args, bound.kwargs

    def _forward(self, *args, **kwargs):
        """The DiT's forward, or, in a call this rank skips, the placeholder."""
        call = self.call
        if call is not None and not call.decision.compute:
            self.skipped_calls += 1
            return call.placeholder
        self.computed_calls += 1
        return self.inner_forward(*args, **kwargs)

    def _after(self, module: nn.Module, args: tuple, output):
        """Gather a split output; record, hold or exchange a pair's outputs."""
        call, self.call = self.call, None
        if call is None:
            return output
        kind = call.decision.kind
        if kind == "split":
            output = self._gather(output, call.local_batch)
        if kind in ("split", "whole"):
            self.templates.record(call.signature, output)
            return output
        if not call.decision.compute:
            output = call.placeholder  # whatever the hooks in between made of it: the pipeline gets the placeholder
        if kind == "first":
            self.first_output = output
            return output
        first, self.first_output = self.first_output, None
        if misuse_flag(call.hidden, self.group):
            raise ValueError(
                f"cfg parallel: the latents passed to {self.pattern.where} contain NaN on a cfg rank: the pipeline read"
                " the output of the first DiT call of a step (a placeholder on cfg rank 1 until the second call of the"
                " step fills it) before making the second call, e.g. by copying it (.float(), .to()). Separate-call"
                " cfg parallelism needs the pipeline to combine the two outputs only after both calls; use"
                " cfg_degree=1 for this pipeline."
            )
        self.bytes_sent += exchange_pair(first, output, self.group, call.decision.receive_second)
        if call.decision.compute and not call.decision.receive_second:
            self.templates.record(call.signature, output)
        return output

    def _clear(self, module: nn.Module, args: tuple, output):
        """After a failed call (only then does this still find the call): forget it, without any collective."""
        self.call = None
        return output

    def _gather(self, output, local: int):
        def gather(x: Tensor) -> Tensor:
            if x.dim() == 0 or x.shape[0] != local:
                return x
            self.bytes_sent += x.numel() * x.element_size()
            return all_gather_dim(x, 0, self.group)  # (B/n, ...) -> (B, ...), cfg-rank order

        return map_tensors(output, gather)


def check_guided(module: nn.Module, degree: int) -> None:
    """Reject CFG parallelism for a sampler whose guidance is off (it has neither a doubled batch nor separate calls).

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


def apply_cfg_parallel(model: nn.Module, plan: DiTPlan, group: ProcessGroup, *, fsdp: bool = False) -> CFGParallel:
    """Install CFG parallelism on the DiT ``model``: the deciding pre-hook (ahead of the other parallelizers' pre-hooks
    but the input guard's and input limits', which are applied later), the skipping ``forward`` wrapper and the
    gathering or exchanging forward hook (after the others).

    Args:
        model: the DiT.
        plan: its plan (the batch split spares the sequences it cuts along dim 0).
        group: the cfg group (2 ranks).
        fsdp: FSDP shards the weights over the cfg axis; then separate calls are refused (the cfg ranks would have to
            run every forward together for FSDP's all-gathers), with a clear error when a pipeline makes them.
    """
    # The class's forward, bound: a pipeline may have replaced ``model.forward`` by a (*args, **kwargs) driver.
    signature = inspect.signature(type(model).forward.__get__(model))
    step = next((name for name in STEP_ARGUMENTS if name in signature.parameters), None)
    refused = (
        "FSDP (fsdp=True) shards the weights over the cfg axis, so both cfg ranks must run every DiT forward together"
        " to gather them. Use fsdp=False with cfg_degree=2 (or shard with pipeline stages / tensor parallelism), or"
        " cfg_degree=1 with FSDP."
        if fsdp
        else ""
    )
    pattern = CallPattern(
        dist.get_rank(group), dist.get_world_size(group), f"{type(model).__name__}.forward", step, refused
    )
    cfg = CFGParallel(model, plan, group, signature, pattern)
    cfg.previous_forward = model.__dict__.get("forward")  # an instance forward (a pipeline driver), or None
    cfg.inner_forward = model.forward
    model.forward = cfg._forward
    cfg.handles.append(model.register_forward_pre_hook(cfg._before, with_kwargs=True, prepend=True))
    cfg.handles.append(model.register_forward_hook(cfg._after))
    cfg.handles.append(model.register_forward_hook(cfg._clear, always_call=True))
    return cfg
