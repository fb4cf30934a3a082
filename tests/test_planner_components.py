"""The planner counts every component of a pipeline folder: both experts of a Wan 2.2-style pipeline
(``transformer``, ``transformer_2``), the text encoder, the image encoder (CLIP vision), the VAE and a ControlNet,
read from ``model_index.json``, the components' configs and the headers of their safetensors files.

The expected bytes are computed here from the tensors the test saves (not from the planner's own counting), so a
component left out, counted twice, or sharded wrongly fails the comparison."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_dit_parallel.planner import plan_layouts
from lightning_dit_parallel.planner.cli import main as ldp_plan
from lightning_dit_parallel.planner.models import load_models
from lightning_dit_parallel.planner.weights import component_weights, read_safetensors_header

ELEMENT = 2  # bfloat16, the dtype the plans below run in

TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 8,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "ffn_dim": 32,
    "freq_dim": 16,
    "image_dim": None,
    "in_channels": 12,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 4,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
    "text_dim": 32,
}
TEXT_ENCODER = {
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "d_model": 32,
    "d_ff": 48,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "vocab_size": 64,
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "dense_act_fn": "gelu_new",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "tie_word_embeddings": False,
}
IMAGE_ENCODER = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 28,
    "patch_size": 14,
    "projection_dim": 16,
    "num_channels": 3,
    "hidden_act": "gelu",
    "torch_dtype": "float32",
}
VAE = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [True],
    "dropout": 0.0,
}
MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "_diffusers_version": "0.35.0",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
WORK = dict(height=32, width=32, frames=5, text_tokens=16, cfg_calls="separate", memory="8GiB")


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage (tied embeddings saved once, as ``save_model`` does), contiguous copies."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().clone()
    return out


def _transformers_model(config: dict) -> torch.nn.Module:
    import transformers

    options = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **options)
    return getattr(transformers, config["architectures"][0])(cfg)


def _diffusers_model(config: dict) -> torch.nn.Module:
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _component(root: Path, name: str, config: dict, tensors: dict[str, torch.Tensor], filename: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / filename))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Wan 2.2 I2V-style pipeline folder, and the tensors saved for each component."""
    root = tmp_path_factory.mktemp("wan22_i2v")
    torch.manual_seed(0)
    tensors = {
        "transformer": _unique(_diffusers_model(TRANSFORMER).state_dict()),
        "transformer_2": _unique(_diffusers_model(TRANSFORMER).state_dict()),
        "text_encoder": _unique(_transformers_model(TEXT_ENCODER).state_dict()),
        # float32 on disk (as Wan's CLIP ships), and one tensor its config does not build: only the header knows it
        "image_encoder": {
            **_unique(_transformers_model(IMAGE_ENCODER).state_dict()),
            "extra_projection.weight": torch.randn(10, 32),
        },
        "vae": _unique(_diffusers_model(VAE).state_dict()),
    }
    configs = {
        "transformer": TRANSFORMER,
        "transformer_2": TRANSFORMER,
        "text_encoder": TEXT_ENCODER,
        "image_encoder": IMAGE_ENCODER,
        "vae": VAE,
    }
    for name, state in tensors.items():
        filename = (
            "model.safetensors"
            if name in ("text_encoder", "image_encoder")
            else ("diffusion_pytorch_model.safetensors")
        )
        _component(root, name, configs[name], state, filename)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root, tensors


def _without(root: Path, tmp: Path, *names: str) -> Path:
    """A copy of the folder without some components (their folders gone, ``[null, null]`` in model_index.json)."""
    copy = tmp / ("without_" + "_".join(names))
    shutil.copytree(root, copy)
    index = json.loads((copy / "model_index.json").read_text())
    for name in names:
        shutil.rmtree(copy / name)
        index[name] = [None, None]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def _numel(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def _fsdp_numel(state: dict[str, torch.Tensor], ranks: int) -> int:
    """FSDP2's shard of every tensor: ceil(rows / ranks) rows each (a 0-dim tensor whole)."""
    return sum(math.ceil(t.shape[0] / ranks) * math.prod(t.shape[1:]) if t.dim() else 1 for t in state.values())


def _layout(plan, name: str):
    return next(e for e in plan.layouts if e.layout.describe() == name)


def test_every_component_of_the_folder_is_counted(saved):
    root, tensors = saved
    models = load_models(root)
    assert [name for name, _ in models.dits] == ["transformer", "transformer_2"]
    assert [spec.numel for _, spec in models.dits] == [_numel(tensors["transformer"]), _numel(tensors["transformer_2"])]
    assert [(e.name, e.kind, e.numel) for e in models.encoders] == [
        ("text_encoder", "text", _numel(tensors["text_encoder"])),
        ("image_encoder", "image", _numel(tensors["image_encoder"])),
    ]
    assert models.image_encoders[0].max_tokens == (28 // 14) ** 2 + 1  # patches and class token
    assert models.vae is not None and models.vae.numel == _numel(tensors["vae"])
    counted = dict(models.counted_from)
    assert counted["image_encoder"] == counted["text_encoder"] == "1 safetensors header"
    assert "matching 1 safetensors header" in counted["transformer_2"]
    assert not models.notes


def test_second_expert_and_image_encoder_add_their_bytes_per_rank(saved, tmp_path):
    root, tensors = saved
    full = plan_layouts(root, devices=1, **WORK)
    no_expert = plan_layouts(_without(root, tmp_path, "transformer_2"), devices=1, **WORK)
    no_image = plan_layouts(_without(root, tmp_path, "image_encoder"), devices=1, **WORK)
    (one,) = full.layouts
    (one_no_expert,) = no_expert.layouts
    (one_no_image,) = no_image.layouts
    expert = _numel(tensors["transformer_2"]) * ELEMENT
    image = _numel(tensors["image_encoder"]) * ELEMENT  # stored in float32, held in bfloat16
    assert one.memory.dit_parameters - one_no_expert.memory.dit_parameters == expert
    assert one.memory.peak - one_no_expert.memory.peak == expert  # one expert runs at a time: same activations
    assert one.memory.image_encoder_parameters == image and one_no_image.memory.image_encoder_parameters == 0
    assert one.memory.resident - one_no_image.memory.resident == image
    assert one.memory.peak - one_no_image.memory.peak >= image
    expected = {name: _numel(state) * ELEMENT for name, state in tensors.items()}
    assert dict(one.memory.components) == expected
    assert one.memory.resident == sum(expected.values())


def test_fsdp_over_two_ranks_halves_the_dits_and_the_encoders(saved):
    root, tensors = saved
    plan = plan_layouts(root, devices=2, **WORK)
    sharded = _layout(plan, "ulysses2 +fsdp").memory
    whole = _layout(plan, "ulysses2").memory
    dits = tensors["transformer"], tensors["transformer_2"]
    assert whole.dit_parameters == sum(_numel(s) for s in dits) * ELEMENT
    assert sharded.dit_parameters == sum(_fsdp_numel(s, 2) for s in dits) * ELEMENT
    assert sharded.dit_parameters == pytest.approx(whole.dit_parameters / 2, rel=0.05)  # tiny: a few 1-row tensors
    for name, field in (("text_encoder", "text_encoder_parameters"), ("image_encoder", "image_encoder_parameters")):
        assert getattr(whole, field) == _numel(tensors[name]) * ELEMENT
        assert getattr(sharded, field) == _fsdp_numel(tensors[name], 2) * ELEMENT
        assert getattr(sharded, field) == pytest.approx(getattr(whole, field) / 2, rel=0.05)
    assert sharded.vae_parameters == whole.vae_parameters == _numel(tensors["vae"]) * ELEMENT
    # the encoders kept whole on request; the DiTs still sharded
    kept = _layout(plan_layouts(root, devices=2, shard_text_encoders=False, **WORK), "ulysses2 +fsdp").memory
    assert kept.text_encoder_parameters == whole.text_encoder_parameters
    assert kept.image_encoder_parameters == whole.image_encoder_parameters
    assert kept.dit_parameters == sharded.dit_parameters


def test_a_controlnet_is_held_whole_and_sharded_weights_are_read_once(saved, tmp_path):
    root, tensors = saved
    copy = tmp_path / "with_controlnet"
    shutil.copytree(root, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["controlnet"] = ["diffusers", "SomeControlNetModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    control = {
        "blocks.0.proj.weight": torch.randn(6, 5),
        "blocks.1.proj.weight": torch.randn(6, 5),
        "embed.weight": torch.randn(3, 7),
    }
    _component(
        copy, "controlnet", {"_class_name": "SomeControlNetModel"}, control, "diffusion_pytorch_model.safetensors"
    )
    # the text encoder as two shards with an index, next to a float16 variant that must not be counted too
    folder = copy / "text_encoder"
    (folder / "model.safetensors").unlink()
    names = sorted(tensors["text_encoder"])
    halves = names[: len(names) // 2], names[len(names) // 2 :]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors["text_encoder"][n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )
    save_file({n: t.half() for n, t in tensors["text_encoder"].items()}, str(folder / "model.fp16.safetensors"))
    plan = plan_layouts(copy, devices=2, **WORK)
    base = plan_layouts(root, devices=2, **WORK)
    for name in ("ulysses2", "ulysses2 +fsdp"):
        with_cn, without = _layout(plan, name).memory, _layout(base, name).memory
        assert with_cn.other_parameters == _numel(control) * ELEMENT
        assert with_cn.resident - without.resident == _numel(control) * ELEMENT
        assert with_cn.text_encoder_parameters == without.text_encoder_parameters
    assert dict(plan.models.counted_from)["text_encoder"] == "2 safetensors headers"


def test_headers_are_read_without_the_weights_and_an_index_alone_gives_its_total(tmp_path):
    tensors = {"a.weight": torch.zeros(4, 3), "layers.0.w": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    header = {t.name: (t.dtype, t.shape, t.nbytes) for t in read_safetensors_header(tmp_path / "model.safetensors")}
    assert header == {"a.weight": ("F32", (4, 3), 48), "layers.0.w": ("BF16", (2,), 4)}
    only_index = tmp_path / "index_only"
    only_index.mkdir()
    (only_index / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1000}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors"}})
    )
    weights = component_weights(only_index)
    assert weights.tensors is None and weights.nbytes == 1000 and weights.numel is None


def test_ldp_plan_prints_memory_per_rank_by_component(saved, capsys):
    root, tensors = saved
    command = [str(root), *"--devices 2 --memory 8GiB --height 32 --width 32 --frames 5 --text-tokens 16".split()]
    command += ["--cfg-calls", "separate"]
    assert ldp_plan(command) == 0
    out = capsys.readouterr().out
    assert "memory per rank by component" in out
    for name in ("transformer", "transformer_2", "text_encoder", "image_encoder", "vae"):
        assert f"\n  {name} " in out, name
    assert "img enc." in out and "transformer_2: WanTransformer3DModel" in out
    code = ldp_plan([*command, "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(r["memory"]["components"]) == set(tensors) for r in rows)


def test_a_module_with_two_experts_and_an_image_encoder_is_planned():
    """``strategy=auto``'s path: the modules of a LightningModule-like tree, Wan 2.2's two experts held together."""
    from tests.models import build_wan

    class TwoExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer, self.transformer_2 = build_wan(seed=0), build_wan(seed=1)
            self.image_encoder = _transformers_model(IMAGE_ENCODER)

    module = TwoExperts()
    plan = plan_layouts(module, devices=1, tokens=16, text_tokens=8, memory="8GiB", dtype="float32")
    assert [name for name, _ in plan.models.dits] == ["transformer", "transformer_2"]
    assert [e.name for e in plan.models.image_encoders] == ["image_encoder"] and not plan.models.text_encoders
    (one,) = plan.layouts
    expected = {
        name: sum(p.numel() for p in getattr(module, name).parameters()) * 4
        for name in ("transformer", "transformer_2", "image_encoder")
    }
    assert dict(one.memory.components) == expected


def test_fsdp_units_hold_less_from_blocks_to_layers_to_rows_and_the_others_are_listed_on_request():
    """Wan 2.1 14B on 8 devices: FSDP with the default units (rows streaming: no Linear gathered whole; layers with
    tensor parallelism) holds less on top of the shards than weight-layer units, which hold less than block units
    (the largest matrix, the root's 5120 x 30720 time projection, against a whole block); the other units are listed
    only on request (``Axes.fsdp_layers``), with the same shards."""
    from dataclasses import replace

    from lightning_dit_parallel.parallel.fsdp import resolve_fsdp_units
    from lightning_dit_parallel.planner.layouts import Axes

    work = dict(devices=8, dtype="bfloat16", height=720, width=1280, frames=81, cfg_calls="separate")
    source = Path(__file__).resolve().parent.parent / "examples" / "configs" / "wan2.1-t2v-14b"
    every = plan_layouts(source, memory="1TiB", axes=Axes(fsdp_layers=True), **work)
    by_layout = {e.layout: e for e in every.layouts}
    rows = [e for e in every.layouts if e.layout.fsdp and e.layout.fsdp_units == "rows"]
    assert rows
    for e in rows:
        layers = by_layout[replace(e.layout, fsdp_units="layers")]
        blocks = by_layout[replace(e.layout, fsdp_units="blocks")]
        assert e.memory.dit_gathered < layers.memory.dit_gathered < blocks.memory.dit_gathered, e.layout.describe()
        assert e.memory.dit_parameters == layers.memory.dit_parameters == blocks.memory.dit_parameters
        assert "fsdp(" not in e.layout.describe() and "+fsdp(blocks)" in blocks.layout.describe()
    default = plan_layouts(source, memory="1TiB", **work)
    fsdp = [e.layout for e in default.layouts if e.layout.fsdp]
    assert fsdp and all(layout.fsdp_units == resolve_fsdp_units("auto", layout.tp) for layout in fsdp)
