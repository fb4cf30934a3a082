"""Text and image encoders of the diffusers pipelines give the same outputs FSDP-sharded as whole (float32, relative
1e-5, every rank): every output a pipeline reads (``last_hidden_state``, pooled and projected outputs, every entry of
``hidden_states`` with ``output_hidden_states=True``), calls of an encoder's parts outside its forward (SD's
``clip_skip``, CLIP's ``get_text_features``), ``generate`` with ranks that stop at different lengths, and two
pipelines' own encoder code: Wan 2.1 I2V end to end with the encoders sharded by default, HunyuanVideo's
``encode_prompt``. All of it runs in one launch of 2 gloo ranks; the tests read its report."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.fsdp import apply_fsdp, encoder_paths, encoder_units, is_sharded, shard_mesh
from lightning_dit_parallel.utils.pipelines import attach_pipelines
from tests.distributed import run_on_ranks
from tests.models import build_dit
from tests.pipelines import (
    HUNYUAN_TEMPLATE,
    TEXT_TOKENS,
    WAN_I2V_CALL,
    WORDS,
    clip_encoder,
    clip_vision_encoder,
    decoder_config,
    gemma2_encoder,
    hunyuan_video_text_pipeline,
    llama_encoder,
    t5_encoder,
    umt5_encoder,
    wan_i2v_pipeline,
)
from tests.rank_outputs import max_relative_error

VOCAB = len(WORDS) + 3
EOS = 1


def _tokens() -> dict[str, torch.Tensor]:
    """Two prompts of 7 ids, the second right-padded (id 0), each ending in </s> (id 1)."""
    ids = torch.tensor([[3, 7, 12, 5, 9, 4, EOS], [6, 10, 8, EOS, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (torch.arange(7) <= torch.tensor([[6], [3]])).long()}


def _ids() -> dict[str, torch.Tensor]:
    """The prompts' ids alone, as the CLIP text encoders are called."""
    return {"input_ids": _tokens()["input_ids"]}


def _pixels(size: int = 16) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))}


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


def _clip_text_projection():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=8,
            max_position_embeddings=TEXT_TOKENS,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=EOS,
        )
    )


def _clip_vision_projection():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=8,
        )
    )


def _clip_model():
    """The whole CLIP model: a 0-dim ``logit_scale`` parameter, and ``get_text_features`` / ``get_image_features``
    run its towers and projections without its forward."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


def _siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
    )


def _qwen3():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(**decoder_config(head_dim=8)))


#: Qwen2.5-VL's image: 8 x 8 pixels in patches of 2 x 2 (2 frames each), merged 2 x 2: 16 patches, 4 image tokens.
_QWEN_IMAGE_TOKEN, _QWEN_GRID = VOCAB - 1, torch.tensor([[1, 4, 4]])


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = decoder_config(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=8,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=_QWEN_IMAGE_TOKEN,
            video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3,
            vision_end_token_id=VOCAB - 4,
        )
    )


def _qwen_image_inputs() -> dict[str, torch.Tensor]:
    """QwenImage-Edit's call: a prompt with one image (4 image tokens) and its patches."""
    ids = torch.tensor([[3, 7, VOCAB - 3, *[_QWEN_IMAGE_TOKEN] * 4, VOCAB - 4, 5, EOS]])
    pixels = torch.randn(16, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(6))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_grid_thw": _QWEN_GRID,
    }


def _mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=dict(model_type="mistral", **decoder_config(head_dim=8)),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
                head_dim=8,
            ),
            image_token_index=VOCAB - 1,
        )
    )


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )


def _flatten(out, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model output (``ModelOutput``, tuple or tensor), tuples entry by entry: ``x[3]``."""
    found: dict[str, torch.Tensor] = {}
    items = out.items() if hasattr(out, "items") else [("", out)]
    for key, value in items:
        name = f"{prefix}.{key}" if key else prefix
        if isinstance(value, torch.Tensor):
            found[name] = value.detach()
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                found.update(_flatten(v, f"{name}[{i}]"))
    return found


def _forward_reads(inputs: Callable[[], dict]) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """A plain call (``last_hidden_state``, pooled / projected outputs) and one with ``output_hidden_states=True``."""

    def read(model: nn.Module) -> dict[str, torch.Tensor]:
        return {**_flatten(model(**inputs()), "plain"), **_flatten(model(**inputs(), output_hidden_states=True), "all")}

    return read


def _clip_skip(model: nn.Module) -> dict[str, torch.Tensor]:
    """SD's ``clip_skip``: the final norm of the CLIP text model applied to ``hidden_states[-2]`` outside the forward
    (``text_encoder.text_model.final_layer_norm``; transformers 5 has the norm on the model itself)."""
    hidden = model(_tokens()["input_ids"], output_hidden_states=True).hidden_states[-2]
    return {"clip_skip": getattr(model, "text_model", model).final_layer_norm(hidden).detach()}


def _clip_features(model: nn.Module) -> dict[str, torch.Tensor]:
    """AudioLDM2 / MusicLDM style: ``get_text_features`` and ``get_image_features`` (towers and projections without
    the model's forward), and the forward with the 0-dim ``logit_scale``."""
    return {
        **_flatten(model.get_text_features(_tokens()["input_ids"]), "text"),
        **_flatten(model.get_image_features(**_pixels()), "image"),
        **_flatten(model(input_ids=_tokens()["input_ids"], **_pixels()).logits_per_image, "logits"),
    }


#: name -> (build, read): one encoder, and the outputs of it that the pipelines read.
ENCODERS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], dict[str, torch.Tensor]]]] = {
    "t5 (PixArt, SD3, Flux)": (t5_encoder, _forward_reads(_tokens)),
    "umt5 (Wan)": (umt5_encoder, _forward_reads(_tokens)),
    "clip_text (Flux pooled)": (clip_encoder, _forward_reads(_ids)),
    "clip_text_skip (SD clip_skip)": (clip_encoder, _clip_skip),
    "clip_text_projection (SD3)": (_clip_text_projection, _forward_reads(_ids)),
    "clip_vision (Wan I2V)": (clip_vision_encoder, _forward_reads(_pixels)),
    "clip_vision_projection (IP-Adapter)": (_clip_vision_projection, _forward_reads(_pixels)),
    "clip_model (get_*_features)": (_clip_model, _clip_features),
    "siglip_vision (Flux Redux)": (_siglip_vision, _forward_reads(_pixels)),
    "llama (HunyuanVideo)": (llama_encoder, _forward_reads(_tokens)),
    "gemma2 (Sana, Lumina2)": (gemma2_encoder, _forward_reads(_tokens)),
    "qwen3 (Z-Image)": (_qwen3, _forward_reads(_tokens)),
    "qwen2_5_vl text (QwenImage)": (_qwen2_5_vl, _forward_reads(_tokens)),
    "qwen2_5_vl image (QwenImage-Edit)": (_qwen2_5_vl, _forward_reads(_qwen_image_inputs)),
    "mistral3 (Flux2)": (_mistral3, _forward_reads(_tokens)),
    "bert (HunyuanDiT)": (_bert, _forward_reads(_tokens)),
}


def _compare(sharded: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> dict:
    """The largest relative error over the outputs both have, and the outputs only one of them has."""
    common = sorted(set(whole) & set(sharded))
    shapes = [k for k in common if sharded[k].shape != whole[k].shape]
    return {
        "error": max((max_relative_error(sharded[k], whole[k]) for k in common if k not in shapes), default=0.0),
        "missing": sorted(set(whole) - set(sharded)) + [f"{k} (shape)" for k in shapes],
        "unexpected": sorted(set(sharded) - set(whole)),
    }


def _encoder_case(build: Callable[[], nn.Module], read: Callable, mesh) -> dict:
    model = _seeded(build)
    whole = read(model)
    sharding = apply_fsdp(model, encoder_units(model), mesh)
    try:
        result = {"sharded": all(is_sharded(p) for p in model.parameters() if p.ndim), **_compare(read(model), whole)}
    finally:
        sharding.remove()
    result["hidden_states"] = any("hidden_states" in k for k in whole)
    result["after_remove"] = _compare(read(model), whole)["error"]
    return result


def _generate_case(rank: int, mesh) -> dict:
    """Greedy ``generate`` on each rank's own prompt, with an end token that stops rank 0 after one token while rank 1
    runs all 6: a sharded model's ranks must still pair every all-gather (transformers' ``synced_gpus``, on for
    modules that ``fully_shard`` marks as managed; the mark must survive what ``apply_fsdp`` does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _seeded(lambda: LlamaForCausalLM(LlamaConfig(**decoder_config(pad_token_id=0))))
    prompts = [torch.tensor([[3, 7, 12]]), torch.tensor([[6, 10, 8]])]
    free = [model.generate(p, max_new_tokens=6, do_sample=False, eos_token_id=None) for p in prompts]
    stop = int(free[0][0, 3])  # rank 0's first new token
    if stop in free[1][0, 3:].tolist():
        return {"error": float("inf"), "missing": [f"prompt 1 also makes token {stop}: pick another prompt"]}
    whole = model.generate(prompts[rank], max_new_tokens=6, do_sample=False, eos_token_id=stop, pad_token_id=0)
    sharding = apply_fsdp(model, encoder_units(model), mesh)
    try:
        out = model.generate(prompts[rank], max_new_tokens=6, do_sample=False, eos_token_id=stop, pad_token_id=0)
    finally:
        sharding.remove()
    return {
        "error": 0.0 if out.equal(whole) else float("inf"),
        "missing": [],
        "lengths": (whole.shape[1], out.shape[1]),
    }


def _wan_i2v_default(rank: int, world: int) -> dict:
    """Wan 2.1 I2V end to end over dp=2 with FSDP and ``shard_modules`` not given: the text and image encoders are
    sharded with the DiT, and each rank's video (its own prompt, image and seed) equals the whole pipeline's."""
    from diffusers import WanPipeline
    from PIL import Image

    pipe = wan_i2v_pipeline()
    pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(rank)) * 255
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    prompt = ["a red cat", "a blue dog on the grass"][rank]

    def video() -> torch.Tensor:
        # the I2V module's own prompt cleaning needs ftfy (unguarded there); Wan T2V's text path is the same call
        cpu = torch.device("cpu")
        embeds = [
            WanPipeline._get_t5_prompt_embeds(pipe, p, max_sequence_length=TEXT_TOKENS, device=cpu)
            for p in (prompt, "")
        ]
        return pipe(
            image=image,
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            generator=torch.Generator().manual_seed(rank),
            **WAN_I2V_CALL,
        ).frames

    whole = video()
    holder = nn.Module()
    holder.pipe = pipe
    attached = attach_pipelines(holder, show_progress=False)
    layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
    mesh = layout.build_mesh("cpu")

    def sharded_parts() -> list[str]:
        parts = holder.pipe.named_children()
        return sorted(name for name, part in parts if any(is_sharded(p) for p in part.parameters()))

    try:
        handle = parallelize(holder, layout, mesh)  # shard_modules not given: the encoders too
        by_default = sharded_parts()
        sharded = video()
        handle.remove()
        handle = parallelize(holder, layout, mesh, shard_modules=())  # explicitly none
        explicit_none = sharded_parts()
        handle.remove()
    finally:
        attached.detach()
    return {
        "by_default": by_default,
        "explicit_none": explicit_none,
        "error": max_relative_error(sharded, whole),
        "after": max_relative_error(video(), whole),
    }


def _hunyuan_encode_prompt(rank: int, world: int) -> dict:
    """HunyuanVideo's ``encode_prompt`` (Llama ``hidden_states[-3]``, CLIP ``pooler_output``) with both encoders
    sharded by default next to a DiT."""
    pipe = hunyuan_video_text_pipeline()

    def encode() -> dict[str, torch.Tensor]:
        out = pipe.encode_prompt(
            prompt=["a red cat", "blue dog"],
            prompt_template=HUNYUAN_TEMPLATE,
            device=torch.device("cpu"),
            dtype=torch.float32,
            max_sequence_length=8,
        )
        return _flatten(tuple(out), "encode_prompt")

    whole = encode()
    holder = nn.Module()
    holder.dit, holder.pipe = build_dit(), pipe
    attached = attach_pipelines(holder, show_progress=False)
    layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
    try:
        handle = parallelize(holder, layout, layout.build_mesh("cpu"))
        try:
            result = {"sharded": all(is_sharded(p) for p in holder.pipe.parameters()), **_compare(encode(), whole)}
        finally:
            handle.remove()
    finally:
        attached.detach()
    return result


def _every_case(rank: int, world: int) -> dict:
    """Every case in this launch; an encoder that fails on every rank alike is reported, not raised."""
    layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
    mesh = shard_mesh(layout.build_mesh("cpu"))
    report: dict = {}
    cases: dict[str, Callable[[], dict]] = {
        name: (lambda b=build, r=read: _encoder_case(b, r, mesh)) for name, (build, read) in ENCODERS.items()
    }
    cases["wan_i2v"] = lambda: _wan_i2v_default(rank, world)
    cases["hunyuan_video"] = lambda: _hunyuan_encode_prompt(rank, world)
    cases["generate"] = lambda: _generate_case(rank, mesh)  # last: without synced ranks its all-gathers do not pair up
    for name, case in cases.items():
        try:
            report[name] = case()
        except Exception as exc:  # noqa: BLE001 -- the parent asserts on it
            report[name] = {"exception": f"{type(exc).__name__}: {exc}"[:600]}
    return report


@pytest.fixture(scope="module")
def report() -> list[dict]:
    """One launch of 2 ranks runs every case; each rank's report."""
    return run_on_ranks(2, _every_case, timeout_s=120)


def _check_exact(report: list[dict], name: str) -> None:
    for rank, r in enumerate(report):
        r = r[name]
        assert "exception" not in r, f"{name}, rank {rank}: {r['exception']}"
        assert not r.get("missing") and not r.get("unexpected"), f"{name}, rank {rank}: outputs differ: {r}"
        assert r["error"] <= 1e-5, f"{name}, rank {rank}: max relative error {r['error']:.2e}"


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_outputs_sharded_equal_whole(report, name):
    _check_exact(report, name)
    for rank, r in enumerate(report):
        r = r[name]
        assert r["sharded"], f"{name}, rank {rank}: some parameter is not sharded"
        assert r["after_remove"] == 0.0, f"{name}, rank {rank}: after remove() the outputs changed: {r['after_remove']}"
        if name.startswith(("clip_text_skip", "clip_model")):
            continue
        assert r["hidden_states"], f"{name}: the whole model returned no hidden_states: the case checks nothing"


def test_generate_keeps_ranks_in_step(report):
    _check_exact(report, "generate")
    lengths = [r["generate"]["lengths"] for r in report]
    assert lengths[0][0] < lengths[1][0], f"the ranks' generations should stop at different lengths: {lengths}"


def test_wan_i2v_end_to_end_with_encoders_sharded_by_default(report):
    for rank, r in enumerate(report):
        r = r["wan_i2v"]
        assert "exception" not in r, f"rank {rank}: {r['exception']}"
        assert r["by_default"] == ["image_encoder", "text_encoder", "transformer"], f"rank {rank}: {r['by_default']}"
        assert r["explicit_none"] == ["transformer"], f"rank {rank}: {r['explicit_none']}"
        assert r["error"] <= 1e-5 and r["after"] == 0.0, f"rank {rank}: {r}"


def test_hunyuan_video_encode_prompt_sharded(report):
    _check_exact(report, "hunyuan_video")
    assert all(r["hunyuan_video"]["sharded"] for r in report)


def test_default_shard_modules_are_the_encoders_outside_the_dits():
    """The outermost ``PreTrainedModel``s outside the planned DiTs; nothing without transformers models."""
    holder = nn.Module()
    holder.pipe = hunyuan_video_text_pipeline()
    holder.dit = build_dit()
    attached = attach_pipelines(holder, show_progress=False)
    try:
        assert encoder_paths(holder, ["dit"]) == ["pipe.text_encoder", "pipe.text_encoder_2"]
        assert encoder_paths(holder, ["pipe"]) == []  # inside a DiT path
        assert encoder_paths(holder.pipe.text_encoder, [""]) == []  # the root holds the DiT
    finally:
        attached.detach()
    composite = nn.Module()
    composite.vl = _seeded(_qwen2_5_vl)
    assert encoder_paths(composite, []) == ["vl"]  # its inner models (vision, language) are not listed apart
    assert encoder_paths(build_dit(), [""]) == []


def test_encoder_units_are_its_weight_layers_but_tied_and_uncalled_ones():
    """An encoder is sharded one weight layer at a time, then its layers, then itself; a tied embedding (UMT5's
    ``shared`` / ``encoder.embed_tokens``: one parameter in two modules) and torch's ``MultiheadAttention`` (its forward
    reads ``out_proj.weight`` without calling ``out_proj``) stay in the unit above them."""
    encoder = umt5_encoder()
    units = encoder_units(encoder)
    ids = {id(u) for u in units}
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert linears and all(id(m) in ids for m in linears)
    assert id(encoder.shared) not in ids and id(encoder.encoder.embed_tokens) not in ids
    assert units[-1] is encoder and [u for u in units if isinstance(u, type(encoder.encoder.block[0]))] == list(
        encoder.encoder.block
    )
    pooled = nn.Module()
    pooled.attention = nn.MultiheadAttention(8, 2, batch_first=True)
    pooled.layers = nn.ModuleList([nn.Linear(8, 8)])
    assert encoder_units(pooled) == [pooled.layers[0], pooled]  # the list's layer is a unit once, out_proj none
