"""DistriFusion (displaced patch parallelism): every rank computes its patch of the tokens through the whole model,
attending to the previous step's keys and values of the other patches, which travel while the step computes."""

from lightning_dit_parallel.parallel.distrifusion.options import DistriFusionOptions
from lightning_dit_parallel.parallel.distrifusion.parallelize import DistriFusion, apply_distrifusion

__all__ = ["DistriFusion", "DistriFusionOptions", "apply_distrifusion"]
