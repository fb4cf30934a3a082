"""Plans for diffusers' ``SanaTransformer2DModel`` and ``SanaVideoTransformer3DModel`` (linear self-attention,
cross-attention to text, convolutional feed-forward over the token grid)."""

from lightning_dit_parallel.plan import DiTPlan, Each, LatentFormat, Split, TokenGrid, VaeCut

SANA = DiTPlan(
    # PatchEmbed: (B, C, H, W) -> (B, S, hidden), S = H/p * W/p in row-major order.
    split_outputs={"patch_embed": Split("image", 1)},
    # ControlNet residuals: one (B, S, hidden) per block from the second on, added to the image tokens in the loop.
    split_inputs={"controlnet_block_samples": Each(Split("image", 1))},
    block_indexed_inputs=("controlnet_block_samples",),
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks",),
    # SanaLinearAttnProcessor2_0: ReLU linear attention; its sum over tokens is matmul(pad(v, 1), phi(k)), (B, H,
    # D+1, S) @ (B, H, S, D) -> (B, H, D+1, D), all-reduced over the ranks.
    linear_attention={"transformer_blocks.*.attn1": ("image",)},
    # attn2 attends from the sharded image queries to the replicated caption (with its mask): no communication.
    cross_attention=("transformer_blocks.*.attn2",),
    # GLUMBConv: the block unflattens (B, S, C) to (B, C, height, width) for a 3x3 depthwise convolution (1 row of
    # halo); it receives this rank's tokens as a (B, C, 1, S/N) strip and runs on whole rows around them.
    token_grids={"transformer_blocks.*.ff": TokenGrid("image", ("height", "width"), dim=2, halo=1)},
)

SANA_VIDEO = DiTPlan(
    # WanRotaryPosEmbed returns (freqs_cos, freqs_sin), each (1, F*H*W, 1, D): cut like the video tokens they rotate.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # The patch embedding is flattened to (B, F*H*W, hidden) inside the forward, so the tokens are cut where the
    # first block receives them. Per-token timesteps (the image-to-video pipeline's (B, 1, F, H, W) timestep) are
    # not cut and are not supported.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("video", 1)}},
    # ControlNet residuals: one (B, F*H*W, hidden) per block from the second on, added to the video tokens.
    split_inputs={"controlnet_block_samples": Each(Split("video", 1))},
    # proj_out: (B, S/N, p_t*p_h*p_w*C) -> (B, S, p_t*p_h*p_w*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    block_indexed_inputs=("controlnet_block_samples",),
    # SanaLinearAttnProcessor3_0: ReLU linear attention with rotary keys; its sums over tokens are key.sum(-1),
    # (B, H, D, S) -> (B, H, D, 1), and matmul(v, rot(phi(k))^T), (B, H, D, S) @ (B, H, S, D) -> (B, H, D, D), both
    # all-reduced. The only softmax attention is attn2, to the replicated text.
    linear_attention={"transformer_blocks.*.attn1": ("video",)},
    cross_attention=("transformer_blocks.*.attn2",),
    # GLUMBTempConv: the block unflattens (B, S, C) to (B, frames, height, width, C); a 3x3 convolution within each
    # frame, then a 3x1 one over frames: outputs depend on 1 frame on each side.
    token_grids={"transformer_blocks.*.ff": TokenGrid("video", ("frames", "height", "width"), dim=1, halo=1)},
)

PLANS = {"SanaTransformer2DModel": SANA, "SanaVideoTransformer3DModel": SANA_VIDEO}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"SanaTransformer2DModel": LatentFormat(spatial=32, temporal=1, channels=32)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    # Sana's DC-AE: per-position RMS norms, pixel-shuffle upsampling, multi-scale linear attention
    "AutoencoderDC": VaeCut(linear_attention=("SanaMultiscaleLinearAttention",))
}
