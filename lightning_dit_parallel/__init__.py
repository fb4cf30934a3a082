"""Parallel inference for Diffusion Transformers inside a Lightning ``Trainer.predict``.

Importing the package registers the strategy names (``dit_ulysses``, ``dit_ring``, ``dit_usp``,
``dit_fsdp``, ``dit_pipeline``, ``dit_pipefusion``, ``dit_distrifusion``, ``dit_tp``, ``dit_hybrid``, ``dit_auto``)
with Lightning.
"""

from lightning_dit_parallel.app.plan_check import PlanCheck, check_plan
from lightning_dit_parallel.parallel.compose import parallelize
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.plan import (
    Concat,
    DiTPlan,
    Each,
    HeadFeatures,
    HeadProjections,
    Packed,
    PrefixCount,
    Split,
    TokenGrid,
    VaeCut,
)
from lightning_dit_parallel.planner import plan_layouts
from lightning_dit_parallel.registry import (
    plan_for,
    register_plan,
    register_vae_cut,
    unregister_plan,
    unregister_vae_cut,
)
from lightning_dit_parallel.strategies import (
    AutoOptions,
    DistriFusionOptions,
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PatchParallelStrategy,
    PipelineOptions,
    PipelineStrategy,
    SequenceParallelStrategy,
    TensorParallelStrategy,
    register_all,
)

register_all()

__all__ = [
    "AutoOptions",
    "Concat",
    "DiTParallelStrategy",
    "DistriFusionOptions",
    "DiTPlan",
    "Each",
    "HeadProjections",
    "HeadFeatures",
    "Packed",
    "FSDPInferenceStrategy",
    "PatchParallelStrategy",
    "PipelineOptions",
    "PipelineStrategy",
    "ParallelLayout",
    "PlanCheck",
    "PrefixCount",
    "SequenceParallelStrategy",
    "Split",
    "TensorParallelStrategy",
    "TokenGrid",
    "VaeCut",
    "check_plan",
    "parallelize",
    "plan_layouts",
    "plan_for",
    "register_plan",
    "register_vae_cut",
    "unregister_plan",
    "unregister_vae_cut",
]
__version__ = "0.1.0"
