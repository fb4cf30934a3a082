"""Tiny seeded diffusers pipelines for the pipeline matrix (``tests/test_pipeline_matrix.py``): each ``MatrixPipeline``
builds a real pipeline offline from the package's test builders (word tokenizer, tiny T5 / UMT5 / CLIP / Llama / Gemma2
encoders, seeded DiTs with sharpened attention, tiny VAEs), saves it with ``save_pretrained`` and is loaded back by
path, as users load one, then called through its own ``__call__``.

Sizes: token counts that do not divide 2 (9, 25 or 27 image/video tokens, 9 text tokens), 2 denoising steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tests.models import build_sd3, randomize_zero_init, sharpen_attention
from tests.pipelines import (
    HUNYUAN_TEMPLATE,
    TEXT_TOKENS,
    WORDS,
    flux_pipeline,
    hunyuan_video_text_pipeline,
    t5_encoder,
    tiny_vae,
    wan_i2v_pipeline,
    wan_pipeline,
    word_tokenizer,
)

#: the LoRA file saved next to the Flux pipeline (``FluxPipeline.save_lora_weights``)
LORA_FILE = "lora.safetensors"


def _disable_progress(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(size: int) -> Any:
    """A seeded RGB PIL image, ``size`` x ``size``."""
    from PIL import Image

    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(5)) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _wan_text(pipe, prompts: list[str], tokens: int) -> tuple[Tensor, Tensor]:
    """Wan's UMT5 text path for the prompts and the empty negative prompt (the I2V module's own prompt cleaning
    needs ftfy, not installed); the text encoder still runs inside the module, on every rank."""
    from diffusers import WanPipeline

    return tuple(
        WanPipeline._get_t5_prompt_embeds(pipe, p, max_sequence_length=tokens, device=torch.device("cpu"))
        for p in (prompts, [""] * len(prompts))
    )


# -- builders -----------------------------------------------------------------------------------------------------


def wan22_i2v_pipeline(seed: int = 0):
    """Wan 2.2 I2V-A14B form: ``WanImageToVideoPipeline`` with two experts (``transformer`` for high noise,
    ``transformer_2`` for low), no image encoder (the image enters through the latent condition only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    def expert(s: int):
        torch.manual_seed(s)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=12,
            in_channels=12,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            rope_max_seq_len=32,
        )
        randomize_zero_init(model, s)
        return sharpen_attention(model.eval())

    base = wan_pipeline(seed)
    return _disable_progress(
        WanImageToVideoPipeline(
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            vae=base.vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            image_processor=None,
            image_encoder=None,
            transformer=expert(seed),
            transformer_2=expert(seed + 1),
            boundary_ratio=0.9,
        )
    )


def ltx_pipeline(seed: int = 0):
    """LTX-Video: T5 text (dim 16, masked), a 4-channel LTX VAE (8x spatial: 2x2 patches and two 2x upsamplers, with
    timestep conditioning and decoder noise), a DiT with 4 heads of 8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    from tests.video_vaes import ltx_vae

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=16,
    )
    randomize_zero_init(transformer, seed)
    return _disable_progress(
        LTXPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=ltx_vae(seed),
            text_encoder=t5_encoder(seed=seed),
            tokenizer=word_tokenizer(),
            transformer=sharpen_attention(transformer.eval()),
        )
    )


def hunyuan_video_pipeline(seed: int = 0):
    """HunyuanVideo: Llama (dim 16) and CLIP (pooled, dim 8) text encoders, the tiny HunyuanVideo VAE (4x spatial,
    4x temporal), a DiT with one dual-, one single-stream and one refiner block."""
    from diffusers import HunyuanVideoPipeline

    from tests.video_vaes import hunyuan_vae
    from tests.zoo import hunyuan_video

    text = hunyuan_video_text_pipeline(seed)
    return _disable_progress(
        HunyuanVideoPipeline(
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            transformer=hunyuan_video.build()(),
            vae=hunyuan_vae(seed),
            scheduler=text.scheduler,
            text_encoder_2=text.text_encoder_2,
            tokenizer_2=text.tokenizer_2,
        )
    )


def cogvideox_pipeline(seed: int = 0):
    """CogVideoX 1.0 with rotary: T5 text (dim 16), a tiny CogVideoX VAE (4x spatial, 2x temporal), v-prediction
    DDIM. The VAE keeps diffusers' initialisation: with the randomised norms of ``tests/video_vaes.cogvideox_vae`` it
    amplifies the float32 rounding of the latents (6e-7, any layout, pipeline stages included) about 20-fold, past
    1e-5 of the decoded video."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    from tests.zoo import seeded_model

    transformer = seeded_model(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=16,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            max_text_seq_length=TEXT_TOKENS,
            use_rotary_positional_embeddings=True,
        ),
        seed,
    )

    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=100,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
    ).eval()
    return _disable_progress(
        CogVideoXPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=t5_encoder(seed=seed),
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
    )


def sana_pipeline(seed: int = 0):
    """Sana: a Gemma2 text encoder (dim 16), the tiny DC-AE (4x), linear-attention DiT (25 image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    from tests.video_vaes import dc_vae
    from tests.zoo import sana

    torch.manual_seed(seed)
    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=len(WORDS) + 3,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=0,
        )
    ).eval()
    return _disable_progress(
        SanaPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=gemma,
            vae=dc_vae(seed),
            transformer=sana.build(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    )


def flux_controlnet_pipeline(seed: int = 0):
    """FLUX.1 with a ControlNet (one double- and one single-stream block): the Flux pipeline's parts and
    ``FluxControlNetModel``."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = flux_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = FluxControlNetModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    randomize_zero_init(controlnet, seed + 1)
    return _disable_progress(
        FluxControlNetPipeline(
            scheduler=base.scheduler,
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2,
            transformer=base.transformer,
            controlnet=sharpen_attention(controlnet.eval()),
        )
    )


def sd3_pipeline(seed: int = 0):
    """Stable Diffusion 3: two CLIP text encoders with projections (hidden 8, pooled 4 + 4), T5 (dim 16), the MMDiT
    with a dual-attention layer, the tiny image VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(s: int):
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(WORDS) + 3,
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TEXT_TOKENS,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=1,
                projection_dim=4,
            )
        ).eval()

    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0)
    return _disable_progress(
        StableDiffusion3Pipeline(
            transformer=build_sd3(seed=seed),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=clip(seed),
            tokenizer=word_tokenizer(),
            text_encoder_2=clip(seed + 1),
            tokenizer_2=word_tokenizer(),
            text_encoder_3=t5_encoder(seed=seed),
            tokenizer_3=word_tokenizer(),
        )
    )


def qwenimage_pipeline(seed: int = 0):
    """Qwen-Image: the tiny DiT (16 packed channels), its causal VAE (8x); no text encoder (a Qwen2.5-VL cannot be
    built tiny offline): the module passes seeded text embeddings and masks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from tests.vaes import qwen_vae
    from tests.zoo import qwenimage

    return _disable_progress(
        QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=qwen_vae(seed),
            text_encoder=None,
            tokenizer=None,
            transformer=qwenimage.build()(),
        )
    )


def flux_lora_state_dict(transformer, seed: int = 3, rank: int = 4) -> dict[str, Tensor]:
    """A diffusers-format LoRA for every attention and feed-forward projection of Flux's blocks (non-zero
    ``lora_B``, so that it changes the output)."""
    generator = torch.Generator().manual_seed(seed)
    targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_mlp",
        "proj_out",
    )
    state = {}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in path and path.endswith(targets):
            state[f"{path}.lora_A.weight"] = 0.3 * torch.randn(rank, module.in_features, generator=generator)
            state[f"{path}.lora_B.weight"] = 0.3 * torch.randn(module.out_features, rank, generator=generator)
    return state


# -- how each pipeline is called -------------------------------------------------------------------------------------


def _call_output(result) -> Tensor:
    for name in ("frames", "images"):
        value = getattr(result, name, None)
        if isinstance(value, Tensor):
            return value.float()
    raise TypeError(f"no tensor output in {type(result).__name__}")


def _plain(pipe, prompts: list[str], generators: list[torch.Generator], call: dict) -> Tensor:
    return _call_output(pipe(prompt=prompts, generator=generators, **call))


def _wan_i2v(pipe, prompts, generators, call) -> Tensor:
    embeds, negative = _wan_text(pipe, prompts, call["max_sequence_length"])
    return _call_output(
        pipe(
            image=_image(call["height"]),
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            generator=generators,
            **call,
        )
    )


def _flux_controlnet(pipe, prompts, generators, call) -> Tensor:
    return _call_output(pipe(prompt=prompts, control_image=_image(call["height"]), generator=generators, **call))


def _qwenimage(pipe, prompts, generators, call) -> Tensor:
    """Seeded text embeddings per prompt (7 tokens), a negative one of 5 tokens (true CFG: two calls a step)."""
    from tests.zoo import qwenimage

    n = len(prompts)
    seeds = [sum(map(ord, p)) for p in prompts]
    embeds = torch.cat(
        [torch.randn(1, 7, qwenimage.TEXT_DIM, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # (B, 7, D)
    negative = torch.randn(1, 5, qwenimage.TEXT_DIM, generator=torch.Generator().manual_seed(7)).repeat(n, 1, 1)
    return _call_output(
        pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=torch.ones(n, 7, dtype=torch.long),
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=torch.ones(n, 5, dtype=torch.long),
            generator=generators,
            **call,
        )
    )


@dataclass(frozen=True)
class MatrixPipeline:
    """One pipeline of the matrix.

    Args:
        build: a fresh seeded pipeline.
        call: the call arguments (besides prompts and generators).
        invoke: ``invoke(pipe, prompts, generators, call)`` -> the output tensor.
        lora: save a LoRA next to the pipeline and load it with ``load_lora_weights`` after ``from_pretrained``.
        load_kwargs: further ``from_pretrained`` arguments (components saved as ``None``).
    """

    build: Callable[[], Any]
    call: dict[str, Any]
    invoke: Callable[..., Tensor] = _plain
    lora: bool = False
    load_kwargs: dict[str, Any] = field(default_factory=dict)


def save(entry: MatrixPipeline, folder: Path) -> Path:
    """``save_pretrained`` the built pipeline into ``folder`` (and its LoRA file, if any)."""
    pipe = entry.build()
    pipe.save_pretrained(folder)
    if entry.lora:
        pipe.save_lora_weights(
            folder, transformer_lora_layers=flux_lora_state_dict(pipe.transformer), weight_name=LORA_FILE
        )
    return folder


def load(entry: MatrixPipeline, folder: Path):
    """``DiffusionPipeline.from_pretrained(folder)`` as a user does, plus ``load_lora_weights`` for the LoRA entry."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **entry.load_kwargs)
    if entry.lora:
        pipe.load_lora_weights(folder, weight_name=LORA_FILE, adapter_name="style")
    return _disable_progress(pipe)


#: image 48 x 48 with 8x VAEs: latents 6 x 6, 9 tokens (patch 2); 20 x 20 with 2x VAEs packed 2 x 2: 25 tokens
WAN = dict(
    height=48,
    width=48,
    num_frames=1,
    num_inference_steps=2,
    guidance_scale=4.0,
    max_sequence_length=TEXT_TOKENS,
    output_type="pt",
)
FLUX = dict(
    height=20,
    width=20,
    num_inference_steps=2,
    guidance_scale=3.5,
    max_sequence_length=TEXT_TOKENS,
    true_cfg_scale=2.0,
    negative_prompt="a green bird",
    output_type="pt",
)

PIPELINES: dict[str, MatrixPipeline] = {
    # 9 video tokens, 9 text tokens
    "wan": MatrixPipeline(wan_pipeline, WAN),
    # 9 video tokens; CLIP image context (5 tokens). diffusers' Wan attention takes the keys before the last 512 as
    # the image context: the text must be padded to 512 tokens, or the image context is empty
    "wan_i2v": MatrixPipeline(wan_i2v_pipeline, {**WAN, "max_sequence_length": 512}, _wan_i2v),
    # two experts (boundary 900: step 1 on transformer, step 2 on transformer_2)
    "wan22_i2v": MatrixPipeline(wan22_i2v_pipeline, WAN, _wan_i2v),
    # sizes must divide by 32: latents 1 x 4 x 4 (8x spatial), patch 1: 16 video tokens (even); 9 text tokens
    "ltx": MatrixPipeline(
        ltx_pipeline,
        dict(
            height=32,
            width=32,
            num_frames=1,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=TEXT_TOKENS,
            decode_timestep=0.05,
            decode_noise_scale=0.025,
            output_type="pt",
        ),
    ),
    # sizes must divide by 16: latents 1 x 4 x 12 (4x spatial), patch 2: 12 video tokens (even) and 9 text tokens
    # after the template's crop (joint sequence 21); true CFG with a negative prompt
    "hunyuan_video": MatrixPipeline(
        hunyuan_video_pipeline,
        dict(
            height=16,
            width=48,
            num_frames=1,
            num_inference_steps=2,
            guidance_scale=6.0,
            true_cfg_scale=2.0,
            negative_prompt="a green bird",
            max_sequence_length=TEXT_TOKENS,
            prompt_template=HUNYUAN_TEMPLATE,
            output_type="pt",
        ),
    ),
    # latents 3 x 6 x 6 (5 frames, 2x temporal, 4x spatial), patch 2: 27 video tokens and 9 text tokens
    "cogvideox": MatrixPipeline(
        cogvideox_pipeline,
        dict(
            height=24,
            width=24,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=4.0,
            max_sequence_length=TEXT_TOKENS,
            output_type="pt",
        ),
    ),
    # sizes must divide by 32: latents 8 x 8 (DC-AE 4x), patch 1: 64 image tokens (even); 9 text tokens
    "sana": MatrixPipeline(
        sana_pipeline,
        dict(
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=4.5,
            max_sequence_length=TEXT_TOKENS,
            complex_human_instruction=None,
            use_resolution_binning=False,
            clean_caption=False,
            output_type="pt",
        ),
    ),
    # 25 image tokens + 9 text tokens; a LoRA adapter loaded; true CFG
    "flux_lora": MatrixPipeline(flux_pipeline, FLUX, lora=True),
    "flux_controlnet": MatrixPipeline(
        flux_controlnet_pipeline, {**FLUX, "controlnet_conditioning_scale": 0.7}, _flux_controlnet
    ),
    # latents 10 x 10, patch 2: 25 image tokens
    "sd3": MatrixPipeline(
        sd3_pipeline,
        dict(
            height=20,
            width=20,
            num_inference_steps=2,
            guidance_scale=4.0,
            max_sequence_length=TEXT_TOKENS,
            output_type="pt",
        ),
    ),
    # latents 6 x 6 packed 2 x 2: 9 image tokens; true CFG with text of 7 and 5 tokens
    "qwenimage": MatrixPipeline(
        qwenimage_pipeline,
        dict(height=48, width=48, num_inference_steps=2, true_cfg_scale=4.0, output_type="pt"),
        _qwenimage,
        load_kwargs=dict(text_encoder=None, tokenizer=None),
    ),
}

#: the rows of the docs table
LABELS: dict[str, str] = {
    "wan": "`WanPipeline` (Wan 2.1 T2V)",
    "wan_i2v": "`WanImageToVideoPipeline` (Wan 2.1 I2V, CLIP image encoder)",
    "wan22_i2v": "`WanImageToVideoPipeline` (Wan 2.2 I2V-A14B, two experts)",
    "ltx": "`LTXPipeline`",
    "hunyuan_video": "`HunyuanVideoPipeline` (true CFG)",
    "cogvideox": "`CogVideoXPipeline`",
    "sana": "`SanaPipeline`",
    "flux_lora": "`FluxPipeline` + LoRA (true CFG)",
    "flux_controlnet": "`FluxControlNetPipeline` (true CFG)",
    "sd3": "`StableDiffusion3Pipeline`",
    "qwenimage": "`QwenImagePipeline` (true CFG)",
}
