"""Plan for diffusers' ``ChromaTransformer2DModel`` (Flux-like double- and single-stream blocks with a text mask)."""

from lightning_dit_parallel.plan import Concat, DiTPlan, Each, Split

PLAN = DiTPlan(
    # As Flux: packed latents (B, S, C), text (B, T, C) and their position ids (S, 3), (T, 3) are cut along tokens, so
    # that rope = pos_embed(cat([txt_ids, img_ids])) covers exactly this rank's [text, image] shards. The pipeline's
    # attention_mask (B, T + S) is over cat([text, image]) tokens: each part is cut like its sequence, giving
    # (B, T/N + S/N); the blocks make it (B, 1, T/N + S/N, T/N + S/N) = m_q * m_k, and the sharded attention reads
    # its key part (a boolean mask; the pipeline's float 0/1 mask is additive and depends on the query, which the
    # sharded attention rejects).
    split_inputs={
        "hidden_states": Split("image", 1),
        "encoder_hidden_states": Split("text", 1),
        "img_ids": Split("image", -2),
        "txt_ids": Split("text", -2),
        "attention_mask": Concat(("text", "image"), 1),
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

PLANS = {"ChromaTransformer2DModel": PLAN}
