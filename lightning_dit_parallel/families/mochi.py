"""Plan for diffusers' ``MochiTransformer3DModel`` (asymmetric joint attention over video and the kept text tokens,
3-D rotary on the video tokens)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split, VaeCut

PLAN = DiTPlan(
    # The patch embedding runs per frame and the forward flattens it to (B, F*H*W, C): the tokens are cut where the
    # first block receives them.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("video", 1)}},
    # rope returns (cos, sin), each (F*H*W, heads, D/2).
    split_outputs={"rope": (Split("video", 0), Split("video", 0))},
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    # MochiAttnProcessor2_0 attends one sample at a time over cat([video, text tokens the mask keeps]). The text
    # stream (B, T, C) and its mask are left whole, so every rank keeps the same text tokens; the kernel cuts them
    # per call and gathers their output rows (the text stream's own layers run on every rank; T << F*H*W).
    replicated_tail_attention={"transformer_blocks.*.attn1": ("video",)},
)

PLANS = {"MochiTransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"MochiTransformer3DModel": LatentFormat(spatial=8, temporal=6, channels=12)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    # CogVideoX's causal convolutions in replicate mode; per-frame group norms; the decoder has no attention
    "AutoencoderKLMochi": VaeCut(padding_attributes={"CogVideoXCausalConv3d": "time_causal_padding"})
}
