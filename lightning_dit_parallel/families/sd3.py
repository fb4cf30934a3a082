"""Plan for diffusers' ``SD3Transformer2DModel`` (MMDiT: joint attention over image and text tokens)."""

from lightning_dit_parallel.plan import DiTPlan, Each, LatentFormat, Split

PLAN = DiTPlan(
    # PatchEmbed: (B, C, H, W) -> (B, S, hidden) with positions added; context_embedder: (B, T, joint) ->
    # (B, T, hidden). Both token sequences are cut: every block runs on S/N image and T/N text tokens.
    split_outputs={"pos_embed": Split("image", 1), "context_embedder": Split("text", 1)},
    # ControlNet residuals: one (B, S, hidden) per controlled block, added to the image tokens in the block loop.
    split_inputs={"block_controlnet_hidden_states": Each(Split("image", 1))},
    block_indexed_inputs=("block_controlnet_hidden_states",),
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The text stream is dropped after the last block.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks",),
    self_attention={
        # JointAttnProcessor2_0 concatenates image tokens first, then text: cat([query, context_query], dim=2).
        "transformer_blocks.*.attn": ("image", "text"),
        # SD3.5 dual-attention layers add a second self-attention over image tokens only.
        "transformer_blocks.*.attn2": ("image",),
    },
)

PLANS = {"SD3Transformer2DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"SD3Transformer2DModel": LatentFormat(spatial=8, temporal=1, channels=16)}
