"""Plan for diffusers' ``HunyuanVideoTransformer3DModel`` (dual-stream then single-stream blocks with joint
attention over video then text tokens, a text mask, a text token refiner, 3-D rotary)."""

from lightning_dit_parallel.plan import Concat, DiTPlan, LatentFormat, PrefixCount, Split, VaeCut

PLAN = DiTPlan(
    # x_embedder: (B, C, F, H, W) -> (B, F*H*W, hidden); rope returns (freqs_cos, freqs_sin), each (F*H*W, D), for
    # the video tokens only: both cut along tokens.
    split_outputs={"x_embedder": Split("video", 1), "rope": (Split("video", 0), Split("video", 0))},
    # The text token refiner (context_embedder) attends over the whole text with its own (B, 1, T, T) mask and pools
    # it, so the text (B, T, hidden) is cut where the first block receives it.
    split_module_inputs={"transformer_blocks.0": {"encoder_hidden_states": Split("text", 1)}},
    # The forward builds one key mask (B, 1, 1, S/N + T) over [cut video tokens, whole text] and passes it to every
    # block: its text part is cut where each block's attention receives it, giving (B, 1, 1, S/N + T/N). The I2V
    # blocks (image_condition_type="token_replace") modulate the first frame's tokens, x[:, :num_tokens], on their
    # own: the first-frame token count every block receives is cut to the number of those tokens on this rank (the
    # other blocks take it among their *args and ignore it).
    split_module_inputs_each_call={
        "transformer_blocks.*": {"num_tokens": PrefixCount("video")},
        "single_transformer_blocks.*": {"num_tokens": PrefixCount("video")},
        "transformer_blocks.*.attn": {"attention_mask": Concat((None, "text"), -1)},
        "single_transformer_blocks.*.attn": {"attention_mask": Concat((None, "text"), -1)},
    },
    # proj_out: (B, F*H*W/N, p_t*p*p*C) -> (B, F*H*W, p_t*p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # HunyuanVideoAttnProcessor2_0 concatenates video first: cat([query, encoder_query], dim=1) in the dual-stream
    # blocks, cat([hidden_states, encoder_hidden_states], dim=1) in the single-stream blocks; rotary is applied to
    # the video part only.
    self_attention={
        "transformer_blocks.*.attn": ("video", "text"),
        "single_transformer_blocks.*.attn": ("video", "text"),
    },
)

PLANS = {"HunyuanVideoTransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"HunyuanVideoTransformer3DModel": LatentFormat(spatial=8, temporal=4, channels=16)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    # causal convolutions padded by F.pad replicate around an unpadded nn.Conv3d; frame-causal mid-block attention
    "AutoencoderKLHunyuanVideo": VaeCut(
        attention=("Attention",),
        attention_masks="frame_causal",
        padding_attributes={"HunyuanVideoCausalConv3d": "time_causal_padding"},
    )
}
