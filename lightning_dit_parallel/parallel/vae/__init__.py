"""Exact parallel VAE decode: the latent cut into bands along its height over the ranks of a model-parallel group,
halo rows exchanged before every convolution, group-norm statistics reduced over the bands, attention over every
band's tokens, the decoded bands gathered (see ``parallelize.py``)."""

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands, band_rows
from lightning_dit_parallel.parallel.vae.cuts import (
    BUILTIN_CUTS,
    VaeCut,
    find_vaes,
    register_vae_cut,
    unregister_vae_cut,
    vae_cut_for,
)
from lightning_dit_parallel.parallel.vae.parallelize import ParallelVae, apply_parallel_vae

__all__ = [
    "BUILTIN_CUTS",
    "BandGroup",
    "Bands",
    "ParallelVae",
    "VaeCut",
    "apply_parallel_vae",
    "band_rows",
    "find_vaes",
    "register_vae_cut",
    "unregister_vae_cut",
    "vae_cut_for",
]
