"""``PipelineOptions``: how the transformer blocks are pipelined over the ``pp`` mesh axis (validated data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PipelineMode = Literal["microbatch", "pipefusion"]


@dataclass(frozen=True)
class PipelineOptions:
    """Options of pipeline parallelism; the number of stages is the layout's ``pp`` degree.

    Args:
        mode: ``"microbatch"`` (exact: the batch reaching the DiT is cut into micro-batches that flow through
            the stages) or ``"pipefusion"`` (approximate: the token sequence is cut into patches that flow
            through the stages; attention uses the previous step's keys/values for patches not yet computed).
        num_patches: PipeFusion patches per step; ``None``: as many as stages. The token count must divide by it.
        warmup_steps: PipeFusion steps per batch that run unpatched (exact) and fill the key/value caches.
        layers_per_stage: blocks per stage, in stage order; ``None`` splits the blocks evenly (earlier stages take
            one more when the count does not divide). Must sum to the number of blocks of the plan.
        num_microbatches: micro-batches per DiT call in ``"microbatch"`` mode; ``None``: as many as stages.
            Capped at the batch size of each call (a micro-batch holds at least one row).

    Raises:
        ValueError: for an unknown mode, a count that is not a positive integer (``warmup_steps`` may be 0), or
            ``num_patches`` / ``num_microbatches`` given for the other mode (it would be ignored).
    """

    mode: PipelineMode = "microbatch"
    num_patches: int | None = None
    warmup_steps: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    num_microbatches: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("microbatch", "pipefusion"):
            raise ValueError(
                f"pipeline mode must be 'microbatch' or 'pipefusion'; got {self.mode!r} ({self.describe()})."
            )
        for name in ("num_patches", "num_microbatches"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer or None; got {value!r} ({self.describe()}).")
        if self.mode == "microbatch" and self.num_patches is not None:
            raise ValueError(
                f"num_patches is a PipeFusion option, but mode='microbatch' (use num_microbatches) ({self.describe()})."
            )
        if self.mode == "pipefusion" and self.num_microbatches is not None:
            raise ValueError(
                f"num_microbatches is a micro-batch option, but mode='pipefusion' (use num_patches)"
                f" ({self.describe()})."
            )
        if not (_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r} ({self.describe()}).")
        if self.layers_per_stage is not None:
            layers = tuple(self.layers_per_stage)
            if not layers or not all(_positive_int(n) for n in layers):
                raise ValueError(
                    f"layers_per_stage must be positive integers, one per stage; got {self.layers_per_stage!r}"
                    f" ({self.describe()})."
                )
            object.__setattr__(self, "layers_per_stage", layers)

    def describe(self) -> str:
        """One line naming every value."""
        return (
            f"mode={self.mode} num_patches={self.num_patches} warmup_steps={self.warmup_steps}"
            f" layers_per_stage={self.layers_per_stage} num_microbatches={self.num_microbatches}"
        )

    def check_stages(self, stages: int) -> None:
        """Check the options against the number of stages (pure computation, same verdict on every rank)."""
        if self.layers_per_stage is not None and len(self.layers_per_stage) != stages:
            raise ValueError(
                f"layers_per_stage has {len(self.layers_per_stage)} entries {list(self.layers_per_stage)} but there are"
                f" {stages} pipeline stages (pp degree); give one count per stage."
            )


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _int(value) and value >= 1
