"""The plan language: the data that says how one DiT class is parallelized (``dit_plan.py``), diffusers'
``_cp_plan`` translated into a plan (``cp_plan.py``), a plan bound to one model's config (``optional.py``) and the
cutting of values by a plan's splits (``splits.py``); the other facts a family file declares: how its VAE is cut for
a parallel decode (``vae_cut.py``) and its latent format (``latents.py``). Where a class's plan is found (registered
plans, ``dit_plan`` attributes, the family files, ``_cp_plan``): ``lightning_dit_parallel/registry.py``.

The names of ``dit_plan.py``, ``vae_cut.py`` and ``latents.py`` are importable from here:
``from lightning_dit_parallel.plan import DiTPlan, Split``.
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
from lightning_dit_parallel.plan.latents import LatentFormat
from lightning_dit_parallel.plan.vae_cut import VaeCut

__all__ = [
    "TENSOR_PARALLEL_STYLES",
    "Concat",
    "DiTPlan",
    "Each",
    "HeadFeatures",
    "HeadFeaturesSpec",
    "HeadProjections",
    "LatentFormat",
    "Packed",
    "PrefixCount",
    "Split",
    "SplitSpec",
    "TensorParallelStyle",
    "TokenGrid",
    "VaeCut",
    "is_within",
    "module_paths",
]
