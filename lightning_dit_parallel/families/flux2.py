"""Plan for diffusers' ``Flux2Transformer2DModel`` (Flux 2: double-stream and parallel single-stream blocks, 4-axis
rotary from position ids)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split, VaeCut

PLAN = DiTPlan(
    # Packed latents (B, S, C) and text (B, T, C) are cut along tokens, and so are their position ids (S, 4) and
    # (T, 4) (dim -2 also covers the (B, S, 4) ids the pipeline passes, of which the forward takes sample 0), so that
    # rope = cat([pos_embed(txt_ids), pos_embed(img_ids)]) is computed for exactly this rank's [text, image] shards.
    # The reference-image KV cache (kv_cache_mode "extract" / "cached", Flux2's KV processors) slices the joint
    # sequence by whole token counts; the sharded attention rejects those calls (their lengths do not match the plan).
    split_inputs={
        "hidden_states": Split("image", 1),
        "encoder_hidden_states": Split("text", 1),
        "img_ids": Split("image", -2),
        "txt_ids": Split("text", -2),
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C).
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks", "single_transformer_blocks"),
    self_attention={
        # Flux2AttnProcessor concatenates text first: cat([encoder_query, query], dim=1).
        "transformer_blocks.*.attn": ("text", "image"),
        # Single-stream blocks run on cat([encoder_hidden_states, hidden_states], dim=1), built by the DiT's forward.
        "single_transformer_blocks.*.attn": ("text", "image"),
    },
)

PLANS = {"Flux2Transformer2DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"Flux2Transformer2DModel": LatentFormat(spatial=8, temporal=1, channels=32)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {"AutoencoderKLFlux2": VaeCut(attention=("Attention",))}
