"""Tiny diffusers pipelines built offline: seeded components from small configs, a word-level tokenizer built
with the ``tokenizers`` library, and transformers' T5 encoder; ``save_pretrained`` writes them to a folder."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from tests.models import randomize_zero_init, sharpen_attention, tiny_wan

WORDS = ["a", "red", "blue", "green", "cat", "dog", "bird", "on", "the", "grass", "sky", "big", "small"]
TEXT_TOKENS = 9


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (unknown words map to <unk>), padded with <pad> = id 0."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=TEXT_TOKENS
    )


def t5_encoder(d_model: int = 16, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Sigma at latent 8 x 8 (image 16 x 16 after the 2x VAE), 4 heads, caption dim 16."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=16,
        norm_num_groups=4,
        interpolation_scale=1,
    )
    randomize_zero_init(transformer, seed)
    pipe = PixArtSigmaPipeline(
        tokenizer=word_tokenizer(),
        text_encoder=t5_encoder(seed=seed),
        vae=tiny_vae(seed),
        transformer=sharpen_attention(transformer.eval()),
        scheduler=DDIMScheduler(num_train_timesteps=100),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Call arguments for the tiny PixArt-Sigma pipeline: 16 x 16 images (8 x 8 latents, 16 image tokens).
PIXART_CALL = dict(
    height=16,
    width=16,
    num_inference_steps=2,
    guidance_scale=4.0,
    use_resolution_binning=False,
    max_sequence_length=TEXT_TOKENS,
    clean_caption=False,
    output_type="pt",
)


def umt5_encoder(d_model: int = 16, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(WORDS) + 3,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def tiny_wan_vae(seed: int = 0):
    """Causal 3-D VAE: 4 latent channels, 8x spatial and 4x temporal compression, no attention."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def wan_pipeline(seed: int = 0):
    """Wan text-to-video: latents (4, F, H/8, W/8), patch (1, 2, 2), 4 heads, text dim 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**tiny_wan())
    randomize_zero_init(transformer, seed)
    pipe = WanPipeline(
        tokenizer=word_tokenizer(),
        text_encoder=umt5_encoder(seed=seed),
        vae=tiny_wan_vae(seed),
        transformer=sharpen_attention(transformer.eval()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Wan: 5 frames of 32 x 32 (latents 2 x 4 x 4: 8 video tokens), 2 steps.
WAN_CALL = dict(
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=2,
    guidance_scale=4.0,
    max_sequence_length=TEXT_TOKENS,
    output_type="pt",
)


def clip_encoder(hidden: int = 8, seed: int = 0):
    """CLIP text encoder over the word tokenizer's ids; its pooled output is Flux's pooled projection."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    return CLIPTextModel(config).eval()


def flux_pipeline(seed: int = 0):
    """FLUX.1 text-to-image: CLIP (pooled, dim 8) and T5 (dim 16) encoders, 4 latent channels packed 2 x 2 (16 input
    channels), one double- and one single-stream block, 4 heads of 16, guidance embedding (FLUX.1-dev style)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
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
    randomize_zero_init(transformer, seed)
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0)  # Flux's pipeline shifts the latents by it
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_encoder(seed=seed),
        tokenizer=word_tokenizer(),
        text_encoder_2=t5_encoder(seed=seed),
        tokenizer_2=word_tokenizer(),
        transformer=sharpen_attention(transformer.eval()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Flux: 20 x 20 images (latents 4 x 10 x 10, packed 5 x 5 = 25 image tokens, plus 9 text tokens), 2 steps.
FLUX_CALL = dict(
    height=20, width=20, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=TEXT_TOKENS, output_type="pt"
)


def clip_vision_encoder(hidden: int = 16, seed: int = 0):
    """CLIP vision tower over 16 x 16 images (patch 8: 4 patches and the class token), as Wan 2.1 I2V's image
    encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def wan_i2v_pipeline(seed: int = 0):
    """Wan 2.1 image-to-video: the Wan pipeline's parts plus a CLIP image encoder (dim 16) whose ``hidden_states[-2]``
    the DiT reads as image context; the DiT's input is the latents and the image condition (4 + 4 mask + 4 channels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**tiny_wan(in_channels=12, image_dim=16, added_kv_proj_dim=48))
    randomize_zero_init(transformer, seed)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pipe = WanImageToVideoPipeline(
        tokenizer=word_tokenizer(),
        text_encoder=umt5_encoder(seed=seed),
        vae=tiny_wan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=processor,
        image_encoder=clip_vision_encoder(seed=seed),
        transformer=sharpen_attention(transformer.eval()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Wan I2V: a 32 x 32 image to 5 frames (latents 2 x 4 x 4), 2 steps.
WAN_I2V_CALL = dict(
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=2,
    guidance_scale=4.0,
    max_sequence_length=TEXT_TOKENS,
    output_type="pt",
)


def decoder_config(**overrides) -> dict:
    """A tiny decoder-only text model's config over the word tokenizer (Llama, Gemma 2, Qwen 3 ...): hidden 16, 2
    layers, grouped-query attention; ``overrides`` replace or add keys."""
    config = dict(
        vocab_size=len(WORDS) + 3,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return {**config, **overrides}


def llama_encoder(layers: int = 2, seed: int = 0):
    """A seeded Llama text encoder (``LlamaModel``, ``decoder_config``) of ``layers`` layers."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    return LlamaModel(LlamaConfig(**decoder_config(num_hidden_layers=layers, pad_token_id=0))).eval()


def gemma2_encoder(seed: int = 0):
    """A seeded Gemma 2 text encoder (``decoder_config``): its token table scaled by its own embedding's forward."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(**decoder_config(head_dim=8, pad_token_id=0))).eval()


def hunyuan_video_text_pipeline(seed: int = 0):
    """HunyuanVideo's text path only (no DiT, no VAE): a Llama text encoder (3 layers, read at ``hidden_states[-3]``)
    and a CLIP text encoder (pooled output, 77 positions as the pipeline pads to 77), both over the word tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    llama = llama_encoder(layers=3, seed=seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(WORDS) + 3,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=word_tokenizer(),
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=clip,
        tokenizer_2=word_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: A prompt template for ``HunyuanVideoPipeline.encode_prompt`` over the word tokenizer: one leading word, cropped.
HUNYUAN_TEMPLATE = {"template": "the {}", "crop_start": 1}
