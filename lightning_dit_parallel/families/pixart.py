"""Plan for diffusers' ``PixArtTransformer2DModel`` (self-attention plus cross-attention to text)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split

PLAN = DiTPlan(
    # PatchEmbed: (B, C, H, W) -> (B, S, hidden).
    split_outputs={"pos_embed": Split("image", 1)},
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks",),
    self_attention={"transformer_blocks.*.attn1": ("image",)},
    # attn2 attends from the sharded image queries to the replicated caption: no communication.
    cross_attention=("transformer_blocks.*.attn2",),
)

PLANS = {"PixArtTransformer2DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"PixArtTransformer2DModel": LatentFormat(spatial=8, temporal=1, channels=4)}
