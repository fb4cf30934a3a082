"""Exact parallel VAE decode: the latent cut into bands along its height over the ranks of a model-parallel group,
halo rows exchanged before every convolution, group-norm statistics reduced over the bands, attention over every
band's tokens, the decoded bands gathered (see ``parallelize.py``)."""

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands, band_rows
from lightning_dit_parallel.parallel.vae.cuts import find_vaes
from lightning_dit_parallel.parallel.vae.parallelize import ParallelVae, apply_parallel_vae
from lightning_dit_parallel.plan import VaeCut
from lightning_dit_parallel.registry import register_vae_cut, unregister_vae_cut, vae_cut_for

__all__ = [
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
