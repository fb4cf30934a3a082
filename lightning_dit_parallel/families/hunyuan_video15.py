"""Plan for diffusers' ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5: dual-stream blocks with joint
attention over video then text tokens, 3-D rotary, a text stream of image, ByT5 and MLLM tokens)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # x_embedder: (B, C, F, H, W) -> (B, F*H*W, hidden); rope returns (freqs_cos, freqs_sin), each (F*H*W, D), for
    # the video tokens only: both cut along tokens.
    split_outputs={"x_embedder": Split("video", 1), "rope": (Split("video", 0), Split("video", 0))},
    # The forward builds the text stream (B, T, hidden) = [image, ByT5, MLLM] tokens after the MLLM token refiner
    # (context_embedder, which attends over the whole text with its own mask), moving every sample's valid tokens
    # first, and its mask (B, T): the stream is cut where the first block receives it, the mask (the same whole
    # tensor for every block) where each block's attention receives it. The processor pads it on the left with
    # True for the video tokens and attends under its outer product, (B, 1, S/N + T/N, S/N + T/N).
    split_module_inputs={"transformer_blocks.0": {"encoder_hidden_states": Split("text", 1)}},
    split_module_inputs_each_call={"transformer_blocks.*.attn": {"attention_mask": Split("text", 1)}},
    # proj_out: (B, F*H*W/N, p_t*p*p*C) -> (B, F*H*W, p_t*p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    # HunyuanVideo15AttnProcessor2_0 concatenates video first: cat([query, encoder_query], dim=1).
    self_attention={"transformer_blocks.*.attn": ("video", "text")},
)

PLANS = {"HunyuanVideo15Transformer3DModel": PLAN}
