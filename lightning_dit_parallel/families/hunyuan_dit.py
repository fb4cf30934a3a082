"""Plan for diffusers' ``HunyuanDiT2DModel`` (self-attention with 2-D rotary, cross-attention to two text encoders,
long skip connections)."""

from lightning_dit_parallel.plan import DiTPlan, Each, Split

PLAN = DiTPlan(
    # The pipeline passes 2-D rotary (cos, sin), each (S, D), for the image tokens in PatchEmbed's row-major order:
    # cut like those tokens, so every rank rotates its own queries and keys.
    # ControlNet residuals: one (B, S, D) per long skip, popped from the end and added to it.
    split_inputs={
        "image_rotary_emb": (Split("image", 0), Split("image", 0)),
        "controlnet_block_samples": Each(Split("image", 1)),
    },
    # PatchEmbed: (B, C, H, W) -> (B, S, hidden). The long skips (first half's block outputs concatenated into the
    # second half's inputs) are per token, so they stay on the rank's shard.
    split_outputs={"pos_embed": Split("image", 1)},
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("blocks",),
    block_indexed_inputs=("controlnet_block_samples",),
    pipeline_unsupported="its second half of blocks adds the long skips of the first half, kept in a list of the"
    " forward (skips.pop()) outside the blocks' arguments, and picks the blocks that take one by their index in the"
    " loop; a pipeline stage would see neither.",
    self_attention={"blocks.*.attn1": ("image",)},
    # attn2 attends from the sharded image queries (rotated with their shard of the rotary) to the replicated
    # concatenation of CLIP and T5 text tokens (padding replaced by a learned embedding in the forward).
    cross_attention=("blocks.*.attn2",),
)

PLANS = {"HunyuanDiT2DModel": PLAN}
