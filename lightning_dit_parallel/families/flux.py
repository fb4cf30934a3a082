"""Plan for diffusers' ``FluxTransformer2DModel`` (double-stream and single-stream blocks, 3-axis rotary)."""

from lightning_dit_parallel.plan import DiTPlan, Each, LatentFormat, Split

PLAN = DiTPlan(
    # Packed latents (B, S, C) and text (B, T, C) are cut along tokens; so are their position ids (S, 3) and
    # (T, 3), so that rope = pos_embed(cat([txt_ids, img_ids])) is computed for exactly this rank's
    # [text shard, image shard] (dim -2 also covers the deprecated (1, S, 3) ids).
    split_inputs={
        "hidden_states": Split("image", 1),
        "encoder_hidden_states": Split("text", 1),
        "img_ids": Split("image", -2),
        "txt_ids": Split("text", -2),
        # ControlNet residuals: one (B, S, D) per controlled block, added to the image tokens in the block loop
        "controlnet_block_samples": Each(Split("image", 1)),
        "controlnet_single_block_samples": Each(Split("image", 1)),
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C).
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks", "single_transformer_blocks"),
    block_indexed_inputs=("controlnet_block_samples", "controlnet_single_block_samples"),
    self_attention={
        # FluxAttnProcessor concatenates text first: cat([encoder_query, query], dim=1).
        "transformer_blocks.*.attn": ("text", "image"),
        # Single-stream blocks attend over cat([encoder_hidden_states, hidden_states], dim=1): text first.
        "single_transformer_blocks.*.attn": ("text", "image"),
    },
)

PLANS = {"FluxTransformer2DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"FluxTransformer2DModel": LatentFormat(spatial=8, temporal=1, channels=16)}
