"""Plan for diffusers' ``WanTransformer3DModel`` (video self-attention with 3-D rotary, cross-attention to text)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split, VaeCut

PLAN = DiTPlan(
    # Wan 2.2 TI2V gives every video token its own timestep, a (B, F*H*W) ``timestep``: it is cut along tokens,
    # (B, S) -> (B, S/N), so the condition embedder computes this rank's per-token modulation, (B, S/N, 6, hidden)
    # for the blocks and (B, S/N, hidden) for the output norm. A (B,) timestep (Wan 2.1, Wan 2.2 T2V/I2V) is left
    # whole.
    split_inputs={"timestep": Split("video", 1, ndim=2)},
    # rope returns (freqs_cos, freqs_sin), each (1, F*H*W, 1, D): cut along tokens so every rank rotates its own
    # queries and keys with their own positions.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # The patch embedding is flattened to (B, F*H*W, hidden) inside the forward (no module returns the token
    # sequence), so the tokens are cut where the first block receives them.
    split_module_inputs={"blocks.0": {"hidden_states": Split("video", 1)}},
    # proj_out: (B, S/N, p_t*p_h*p_w*C) -> (B, S, p_t*p_h*p_w*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("blocks",),
    self_attention={"blocks.*.attn1": ("video",)},
    # attn2 attends from the sharded video queries to the replicated text (and image) context.
    cross_attention=("blocks.*.attn2",),
)

PLANS = {"WanTransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"WanTransformer3DModel": LatentFormat(spatial=8, temporal=4, channels=16)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    "AutoencoderKLWan": VaeCut(attention=("WanAttentionBlock",), padding_attributes={"WanCausalConv3d": "_padding"})
}
