"""Plan for diffusers' ``DiTTransformer2DModel`` (class-conditional DiT, self-attention only)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split

PLAN = DiTPlan(
    # PatchEmbed: (B, C, H, W) -> (B, S, hidden); the sequence is cut after the positional embedding is added.
    split_outputs={"pos_embed": Split("image", 1)},
    # proj_out_2: (B, S/N, p*p*C) is gathered to (B, S, p*p*C) before unpatchify reads S.
    gather_outputs={"proj_out_2": Split("image", 1)},
    blocks=("transformer_blocks",),
    self_attention={"transformer_blocks.*.attn1": ("image",)},
    # The final layer calls transformer_blocks[0].norm1.emb (timestep + class embedding) after the loop.
    shared_modules=("transformer_blocks.0.norm1.emb",),
)

PLANS = {"DiTTransformer2DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"DiTTransformer2DModel": LatentFormat(spatial=8, temporal=1, channels=4)}
