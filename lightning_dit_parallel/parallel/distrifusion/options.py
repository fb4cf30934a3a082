"""``DistriFusionOptions``: how displaced patch parallelism runs over the layout's sequence-parallel axis."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistriFusionOptions:
    """Options of DistriFusion; the number of patches is the layout's ``ring`` degree.

    Args:
        warmup_steps: DiT calls per batch (denoising steps) that attend over fresh keys and values of every patch
            (exact: sequence parallelism with all-gathered keys and values); later calls use the previous step's
            keys and values of the other patches, which travel while the step computes. At least 1: the first step
            has no step before it whose keys and values it could use.

    Raises:
        ValueError: for ``warmup_steps`` that is not an integer >= 1.
    """

    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(
                f"DistriFusion warmup_steps must be an integer >= 1 (the first step has no previous step's keys and"
                f" values to use); got {self.warmup_steps!r}."
            )

    def describe(self) -> str:
        return f"distrifusion warmup_steps={self.warmup_steps}"
