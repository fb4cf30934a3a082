"""Plan for diffusers' ``HunyuanImageTransformer2DModel`` (HunyuanImage 2.1: double- and single-stream blocks over
image then text tokens, a text mask, a text token refiner)."""

from lightning_dit_parallel.plan import Concat, DiTPlan, Split

PLAN = DiTPlan(
    # x_embedder: (B, C, H, W) -> (B, S, hidden); rope returns (freqs_cos, freqs_sin), each (S, D), for the image
    # tokens only. The text token refiner (context_embedder) runs on the whole text with its own (B, 1, T, T) mask,
    # and the forward may then reorder the text with a second (ByT5) stream, so the text (B, T, hidden) is cut where
    # the first block receives it.
    split_outputs={"x_embedder": Split("image", 1), "rope": (Split("image", 0), Split("image", 0))},
    split_module_inputs={"transformer_blocks.0": {"encoder_hidden_states": Split("text", 1)}},
    # Every block gets attention_mask = pad(text mask, (image tokens, 0)), (B, 1, 1, S/N + T), built from the cut
    # image tokens and the whole text: the text part is cut at each block, giving (B, 1, 1, S/N + T/N).
    split_module_inputs_each_call={
        "transformer_blocks.*": {"attention_mask": Concat((None, "text"), -1)},
        "single_transformer_blocks.*": {"attention_mask": Concat((None, "text"), -1)},
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # HunyuanImageAttnProcessor concatenates image first: cat([query, encoder_query], dim=1) in the double-stream
    # blocks, cat([hidden_states, encoder_hidden_states], dim=1) in the single-stream blocks.
    self_attention={
        "transformer_blocks.*.attn": ("image", "text"),
        "single_transformer_blocks.*.attn": ("image", "text"),
    },
)

PLANS = {"HunyuanImageTransformer2DModel": PLAN}
