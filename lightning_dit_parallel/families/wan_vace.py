"""Plan for diffusers' ``WanVACETransformer3DModel`` (Wan with VACE control: blocks over a control stream whose
outputs are added to the main blocks' hidden states as hints)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split

PLAN = DiTPlan(
    # rope returns (freqs_cos, freqs_sin), each (1, F*H*W, 1, D): cut along tokens; the main and the VACE blocks
    # rotate with the same angles.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # Both patch embeddings are flattened to (B, F*H*W, hidden) inside the forward; the control tokens are padded
    # with zeros to the video's length, so the control stream is token-aligned with the video. The VACE blocks run
    # first: the first one receives both streams (it adds the video to its projected control tokens) and both are
    # cut there, the same way; the later VACE blocks get the cut control stream from it, and their hints
    # (B, S/N, hidden) are added to the cut video tokens of the main blocks. The main stream is cut again, from the
    # same whole tensor, where the first main block receives it.
    split_module_inputs={
        "vace_blocks.0": {"hidden_states": Split("video", 1), "control_hidden_states": Split("video", 1)},
        "blocks.0": {"hidden_states": Split("video", 1)},
    },
    # proj_out: (B, S/N, p_t*p_h*p_w*C) -> (B, S, p_t*p_h*p_w*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("vace_blocks", "blocks"),
    pipeline_unsupported="its main blocks add the VACE blocks' hints, kept in a list outside the blocks' arguments,"
    " by the block's index in the loop.",
    self_attention={"blocks.*.attn1": ("video",), "vace_blocks.*.attn1": ("video",)},
    # attn2 attends from the cut video (or control) queries to the replicated text (and image) context.
    cross_attention=("blocks.*.attn2", "vace_blocks.*.attn2"),
)

PLANS = {"WanVACETransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"WanVACETransformer3DModel": LatentFormat(spatial=8, temporal=4, channels=16)}
