"""Plans for diffusers' ``QwenImageTransformer2DModel`` (MMDiT: joint attention over text and image tokens, a text
mask, complex 3-axis rotary) and ``QwenImage21Transformer2DModel`` (one joint sequence, block-causal attention: exact
under Ulysses, see QWEN21)."""

from lightning_dit_parallel.plan import DiTPlan, Each, HeadProjections, LatentFormat, Split, VaeCut

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

#: Qwen-Image 2.1: one joint sequence (text rows with condition-image tokens substituted at their slots, then the
#: target image), built inside the forward, with block-causal attention: the SDPA processor slices queries and keys by
#: global token positions (one call per prefix segment), the flex processor takes a BlockMask over them, and the KV
#: cache keeps the prefix by token count. All need the whole sequence, which Ulysses gives each rank after its
#: all-to-all: it is made at the attention projections (HeadProjections), so the processor runs unchanged on every
#: token of this rank's heads. Ring is refused (a ring rank never holds the whole sequence).
QWEN21 = DiTPlan(
    # The joint sequence (B, S, hidden) exists only from the block loop on: cut where the first block receives it.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("joint", 1)}},
    # The per-token modulation selector (S,) (target tokens from the sampled timestep, the rest from t = 0) is passed
    # whole to every block and to norm_out: cut at each call. The rotary table (S, D/2), the key mask (B, S) and the
    # segments stay whole: the attention runs on the whole sequence.
    split_module_inputs_each_call={
        "transformer_blocks.*": {"target_token_mask": Split("joint", 0, ndim=1)},
        "norm_out": {"target_token_mask": Split("joint", 0, ndim=1)},
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C).
    gather_outputs={"proj_out": Split("joint", 1)},
    blocks=("transformer_blocks",),
    head_parallel_attention={"transformer_blocks.*.attn": HeadProjections("joint")},
)

PLANS = {"QwenImageTransformer2DModel": PLAN, "QwenImage21Transformer2DModel": QWEN21}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"QwenImageTransformer2DModel": LatentFormat(spatial=8, temporal=1, channels=16)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    "AutoencoderKLQwenImage": VaeCut(
        attention=("QwenImageAttentionBlock",), padding_attributes={"QwenImageCausalConv3d": "_padding"}
    )
}
