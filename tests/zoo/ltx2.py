"""LTX-2: video and audio streams (each cut along its own tokens), rotary tables from coordinates, audio-video
attention both ways, text masks; "split" rotary with gated attention and prompt modulation (LTX-2.3) in one case.

One block: its five sharp attentions in a row amplify the ring kernel's float32 softmax statistics, and a second block
takes ring layouts to ~1e-5 (in float64 Ulysses matches to 1e-16, so the plan itself is exact)."""

import torch
from diffusers import LTX2VideoTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, CHANNELS, AUDIO_CHANNELS = 16, 8, 6


def build(ltx23: bool = False):
    def factory() -> LTX2VideoTransformer3DModel:
        return LTX2VideoTransformer3DModel(
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            audio_in_channels=AUDIO_CHANNELS,
            audio_out_channels=AUDIO_CHANNELS,
            audio_num_attention_heads=4,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=16,
            num_layers=1,
            caption_channels=TEXT_DIM,
            rope_type="split" if ltx23 else "interleaved",
            gated_attn=ltx23,
            audio_gated_attn=ltx23,
            cross_attn_mod=ltx23,
            audio_cross_attn_mod=ltx23,
        )

    return lambda: seeded_model(factory)


def inputs(frames: int, height: int, width: int, audio: int, text: int, per_token_timestep: bool):
    tokens = frames * height * width

    def make(model: LTX2VideoTransformer3DModel) -> dict:
        timestep = torch.tensor([500.0, 500.0])
        video_timestep = timestep
        if per_token_timestep:  # image-to-video: the first frame's tokens are the conditioning image (t = 0)
            video_timestep = timestep[:, None] * (torch.arange(tokens) >= height * width).float()[None, :]
        mask = text_mask(text)
        return dict(
            hidden_states=randn(1, tokens, CHANNELS, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            audio_hidden_states=randn(1, audio, AUDIO_CHANNELS, seed=2).repeat(2, 1, 1),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=3),  # conditional and unconditional text
            audio_encoder_hidden_states=randn(2, text, TEXT_DIM, seed=4),
            timestep=video_timestep,
            audio_timestep=timestep,
            sigma=timestep / 1000,
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            audio_num_frames=audio,
            fps=24.0,
            use_cross_timestep=per_token_timestep,
            return_dict=False,
        )

    return make


def video_and_audio(output) -> torch.Tensor:
    """Both predictions, (B, Sv * C + Sa * Ca): the comparison covers the audio stream too."""
    video, audio = output
    return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


CASES = [
    ZooCase("ltx2-16vid-12aud-8txt", build(), inputs(2, 2, 4, 12, 8, per_token_timestep=False), video_and_audio),
    ZooCase(
        "ltx2-27vid-5aud-7txt-ltx23", build(ltx23=True), inputs(3, 3, 3, 5, 7, per_token_timestep=True), video_and_audio
    ),
]
