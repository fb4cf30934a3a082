"""The plan language: the data that says how one DiT class is parallelized (``dit_plan.py``), where a class's plan
comes from (``registry.py``: registered plans, ``dit_plan`` attributes, the family files in ``families/``,
diffusers' ``_cp_plan`` translated by ``cp_plan.py``), a plan bound to one model's config (``optional.py``) and
the cutting of values by a plan's splits (``splits.py``).

The names of ``dit_plan.py`` are importable from here: ``from lightning_dit_parallel.plan import DiTPlan, Split``.
"""

from lightning_dit_parallel.plan.dit_plan import (
    TENSOR_PARALLEL_STYLES,
    Concat,
    DiTPlan,
    Each,
    HeadFeatures,
    HeadFeaturesSpec,
    HeadProjections,
    Packed,
    PrefixCount,
    Split,
    SplitSpec,
    TensorParallelStyle,
    TokenGrid,
    is_within,
    module_paths,
)

__all__ = [
    "TENSOR_PARALLEL_STYLES",
    "Concat",
    "DiTPlan",
    "Each",
    "HeadFeatures",
    "HeadFeaturesSpec",
    "HeadProjections",
    "Packed",
    "PrefixCount",
    "Split",
    "SplitSpec",
    "TensorParallelStyle",
    "TokenGrid",
    "is_within",
    "module_paths",
]
