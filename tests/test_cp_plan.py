"""diffusers' own ``_cp_plan`` translated into a ``DiTPlan`` (``plan/cp_plan.py``), with the shipped plans hidden.

Seven classes that carry a ``_cp_plan`` (Flux, Flux2, Qwen-Image, Wan, LTX-Video, Helios with 4 of the 40 blocks its
``_cp_plan`` enumerates, MiniMax-H3 with its video and audio outputs gathered) run inside one ``Trainer.predict``
launch per layout (Ulysses and Ring on 2 and 4 ranks) and must equal their one-process output within relative 1e-5
on every rank. Token counts divide neither 2 nor 4; Qwen and LTX get a partly padded text mask.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HeliosTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3Transformer3DModel
from torch import nn

from lightning_dit_parallel import SequenceParallelStrategy, plan_for, registry
from lightning_dit_parallel.families import builtin_plan
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.plan.cp_plan import concat_orders, sequence_named
from lightning_dit_parallel.registry import find_planned_modules
from tests.models import tiny_wan
from tests.rank_outputs import max_relative_error
from tests.zoo import ZooCase, randn, seeded_model, text_mask
from tests.zoo import flux as zoo_flux
from tests.zoo_module import predict_zoo, predict_zoo_single

TEXT_DIM = 16


def build_flux2() -> Flux2Transformer2DModel:
    return seeded_model(
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            timestep_guidance_channels=16,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
    )


def flux2_inputs(height: int, width: int, text: int):
    def make(model: Flux2Transformer2DModel) -> dict:
        img_ids = torch.zeros(height, width, 4)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        txt_ids = torch.zeros(text, 4)
        txt_ids[:, 3] = torch.arange(text)
        return dict(
            hidden_states=randn(1, height * width, 16, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=img_ids.reshape(1, -1, 4).repeat(2, 1, 1),
            txt_ids=txt_ids[None].repeat(2, 1, 1),
            return_dict=False,
        )

    return make


def build_qwen() -> QwenImageTransformer2DModel:
    return seeded_model(
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        )
    )


def qwen_inputs(height: int, width: int, text: int):
    def make(model: QwenImageTransformer2DModel) -> dict:
        return dict(
            hidden_states=randn(1, height * width, 16, seed=1).repeat(2, 1, 1),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),
            encoder_hidden_states_mask=text_mask(text),
            timestep=torch.tensor([0.5, 0.5]),
            img_shapes=[(1, height, width)] * 2,
            return_dict=False,
        )

    return make


def build_wan() -> WanTransformer3DModel:
    return seeded_model(lambda: WanTransformer3DModel(**tiny_wan()))


def wan_inputs(frames: int, size: int, text: int):
    def make(model: WanTransformer3DModel) -> dict:
        return dict(
            hidden_states=randn(1, 4, frames, size, size, seed=1).repeat(2, 1, 1, 1, 1),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),
            timestep=torch.tensor([500, 500]),
            return_dict=False,
        )

    return make


def build_ltx() -> LTXVideoTransformer3DModel:
    return seeded_model(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=TEXT_DIM,
        )
    )


def ltx_inputs(frames: int, size: int, text: int):
    def make(model: LTXVideoTransformer3DModel) -> dict:
        return dict(
            hidden_states=randn(1, frames * size * size, 8, seed=1).repeat(2, 1, 1),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),
            timestep=torch.tensor([500, 500]),
            encoder_attention_mask=text_mask(text),
            num_frames=frames,
            height=size,
            width=size,
            return_dict=False,
        )

    return make


def build_helios() -> HeliosTransformer3DModel:
    """4 blocks: its _cp_plan gathers at blocks 0-39 whatever the depth (the entries past the end name nothing)."""
    return seeded_model(
        lambda: HeliosTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=TEXT_DIM,
            freq_dim=16,
            ffn_dim=32,
            num_layers=4,
            rope_dim=(4, 4, 4),
        )
    )


def build_minimax_h3() -> MiniMaxH3Transformer3DModel:
    return seeded_model(
        lambda: MiniMaxH3Transformer3DModel(
            num_attention_heads=4,
            attention_head_dim=24,
            hidden_size=48,
            num_layers=2,
            num_refiner_layers=1,
            ffn_dim=64,
            in_channels=4,
            audio_in_channels=8,
            patch_size=(1, 2, 2),
            text_dim=TEXT_DIM,
            freq_dim=16,
            time_embed_hidden_dim=32,
            time_embed_dim=32,
            rope_freq_dim=4,
        )
    )


def minimax_h3_inputs(text: int, video: int, audio: int):
    """One packed sequence of text, video and audio rows (text + video + audio tokens), two noise levels."""
    length = text + video + audio

    def make(model: MiniMaxH3Transformer3DModel) -> dict:
        ids = torch.arange(length)
        return dict(
            hidden_states=randn(1, video, 16, seed=1).repeat(2, 1, 1),  # patchified video rows, CFG: twice
            audio_hidden_states=randn(1, audio, 8, seed=3).repeat(2, 1, 1),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),
            timestep=torch.tensor([500.0, 0.0]),  # the noise level of the latents, and the clean text's
            timestep_indices=(ids < text).long(),
            token_tags=torch.tensor([2] * text + [0] * video + [1] * audio),
            position_ids=torch.stack([ids, ids % 4, ids % 3], dim=1),
            text_indices=ids[:text],
            video_indices=ids[text : text + video],
            audio_indices=ids[text + video :],
            return_dict=False,
        )

    return make


def video_and_audio(output) -> torch.Tensor:
    """Both outputs, (B, V, C) video and (B, A, C') audio rows, flattened side by side."""
    return torch.cat([output[0].flatten(1), output[1].flatten(1)], dim=1)


CASES = [
    ZooCase("cp_flux-16img-8txt", zoo_flux.build, zoo_flux.inputs(4, 4, 8)),
    ZooCase("cp_flux-15img-3txt", zoo_flux.build, zoo_flux.inputs(3, 5, 3)),
    ZooCase("cp_flux2-15img-3txt", build_flux2, flux2_inputs(3, 5, 3)),
    ZooCase("cp_qwen-15img-7txt", build_qwen, qwen_inputs(3, 5, 7)),
    ZooCase("cp_wan-27vid-7txt", build_wan, wan_inputs(3, 6, 7)),
    ZooCase("cp_ltx-27vid-7txt", build_ltx, ltx_inputs(3, 3, 7)),
    ZooCase("cp_helios-27vid-7txt", build_helios, wan_inputs(3, 6, 7)),
    # 3 text + 9 video + 3 audio = 15 packed rows; proj_out and audio_proj_out both gathered
    ZooCase("cp_minimax_h3-15rows", build_minimax_h3, minimax_h3_inputs(3, 9, 3), video_and_audio),
]

LAYOUTS = {
    "ulysses2": (2, dict(ulysses_degree=2)),
    "ring2": (2, dict(ring_degree=2)),
    "ulysses4": (4, dict(ulysses_degree=4)),
    "ring4": (4, dict(ring_degree=4)),
}


@pytest.fixture
def translated_only(monkeypatch):
    """Hide the shipped plans: every diffusers class is planned by the translation of its ``_cp_plan`` (the forked
    ranks inherit the patch)."""
    monkeypatch.setattr(registry.PLANS, "builtin", dict)


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    return predict_zoo_single(CASES)  # no plan is installed on one process


def test_sequence_names_and_concatenation_orders():
    names = ("hidden_states", "encoder_hidden_states_mask", "txt_ids", "vid_freqs", "audio_proj_out", "proj_out")
    assert [sequence_named(n) for n in names] == ["latent", "text", "text", "latent", "audio", "latent"]

    def processor(query, encoder_query, key, mlp):
        joint = torch.cat([encoder_query, query[:, :4]], dim=1)  # text first
        return joint, torch.cat([query, key, mlp.to(query)], dim=-1)  # one sequence: ignored

    assert concat_orders(processor) == (("text", "latent"),)


def test_translated_plans(translated_only):
    flux, ltx, qwen = zoo_flux.build(), build_ltx(), build_qwen()
    plan = plan_for(flux)
    assert dict(plan.self_attention) == {
        "transformer_blocks.*.attn": ("text", "latent"),  # FluxAttnProcessor: cat([encoder_query, query])
        "single_transformer_blocks.*.attn": ("text", "latent"),  # FluxSingleTransformerBlock: cat([text, image])
    }
    assert plan.blocks == ("transformer_blocks", "single_transformer_blocks")
    assert set(plan.split_inputs) == {"hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"}
    # LTX: diffusers cuts the text, which only cross-attention reads (its backend gathers it); here it stays whole
    plan = plan_for(ltx)
    assert set(plan.split_inputs) == {"hidden_states"} and plan.sequences == ("latent",)
    assert plan.cross_attention == ("transformer_blocks.*.attn2",)
    # Qwen: the rotary output (vid_freqs, txt_freqs) carries both sequences; the text mask is cut at every block
    plan = plan_for(qwen)
    assert [s.sequence for s in plan.split_outputs["pos_embed"]] == ["latent", "text"]
    assert set(plan.split_module_inputs_each_call) == {"transformer_blocks.0", "transformer_blocks.1"}
    assert plan_for(QwenImageTransformer2DModel) is None  # the translation reads the modules: instances only


def test_shipped_plan_wins():
    flux = zoo_flux.build()
    assert plan_for(flux) is builtin_plan(FluxTransformer2DModel)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_translated_hooks_on_one_rank_change_nothing(case: ZooCase, translated_only):
    model = case.build()
    with torch.no_grad():
        reference = case.output(model(**case.inputs(model)))
        handle = apply_sequence_parallel(model, plan_for(model), SequenceGroups())
        try:
            output = case.output(model(**case.inputs(model)))
        finally:
            handle.remove()
    assert torch.equal(output, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_translated_plans_equal_one_process(layout: str, translated_only, references, tmp_path: Path, record_property):
    devices, degrees = LAYOUTS[layout]
    outputs = predict_zoo(CASES, SequenceParallelStrategy(**degrees, start_method="fork"), devices, tmp_path)
    errors = {c.name: max(max_relative_error(out[c.name], references[c.name]) for out in outputs) for c in CASES}
    record_property("max_relative_error", errors)
    assert all(e <= 1e-5 for e in errors.values()), f"{layout}: {errors}"


class FluxWithoutTextCut(FluxTransformer2DModel):
    """diffusers-style plan that leaves the text whole although joint attention attends over it."""

    _cp_plan = {
        "": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class FluxWithMissingModule(FluxTransformer2DModel):
    _cp_plan = {"": {"hidden_states": ContextParallelInput(split_dim=1)}, "proj": ContextParallelOutput(gather_dim=1)}


def test_untranslatable_plans_raise(translated_only):
    config = dict(zoo_flux.build().config)
    with pytest.raises(
        ValueError,
        match=r"cannot be translated exactly: transformer_blocks.0.attn attends over"
        r" \('text', 'latent'\).*leaves \['text'\] whole",
    ):
        find_planned_modules(FluxWithoutTextCut(**config))
    with pytest.raises(ValueError, match=r"FluxWithMissingModule._cp_plan\['proj'\] names no module"):
        plan_for(FluxWithMissingModule(**config))
    # LTX-2 cuts the video only; its audio attends to the video in video_to_audio_attn, whose keys would be cut
    ltx2 = LTX2VideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        audio_in_channels=8,
        audio_out_channels=8,
        audio_num_attention_heads=4,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    with pytest.raises(ValueError, match=r"cross-attention transformer_blocks.0.video_to_audio_attn reads 'latent'"):
        plan_for(ltx2)


def test_no_plan_error_points_at_check_plan():
    with pytest.raises(ValueError, match="register_plan") as info:
        find_planned_modules(nn.Sequential(nn.Linear(2, 2)))
    assert "check_plan(model, inputs)" in str(info.value) and "ldp-check-plan MODULE:FACTORY" in str(info.value)
