"""Plan for diffusers' ``CosmosTransformer3DModel`` (Cosmos 1.0, Predict2 and 2.5: video self-attention with 3-D
rotary and a learnable position embedding, cross-attention to text and image context)."""

from lightning_dit_parallel.plan import DiTPlan, Each, Split

#: A per-token timestep embedding (B, F*H*W, C), from a per-frame (B, 1, F, 1, 1) timestep; (B, C) ones are whole.
PER_TOKEN = Split("video", 1, ndim=3)

PLAN = DiTPlan(
    # The condition and padding masks are channels of the latents, concatenated before the patch embedding; the
    # patch embedding returns (B, F, H, W, C) and the forward flattens it: the tokens are cut where the first block
    # receives them.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("video", 1)}},
    # ControlNet residuals: one (B, T*H*W, D) per controlled block, added to its hidden states.
    split_inputs={"block_controlnet_hidden_states": Each(Split("video", 1))},
    # rope: (cos, sin), each (F*H*W, D); learnable_pos_embed: (B, F*H*W, C).
    split_outputs={"rope": (Split("video", 0), Split("video", 0)), "learnable_pos_embed": Split("video", 1)},
    # Cosmos-Predict2 and 2.5 configure extra_pos_embed_type=None: no learnable position embedding.
    optional_modules=("learnable_pos_embed",),
    # The forward passes the timestep embeddings whole to every block and to norm_out.
    split_module_inputs_each_call={
        "transformer_blocks.*": {"embedded_timestep": PER_TOKEN, "temb": PER_TOKEN},
        "norm_out": {"embedded_timestep": PER_TOKEN, "temb": PER_TOKEN},
    },
    # proj_out: (B, S/N, p_t*p_h*p_w*C) -> (B, S, p_t*p_h*p_w*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    block_indexed_inputs=("block_controlnet_hidden_states",),
    self_attention={"transformer_blocks.*.attn1": ("video",)},
    # attn2 attends to the whole text (with its key-padding mask) and, in Cosmos 2.5, the image context.
    cross_attention=("transformer_blocks.*.attn2",),
    tensor_parallel_unsupported={
        "transformer_blocks.*.attn2.q_img": "the image-context attention of CosmosAttention (q_img, k_img, v_img)"
        " reshapes into heads of out_dim // heads features, out_dim being the model width: with its heads split"
        " over the ranks that size would be wrong.",
    },
)

PLANS = {"CosmosTransformer3DModel": PLAN}
