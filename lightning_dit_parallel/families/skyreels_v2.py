"""Plan for diffusers' ``SkyReelsV2Transformer3DModel`` (Wan-like video DiT; diffusion forcing gives every frame its
own timestep)."""

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split

PLAN = DiTPlan(
    # rope returns (freqs_cos, freqs_sin), each (1, F*H*W, 1, D): cut along tokens.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # The patch embedding is flattened to (B, F*H*W, hidden) inside the forward: cut where the first block gets it.
    split_module_inputs={"blocks.0": {"hidden_states": Split("video", 1)}},
    split_module_inputs_each_call={
        "blocks.*": {
            # Diffusion forcing (a (B, F) timestep): the forward repeats each frame's modulation over the frame's
            # tokens, (B, 6, F*H*W, hidden), and passes it to every block: cut with the tokens, (B, 6, S/N, hidden).
            # Without it the modulation is per sample, (B, 6, hidden), and stays whole.
            "temb": Split("video", 2, ndim=4),
            # With num_frame_per_block > 1 the forward passes a block-causal (1, 1, S, S) mask over the frames: its
            # keys are cut, (1, 1, S, S/N), and sequence-parallel attention rejects it because it depends on the
            # query (a causal mask needs the whole query-key block of each shard pair).
            "attention_mask": Split("video", -1),
        },
    },
    # The output norm is modulated per token under diffusion forcing ((B, S, hidden), computed whole in the forward),
    # so the tokens are gathered before it: norm_out: (B, S/N, hidden) -> (B, S, hidden); proj_out then runs on the
    # whole sequence.
    gather_outputs={"norm_out": Split("video", 1)},
    blocks=("blocks",),
    self_attention={"blocks.*.attn1": ("video",)},
    # attn2 attends from the cut video queries to the replicated text (and image) context.
    cross_attention=("blocks.*.attn2",),
)

PLANS = {"SkyReelsV2Transformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"SkyReelsV2Transformer3DModel": LatentFormat(spatial=8, temporal=4, channels=16)}
