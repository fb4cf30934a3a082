"""Plan for diffusers' ``AuraFlowTransformer2DModel`` (MMDiT blocks, then single blocks over cat([text, image]);
learned register tokens prepended to the text inside the forward)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # AuraFlowPatchEmbed: (B, C, H, W) -> (B, S, hidden) with its learned positions added.
    split_outputs={"pos_embed": Split("image", 1)},
    # The forward prepends the 8 register tokens to the embedded text: context = cat([registers, text]) (B, 8 + T,
    # hidden) exists as one tensor only from there, so this "context" stream (registers and text together) is cut
    # where the first MMDiT block receives it. A configuration without MMDiT blocks has no such point.
    split_module_inputs={"joint_transformer_blocks.0": {"encoder_hidden_states": Split("context", 1)}},
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The context stream is dropped.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("joint_transformer_blocks", "single_transformer_blocks"),
    self_attention={
        # AuraFlowAttnProcessor2_0 concatenates the context first: cat([context_query, query], dim=1).
        "joint_transformer_blocks.*.attn": ("context", "image"),
        # Single blocks attend over the forward's cat([encoder_hidden_states, hidden_states], dim=1).
        "single_transformer_blocks.*.attn": ("context", "image"),
    },
)

PLANS = {"AuraFlowTransformer2DModel": PLAN}
