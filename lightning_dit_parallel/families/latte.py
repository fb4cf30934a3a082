"""Plan for diffusers' ``LatteTransformer3DModel`` (spatial blocks attend within a frame, temporal blocks across
the frames of one spatial position; the forward reshapes the tokens between the two)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # One cut serves both kinds of block: the spatial positions. pos_embed returns the patches of every frame,
    # (B*F, P, hidden), cut to (B*F, P/N, hidden); the forward's reshape between the blocks,
    # (B*F, P/N, hidden) <-> (B*P/N, F, hidden), then gives the temporal blocks all frames of this rank's positions.
    split_outputs={"pos_embed": Split("image", 1)},
    # The temporal blocks' timestep embedding is repeated per position, (B*P, 6*hidden), rows b*P + p: it is cut per
    # sample with the positions, (B*P, 6*hidden) -> (B*P/N, 6*hidden), at every call.
    split_module_inputs_each_call={"temporal_transformer_blocks.*": {"timestep": Split("image", 0, folded=True)}},
    # proj_out: (B*F, P/N, p*p*C) -> (B*F, P, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("image", 1)},
    blocks=("transformer_blocks", "temporal_transformer_blocks"),
    pipeline_unsupported="its forward runs the two block lists in lockstep, zip(transformer_blocks,"
    " temporal_transformer_blocks), so a stage cannot hold a run of consecutive blocks.",
    # Spatial self-attention runs over the cut positions of each frame (batch B*F).
    self_attention={"transformer_blocks.*.attn1": ("image",)},
    # The spatial blocks' attn2 attends to the replicated text, repeated per frame (B*F, T, hidden). The temporal
    # blocks' attn1 attends over the F frames of each position (batch B*P/N), which every rank holds whole: it keeps
    # the local kernel and is listed in neither pattern.
    cross_attention=("transformer_blocks.*.attn2",),
)

PLANS = {"LatteTransformer3DModel": PLAN}
