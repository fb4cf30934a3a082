"""Plan for diffusers' ``LTXVideoTransformer3DModel`` (LTX-Video: video self-attention with 3-D rotary,
cross-attention to text)."""

from lightning_dit_parallel.plan import DiTPlan, HeadFeatures, LatentFormat, Split, VaeCut

PLAN = DiTPlan(
    # Patchified latents (B, F*H*W, C) are cut along tokens. A per-token timestep (B, F*H*W) (image-to-video and
    # condition pipelines give conditioning tokens t=0) is cut with them; a (B,) one is left whole.
    split_inputs={"hidden_states": Split("video", 1), "timestep": Split("video", 1, ndim=2)},
    # rope computes (cos, sin), each (B, F*H*W, D), from the frame grid or from video_coords: cut along tokens so
    # every rank rotates its own queries and keys.
    split_outputs={"rope": (Split("video", 1), Split("video", 1))},
    # proj_out: (B, S/N, C) -> (B, S, C).
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    self_attention={"transformer_blocks.*.attn1": ("video",)},
    # attn2 attends from the cut video queries to the whole text (with its key-padding mask): no communication.
    cross_attention=("transformer_blocks.*.attn2",),
    # LTXVideoAttnProcessor rotates to_q(x) and to_k(x), (B, S, heads * head_dim), with (cos, sin) of the same
    # width before it splits heads: under tensor parallelism each rank keeps its heads' features of both tables,
    # (B, S, inner) -> (B, S, inner/N).
    tensor_parallel_outputs={"rope": (HeadFeatures(-1), HeadFeatures(-1))},
)

PLANS = {"LTXVideoTransformer3DModel": PLAN}


#: the latent of the family's VAE, for the planner's token count
LATENTS = {"LTXVideoTransformer3DModel": LatentFormat(spatial=32, temporal=8, channels=128)}

#: how the family's VAE is cut for a parallel decode (``parallel/vae/``)
VAE_CUTS = {
    # per-position RMS and layer norms, depth-to-space upsampling; the timestep is not cut; noise maps drawn whole
    "AutoencoderKLLTXVideo": VaeCut(replicated=("temb",), noise=("LTXVideoResnetBlock3d",))
}
