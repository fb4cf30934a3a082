"""Plan for diffusers' ``WanTransformer3DModel`` (video self-attention with 3-D rotary, cross-attention to text)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # rope returns (freqs_cos, freqs_sin), each (1, F*H*W, 1, D): cut along tokens so every rank rotates its own
    # queries and keys with their own positions.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # The patch embedding is flattened to (B, F*H*W, hidden) inside the forward (no module returns the token
    # sequence), so the tokens are cut where the first block receives them. Per-token timesteps (Wan 2.2 TI2V,
    # a 2-D ``timestep``) are not cut and are not supported.
    split_module_inputs={"blocks.0": {"hidden_states": Split("video", 1)}},
    # proj_out: (B, S/N, p_t*p_h*p_w*C) -> (B, S, p_t*p_h*p_w*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("blocks",),
    self_attention={"blocks.*.attn1": ("video",)},
    # attn2 attends from the sharded video queries to the replicated text (and image) context.
    cross_attention=("blocks.*.attn2",),
)

PLANS = {"WanTransformer3DModel": PLAN}
