"""Plan for diffusers' ``CogView4Transformer2DModel`` (joint attention over cat([text, image]), rotary on the image
part only)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # A rotary table (cos, sin), each (S, D), passed precomputed or made by ``rope`` from the latents' size: cut along
    # tokens, so every rank rotates its own image queries and keys. The text mask (B, T) is cut with the text; the
    # attention processor builds its (B, 1, T/N + S/N, T/N + S/N) mask from the local lengths. That mask is the float
    # outer product m_q * m_k of 0/1 values (additive, and different for padded text queries), which the sharded
    # attention rejects: pass no mask (the pipeline passes none) or text without padding.
    split_inputs={
        "image_rotary_emb": (Split("image", 0), Split("image", 0)),
        "attention_mask": Split("text", 1),
    },
    # CogView4PatchEmbed returns (image (B, S, hidden), text (B, T, hidden)); both are cut along tokens.
    split_outputs={
        "rope": (Split("image", 0), Split("image", 0)),
        "patch_embed": (Split("image", 1), Split("text", 1)),
    },
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks",),
    # CogView4AttnProcessor concatenates text first: cat([encoder_hidden_states, hidden_states], dim=1), and rotates
    # the tokens after the (local) text length.
    self_attention={"transformer_blocks.*.attn1": ("text", "image")},
)

PLANS = {"CogView4Transformer2DModel": PLAN}
