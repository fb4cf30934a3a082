"""CFG parallel: the unconditional and conditional halves of the guided batch run on different ranks."""

from lightning_dit_parallel.cfg.parallelize import CFGParallel, apply_cfg_parallel, check_guided

__all__ = ["CFGParallel", "apply_cfg_parallel", "check_guided"]
