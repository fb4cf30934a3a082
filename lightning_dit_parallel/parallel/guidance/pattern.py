"""The call pattern of a denoising loop, learned from its first step: which CFG role each DiT call gets.

A pipeline applies classifier-free guidance in one of two ways:

* one DiT call per denoising step on a doubled (unconditional, conditional) batch (PixArt, SD3, the package's
  ``DiffusionSampler``): the batch is split over the cfg ranks (``"split"``);
* two DiT calls per step, conditional then unconditional, each on the prompt batch (diffusers ``WanPipeline``,
  ``WanImageToVideoPipeline``, ``FluxPipeline`` with ``true_cfg_scale > 1``, ``QwenImagePipeline``,
  ``HunyuanVideoPipeline``): cfg rank 0 computes the first call of each pair, cfg rank 1 the second
  (``"first"``/``"second"``), and the ranks exchange the outputs afterwards (``exchange.py``).

The two calls of a step carry the same timestep; the next step another one. So the calls are grouped by the value of
the DiT's timestep argument (``STEP_ARGUMENTS``), and the first step of each batch (``begin_batch``) tells the
pattern: 1 call per timestep is a doubled batch, 2 calls are separate conditional and unconditional calls, more are
refused. During that first step nothing is known yet: every call is split over its batch where the batch divides
(exact for any call: rows of a batch do not interact), and otherwise computed whole on every cfg rank. A pair whose
output shapes are not known yet (``known``) is computed the same way, once, so that the placeholders of later pairs
can be made without computing.

Every rank of a model-parallel group sees the same calls with the same arguments, so every rank takes the same
decision and raises the same error, before any collective of the call. Pure: no process group here.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

#: Names of the timestep argument of a DiT's forward, first match wins (diffusers: ``timestep``; HiDream:
#: ``timesteps``; Z-Image: ``t``).
STEP_ARGUMENTS: tuple[str, ...] = ("timestep", "timesteps", "t")

Kind = Literal["split", "whole", "first", "second"]


@dataclass(frozen=True)
class Decision:
    """What one cfg rank does in one DiT call.

    Attributes:
        kind: ``"split"``: compute this rank's part of the batch, all-gather the outputs; ``"whole"``: compute the
            whole call (every cfg rank alike, no communication); ``"first"``/``"second"``: one call of a
            separate (conditional, unconditional) pair.
        compute: whether this rank runs the DiT's forward in this call. After a ``"second"`` call the pair's outputs
            are exchanged.
        receive_second: (``"second"`` only) cfg rank 0 receives the second call's output from cfg rank 1 (it did not
            compute it itself).
    """

    kind: Kind
    compute: bool = True
    receive_second: bool = False


def step_key(value: Any) -> Tensor | None:
    """The timestep argument as a flat float64 CPU tensor (the key that groups the calls of one step); ``None`` when
    absent. A CUDA timestep is copied to the host: one small synchronisation per call."""
    if value is None:
        return None
    return torch.as_tensor(value).detach().to("cpu", torch.float64).flatten()


def same_step(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two calls carry the same timestep."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def describe_key(key: Tensor | None) -> str:
    """A short text for a step key in messages, e.g. ``t=937.5``."""
    if key is None:
        return "t=None"
    values = key.unique()
    shown = ", ".join(f"{v:g}" for v in values[:3].tolist())
    return f"t={shown}" + (", ..." if values.numel() > 3 else "")


def call_signature(arguments: dict[str, Any], skip: str | None) -> Hashable:
    """What a call's output shapes depend on: the structure of its arguments, tensor shapes, dtypes and devices, and
    the values of ints, bools, strings and ``None`` (floats by type only: they vary per step). ``skip`` (the timestep
    argument) is described by its shape only."""
    return tuple((name, _describe(value, by_value=name != skip)) for name, value in arguments.items())


def _describe(value: Any, by_value: bool = True) -> Hashable:
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, (bool, int, str)) or value is None:
        return value if by_value else type(value).__name__
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return ("dict", tuple((str(k), _describe(v, by_value)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v, by_value) for v in value))
    return type(value).__name__


@dataclass
class CallPattern:
    """The per-batch state machine of one DiT's calls under cfg parallelism (``size`` cfg ranks, this one ``rank``).

    Args:
        rank: this rank's index in the cfg group.
        size: the cfg degree (2).
        where: the DiT's name for messages, e.g. ``"WanTransformer3DModel.forward"``.
        step_argument: the forward's timestep argument (``STEP_ARGUMENTS``), ``None`` when it has none: then only the
            doubled batch can be served.
        separate_refused: why separate calls cannot be served with this layout (e.g. FSDP shards over the cfg axis),
            ``""`` when they can.
    """

    rank: int
    size: int
    where: str
    step_argument: str | None
    separate_refused: str = ""
    partners: dict[Hashable, Hashable] = field(default_factory=dict)  # first call's signature -> second's (learned)
    mode: Literal["learning", "batch", "separate"] = "learning"
    calls: int = 0  # calls of this batch
    first_key: Tensor | None = None
    first_calls: int = 0  # calls with the first step's timestep
    first_signature: Hashable = None
    first_batch: tuple[str, int] | None = None  # (argument, batch size) of the first call
    open_pair: tuple[Tensor | None, Hashable, bool] | None = None  # (key, first signature, known) of an unfinished pair

    def begin_batch(self) -> None:
        """A new denoising loop: the pattern is learned again from its first step (the output shapes stay known)."""
        self.mode, self.calls, self.first_key, self.first_calls = "learning", 0, None, 0
        self.first_signature, self.first_batch, self.open_pair = None, None, None

    def next_call(self, key: Tensor | None, batch: tuple[str, int], signature: Hashable) -> Decision:
        """The decision for the next call (timestep ``key``, ``batch`` = (argument, size of dim 0), ``signature``).

        Raises:
            ValueError: a pattern cfg parallelism cannot serve (the same on every rank, before any collective).
        """
        self.calls += 1
        if self.mode == "learning":
            if self.calls == 1 or (key is not None and same_step(key, self.first_key)):
                return self._learn(key, batch, signature)
            self.mode = "batch" if self.first_calls == 1 else "separate"
            if self.mode == "separate" and self.separate_refused:
                raise ValueError(self._separate_message())
        if self.mode == "batch":
            if batch[1] % self.size:
                raise ValueError(self._unguided_message(batch))
            return Decision("split")
        return self._pair(key, batch, signature)

    def end_batch(self) -> None:
        """The batch's denoising loop is over.

        Raises:
            ValueError: its last step made one call of a pair (the placeholder cfg rank 1 returned was never filled),
                or its only step made one call on a batch that does not split (no guidance).
        """
        if self.open_pair is not None:
            raise ValueError(self._broken_pair_message(self.open_pair[0], None))
        if self.mode == "learning" and self.first_calls == 1 and self.first_batch[1] % self.size:
            raise ValueError(self._unguided_message(self.first_batch))

    # -- states ---------------------------------------------------------------------------------------------

    def _learn(self, key: Tensor | None, batch: tuple[str, int], signature: Hashable) -> Decision:
        """A call of the batch's first step: computed split or whole, and counted."""
        self.first_calls += 1
        if self.first_calls == 1:
            self.first_key, self.first_signature, self.first_batch = key, signature, batch
        elif self.first_calls == 2:
            self.partners[self.first_signature] = signature
        else:
            raise ValueError(self._many_calls_message(key))
        if key is None and batch[1] % self.size:  # no timestep to pair separate calls by: a doubled batch or nothing
            raise ValueError(self._unguided_message(batch))
        return self._computed(batch)

    def _pair(self, key: Tensor | None, batch: tuple[str, int], signature: Hashable) -> Decision:
        """A call of a later step with separate calls: the first or the second of a (conditional, unconditional)
        pair."""
        if self.open_pair is None:
            known = signature in self.partners
            self.open_pair = (key, signature, known)
            if not known:  # output shapes not seen yet: this pair is computed on every rank, and learned
                return self._computed(batch)
            return Decision("first", compute=self.rank == 0)
        pair_key, first_signature, known = self.open_pair
        if not same_step(key, pair_key):
            raise ValueError(self._broken_pair_message(pair_key, key))
        self.open_pair = None
        if not known:
            self.partners[first_signature] = signature
            return self._computed(batch)
        # a second call shaped unlike the learned one: cfg rank 0 computes it too and only the first output moves
        expected = self.partners[first_signature] == signature
        return Decision("second", compute=self.rank == 1 or not expected, receive_second=expected)

    def _computed(self, batch: tuple[str, int]) -> Decision:
        return Decision("split") if batch[1] % self.size == 0 else Decision("whole")

    # -- messages -------------------------------------------------------------------------------------------

    def _unguided_message(self, batch: tuple[str, int]) -> str:
        name, size = batch
        separate = (
            f"nor a second (unconditional) call with the same timestep: {self.where} is called once per denoising step"
            if self.step_argument is not None
            else f"and {self.where} has no timestep argument ({', '.join(STEP_ARGUMENTS)}) by which separate"
            " conditional and unconditional calls could be paired"
        )
        return (
            f"cfg parallel (cfg_degree={self.size}) splits the doubled (unconditional, conditional) batch or pairs the"
            f" separate conditional and unconditional DiT calls of each denoising step, but {self.where}({name}=...)"
            f" has batch size {size}, which does not divide by {self.size}, {separate}. Classifier-free guidance must"
            " be on: guidance_scale > 1 (FluxPipeline, QwenImagePipeline, HunyuanVideoPipeline: true_cfg_scale > 1"
            " and a negative_prompt). Otherwise use cfg_degree=1."
        )

    def _many_calls_message(self, key: Tensor | None) -> str:
        return (
            f"cfg parallel (cfg_degree={self.size}) serves one DiT call per denoising step (a doubled batch, split) or"
            f" two (conditional and unconditional, one per cfg rank), but {self.where} was called"
            f" {self.first_calls} times with the same timestep ({describe_key(key)}) in the first step. Use"
            " cfg_degree=1 for this pipeline."
        )

    def _broken_pair_message(self, pair_key: Tensor | None, key: Tensor | None) -> str:
        after = f"before a call with {describe_key(key)}" if key is not None else "at the end of the batch"
        return (
            f"cfg parallel (cfg_degree={self.size}) pairs the two DiT calls (conditional, unconditional) of each"
            f" denoising step, as learned from the first step of the batch, but the step with {describe_key(pair_key)}"
            f" made one call of {self.where} only, {after}. The pipeline changed its call pattern mid-loop (e.g."
            " guidance switched off for some steps: CFG truncation, a guidance interval), which cfg parallelism cannot"
            " serve: the first call's output on cfg rank 1 is a placeholder that only the second call fills. Use"
            " cfg_degree=1 for this pipeline."
        )

    def _separate_message(self) -> str:
        return (
            f"cfg parallel (cfg_degree={self.size}): {self.where} is called twice per denoising step (conditional and"
            f" unconditional calls, timestep {describe_key(self.first_key)}), which cfg parallelism serves by computing"
            f" each call on one cfg rank only, but {self.separate_refused}"
        )
