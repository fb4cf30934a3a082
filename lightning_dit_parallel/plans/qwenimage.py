"""Plan for diffusers' ``QwenImageTransformer2DModel`` (MMDiT: joint attention over text and image tokens, a text
mask, complex 3-axis rotary); ``QwenImage21Transformer2DModel`` has none (block-causal attention, see UNSUPPORTED)."""

from lightning_dit_parallel.plan import DiTPlan, Each, Split

PLAN = DiTPlan(
    # Packed latents (B, S, C), condition images (edit models) included, are cut along tokens before img_in.
    # ControlNet residuals: one (B, S, hidden) per controlled block, added to the image tokens in the block loop.
    split_inputs={"hidden_states": Split("image", 1), "controlnet_block_samples": Each(Split("image", 1))},
    block_indexed_inputs=("controlnet_block_samples",),
    # pos_embed returns (image freqs (S, D/2), text freqs (T, D/2)), complex; the text part is read from the table
    # by the whole text length, so the text is cut only after pos_embed ran: here and where the first block
    # receives it, (B, T, hidden).
    split_outputs={"pos_embed": (Split("image", 0), Split("text", 0))},
    split_module_inputs={"transformer_blocks.0": {"encoder_hidden_states": Split("text", 1)}},
    # The forward passes every block the whole text mask (B, T) (the processor builds the joint key mask
    # cat([text mask, ones(image)]) from it and from the block's image tokens) and, for zero_cond_t models, the
    # per-token modulation index (B, S) of target and condition images: both are cut at each block.
    split_module_inputs_each_call={
        "transformer_blocks.*": {
            "encoder_hidden_states_mask": Split("text", 1),
            "modulate_index": Split("image", 1),
        },
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C). The text stream is dropped after the last block.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks",),
    # QwenDoubleStreamAttnProcessor2_0 concatenates text first: cat([txt_query, img_query], dim=1).
    self_attention={"transformer_blocks.*.attn": ("text", "image")},
)

PLANS = {"QwenImageTransformer2DModel": PLAN}

#: Classes of this family that sequence parallelism cannot run exactly, and why.
UNSUPPORTED = {
    "QwenImage21Transformer2DModel": (
        "its attention is block-causal: the attention processor slices queries and keys by global token positions"
        " (one attention call per text or condition-image segment of the prefix, causal within text, then the target"
        " image over all keys), and the KV-cache modes keep the prefix by token count; a sharded sequence cannot"
        " reproduce these, and sequence-parallel attention supports key-padding masks only."
    ),
}
