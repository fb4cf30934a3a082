"""``PipelineOptions``: how the transformer blocks are pipelined over the ``pp`` mesh axis (validated data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PipelineMode = Literal["microbatch", "pipefusion"]

#: What PipeFusion does, after warm-up, with the cut sequences that the plan does not gather (the text of joint
#: attention): ``"every_patch"``: they go whole with every patch (recomputed M times per step, attending to the
#: freshest image keys); ``"per_step"``: they are cut into patches like the image (each token computed once per
#: step, the previous step's keys and values for the other patches).
TextTokens = Literal["every_patch", "per_step"]

#: PipeFusion's default for ``text_tokens`` (see the README's measurements): no more compute per step than the exact
#: forward, and a deviation of the same size.
DEFAULT_TEXT_TOKENS: TextTokens = "per_step"


@dataclass(frozen=True)
class PipelineOptions:
    """Options of pipeline parallelism; the number of stages is the layout's ``pp`` degree.

    Args:
        mode: ``"microbatch"`` (exact: the batch reaching the DiT is cut into micro-batches that flow through
            the stages) or ``"pipefusion"`` (approximate: the token sequence is cut into patches that flow
            through the stages; attention uses the previous step's keys/values for patches not yet computed).
        num_patches: PipeFusion patches per step; ``None``: as many as stages. At most the token count of every
            patched sequence (patches need not divide it: the first ones take one token more).
        warmup_steps: PipeFusion steps per batch that run unpatched (exact) and fill the key/value caches.
        layers_per_stage: blocks per stage, in stage order; ``None`` splits the blocks evenly (earlier stages take
            one more when the count does not divide). Must sum to the number of blocks of the plan.
        num_microbatches: micro-batches per DiT call in ``"microbatch"`` mode; ``None``: as many as stages.
            Capped at the batch size of each call (a micro-batch holds at least one row).
        text_tokens: PipeFusion only: ``"every_patch"`` or ``"per_step"`` (see ``TextTokens``); ``None``: the
            default, ``DEFAULT_TEXT_TOKENS``.

    Raises:
        ValueError: for an unknown mode, a count that is not a positive integer (``warmup_steps`` may be 0), or
            ``num_patches`` / ``num_microbatches`` given for the other mode (it would be ignored).
    """

    mode: PipelineMode = "microbatch"
    num_patches: int | None = None
    warmup_steps: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    num_microbatches: int | None = None
    text_tokens: TextTokens | None = None

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
        if self.text_tokens is not None and self.text_tokens not in ("every_patch", "per_step"):
            raise ValueError(
                f"text_tokens must be 'every_patch', 'per_step' or None; got {self.text_tokens!r} ({self.describe()})."
            )
        if self.mode == "microbatch" and self.text_tokens is not None:
            raise ValueError(f"text_tokens is a PipeFusion option, but mode='microbatch' ({self.describe()}).")
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
            + (f" text_tokens={self.text_tokens}" if self.text_tokens is not None else "")
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
