"""diffusers' ``AutoencoderKL``: the image VAE that the DiT, PixArt, SD3, Flux, HunyuanDiT and other image families
share (no DiT of its own, so no ``PLANS``)."""

from lightning_dit_parallel.plan import VaeCut

#: group norms, nearest upsampling and one mid-block attention over all bands
VAE_CUTS = {"AutoencoderKL": VaeCut(attention=("Attention",))}
