"""CFG parallel: the unconditional and conditional DiT work (halves of a doubled batch, or two separate calls per
denoising step) runs on different ranks."""

from lightning_dit_parallel.parallel.guidance.parallelize import CFGParallel, apply_cfg_parallel, check_guided

__all__ = ["CFGParallel", "apply_cfg_parallel", "check_guided"]
