"""Plan for diffusers' ``LTX2VideoTransformer3DModel`` (LTX-2: video and audio token streams, self-attention within
each, cross-attention to text, and attention between the two streams)."""

from lightning_dit_parallel.plan import DiTPlan, HeadFeatures, Split

#: Rotary (cos, sin) of one stream, (B, S, D) interleaved or (B, H, S, D/2) "split": the tokens are dim -2 of both.
VIDEO_ROTARY = (Split("video", -2), Split("video", -2))
AUDIO_ROTARY = (Split("audio", -2), Split("audio", -2))
#: The heads' values of a rotary table: interleaved (B, S, heads * head_dim) at dim -1, "split" (B, heads, S, D/2) at 1.
HEADS_ROTARY = (HeadFeatures(-1, by_ndim={4: 1}), HeadFeatures(-1, by_ndim={4: 1}))

PLAN = DiTPlan(
    # Video (B, Sv, C) and audio (B, Sa, C) latents are cut, each along its own tokens; so are per-token timesteps
    # (B, Sv) and (B, Sa) (a (B,) timestep or sigma is left whole) and the keyframe marker (B, Sv, 1).
    split_inputs={
        "hidden_states": Split("video", 1),
        "audio_hidden_states": Split("audio", 1),
        "timestep": Split("video", 1, ndim=2),
        "audio_timestep": Split("audio", 1, ndim=2),
        "video_keyframes_mask": Split("video", 1),
    },
    # Rotary tables are computed from the whole coordinates, (B, 3, Sv, 2) and (B, 1, Sa, 2), and cut along tokens:
    # those of the self-attentions and the temporal ones of the audio-video attentions.
    split_outputs={
        "rope": VIDEO_ROTARY,
        "audio_rope": AUDIO_ROTARY,
        "cross_attn_rope": VIDEO_ROTARY,
        "cross_attn_audio_rope": AUDIO_ROTARY,
    },
    # The audio-to-video attention attends from the cut video queries to all audio keys, the video-to-audio one from
    # the cut audio queries to all video keys: their key stream and its key rotary are gathered before they run,
    # (B, S/N, C) -> (B, S, C), and they attend as cross-attention.
    gather_module_inputs={
        "transformer_blocks.*.audio_to_video_attn": {
            "encoder_hidden_states": Split("audio", 1),
            "key_rotary_emb": AUDIO_ROTARY,
        },
        "transformer_blocks.*.video_to_audio_attn": {
            "encoder_hidden_states": Split("video", 1),
            "key_rotary_emb": VIDEO_ROTARY,
        },
    },
    # proj_out: (B, Sv/N, C) -> (B, Sv, C); audio_proj_out: (B, Sa/N, C) -> (B, Sa, C).
    gather_outputs={"proj_out": Split("video", 1), "audio_proj_out": Split("audio", 1)},
    blocks=("transformer_blocks",),
    self_attention={"transformer_blocks.*.attn1": ("video",), "transformer_blocks.*.audio_attn1": ("audio",)},
    # attn2 / audio_attn2 attend to the whole text of their stream (with its key-padding mask).
    cross_attention=(
        "transformer_blocks.*.attn2",
        "transformer_blocks.*.audio_attn2",
        "transformer_blocks.*.audio_to_video_attn",
        "transformer_blocks.*.video_to_audio_attn",
    ),
    # Every attention of the blocks rotates its projected features, all heads at once, with tables computed before
    # the blocks: under tensor parallelism each rank keeps its heads' part of each table.
    tensor_parallel_outputs={
        "rope": HEADS_ROTARY,
        "audio_rope": HEADS_ROTARY,
        "cross_attn_rope": HEADS_ROTARY,
        "cross_attn_audio_rope": HEADS_ROTARY,
    },
)

PLANS = {"LTX2VideoTransformer3DModel": PLAN}
