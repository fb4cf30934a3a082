"""Plan for diffusers' ``CogVideoXTransformer3DModel`` (text tokens concatenated with video tokens)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split, VaeCut

PLAN = DiTPlan(
    # Rotary (freqs_cos, freqs_sin), each (F*H*W, D), computed by the pipeline for the video tokens only.
    split_inputs={"image_rotary_emb": (Split("video", 0), Split("video", 0))},
    # The patch embedding returns cat([text, video]) and the forward slices it with the text length; both
    # streams are cut where the first block receives them: (B, F*H*W, hidden) and (B, T, hidden).
    split_module_inputs={
        "transformer_blocks.0": {"hidden_states": Split("video", 1), "encoder_hidden_states": Split("text", 1)},
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    # CogVideoXAttnProcessor2_0 concatenates text first: cat([encoder_hidden_states, hidden_states], dim=1).
    self_attention={"transformer_blocks.*.attn1": ("text", "video")},
)

PLANS = {"CogVideoXTransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"CogVideoXTransformer3DModel": LatentFormat(spatial=8, temporal=4, channels=16)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    # decoded a few latent frames at a time, its causal convolutions' cached frames kept per band; the spatial norms'
    # condition is the decoder's own input (the band), upsampled to each layer by a nearest interpolation to a size;
    # the causal convolutions pad the height in their nn.Conv3d child (pad_mode="first"), or with F.pad replicate
    "AutoencoderKLCogVideoX": VaeCut(padding_attributes={"CogVideoXCausalConv3d": "time_causal_padding"})
}
