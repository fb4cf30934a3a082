"""peft LoRA under tensor parallelism: LoRA layers split with their base layer (``parallel/tensor/lora.py``).

Two families, two LoRA adapters each, loaded the diffusers way (``load_lora_adapter`` of a seeded state dict built
here, non-zero ``lora_B`` so that the adapters change the output): Flux (diffusers' ``_tp_plan``, LoRA on the packed
row-wise single-stream ``proj_out``) and PixArt with fused q/k/v projections (the default layout, LoRA on the packed
column-wise ``to_qkv``). Under ``dp 2 x tp 2`` and ``tp 2 x ulysses 2`` (one launch of 4 ranks), every rank's samples
equal the one-process samples for: adapter "a"; both adapters with ``set_adapters`` weights; adapter "b" after
removing and applying tensor parallelism again (what a second predict in the same process does); both adapters fused
into the weights. After every removal the model holds plain tensors equal to the ones it had.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_dit_parallel import ParallelLayout, parallelize, plan_for
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.parallel.tensor import resolve_layout
from tests.distributed import run_on_ranks
from tests.models import build_flux, flux_sampler, pixart_sampler
from tests.test_tensor_parallel import build_pixart_fused, loader

pytest.importorskip("peft")

#: projections that get LoRA factors, by the end of their path inside the blocks
TARGETS: dict[str, tuple[str, ...]] = {
    "flux": (
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "norm1.linear",
        "proj_mlp",
        "proj_out",
    ),
    "pixart_fused": ("attn1.to_qkv", "attn1.to_out.0", "attn2.to_q", "attn2.to_kv", "ff.net.0.proj", "ff.net.2"),
}

FAMILIES: dict[str, Callable[[], DiffusionSampler]] = {
    "flux": lambda: flux_sampler(build_flux(), 3, 5, steps=2),
    "pixart_fused": lambda: pixart_sampler(build_pixart_fused(), steps=2),
}


def set_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """diffusers' ``set_adapters`` (Flux); for a model without diffusers' LoRA mixin (PixArt) the function it calls."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    if hasattr(model, "set_adapters"):
        model.set_adapters(names, weights=weights)
    else:
        set_weights_and_activate_adapters(model, names, weights or [1.0] * len(names))


def fuse(model: nn.Module, names: list[str]) -> None:
    """diffusers' ``fuse_lora`` (Flux), or peft's ``merge`` of every LoRA layer (what it calls)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "fuse_lora"):
        model.fuse_lora(adapter_names=names)
    else:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=names)


#: name -> how the adapters are set before sampling; "fused": both, weighted, fused into the base weights
SETTINGS: dict[str, Callable[[nn.Module], None]] = {
    "a": lambda m: set_adapters(m, ["a"]),
    "a+b": lambda m: set_adapters(m, ["a", "b"], [0.7, 0.4]),
    "b": lambda m: set_adapters(m, ["b"]),
    "fused": lambda m: (set_adapters(m, ["a", "b"], [0.7, 0.4]), fuse(m, ["a", "b"])),
}

LAYOUTS = {"dp2_tp2": dict(dp=2, tp=2), "tp2_ulysses2": dict(tp=2, ulysses=2)}


def lora_state_dict(model: nn.Module, family: str, seed: int, rank: int = 4) -> dict[str, Tensor]:
    """A diffusers-format LoRA (``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r)), seeded."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.endswith(TARGETS[family]) and "blocks." in path:
            state[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
            state[f"{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
    return state


def sampler_with_lora(family: str) -> DiffusionSampler:
    """The family's sampler with adapters "a" and "b": diffusers' ``load_lora_adapter`` where the model has it (Flux),
    else peft's ``inject_adapter_in_model`` and ``set_peft_model_state_dict`` (PixArt)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    sampler = FAMILIES[family]()
    model = sampler.transformer
    states = [lora_state_dict(model, family, seed) for seed in range(2)]  # of the plain Linears
    for name, state in zip(("a", "b"), states):
        if hasattr(model, "load_lora_adapter"):
            model.load_lora_adapter(state, adapter_name=name, prefix=None)
        else:
            targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), model, adapter_name=name)
            set_peft_model_state_dict(model, state, adapter_name=name)
    return sampler


def _lora_on_ranks(rank: int, world: int, references: dict[str, Tensor]) -> dict[str, object]:
    batch = next(iter(loader()))
    results: dict[str, object] = {}
    for layout_name, degrees in LAYOUTS.items():
        layout = ParallelLayout(**degrees).resolve(world)
        mesh = layout.build_mesh("cpu")
        for family in FAMILIES:
            sampler = sampler_with_lora(family)
            transformer = sampler.transformer
            for setting, apply in SETTINGS.items():
                apply(transformer)
                before = {k: v.clone() for k, v in transformer.state_dict().items()}
                handle = parallelize(sampler, layout, mesh)
                try:
                    if setting == "a":
                        results[f"{family} {layout_name} shards"] = _shards(transformer, family)
                    samples = sampler.sample(batch)
                finally:
                    handle.remove()
                reference = references[f"{family} {setting}"]
                error = ((samples - reference).abs().max() / reference.abs().max()).item()
                after = transformer.state_dict()
                restored = all(type(v) is torch.Tensor and torch.equal(v, before[k]) for k, v in after.items())
                results[f"{family} {layout_name} {setting}"] = (error, restored)
    return results


def _shards(transformer: nn.Module, family: str) -> dict[str, str]:
    """Which LoRA factors are split, and how (placements of their DTensor weights; "whole" for plain tensors)."""
    paths = {
        "flux": [
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_out.0",
            "single_transformer_blocks.0.proj_out",
            "transformer_blocks.0.norm1.linear",
        ],
        "pixart_fused": ["transformer_blocks.0.attn1.to_qkv", "transformer_blocks.0.attn1.to_out.0"],
    }[family]
    found = {}
    for path in paths:
        module = transformer.get_submodule(path)
        for part in ("base_layer", "lora_A.a", "lora_B.a"):
            weight = module.get_submodule(part).weight
            found[f"{path}.{part}"] = str(weight.placements[0]) if hasattr(weight, "placements") else "whole"
    return found


@pytest.fixture(scope="module")
def references() -> dict[str, Tensor]:
    """One-process samples for every family and adapter setting, and without adapters (``<family> none``)."""
    batch = next(iter(loader()))
    found = {}
    for family in FAMILIES:
        found[f"{family} none"] = FAMILIES[family]().sample(batch)
        sampler = sampler_with_lora(family)
        for setting, apply in SETTINGS.items():
            apply(sampler.transformer)
            found[f"{family} {setting}"] = sampler.sample(batch)
    return found


def test_lora_changes_the_samples(references):
    """The test LoRAs matter: each setting moves the samples by more than 1% of their largest value."""
    for family in FAMILIES:
        plain = references[f"{family} none"]
        for setting in SETTINGS:
            change = ((references[f"{family} {setting}"] - plain).abs().max() / plain.abs().max()).item()
            assert change > 1e-2, f"{family} {setting}: the LoRA changes the samples by only {change:.1e}"


def test_lora_under_tensor_parallel_equals_one_process(references):
    results = run_on_ranks(4, _lora_on_ranks, references)
    problems = []
    for key in results[0]:
        if key.endswith("shards"):
            continue
        for rank, result in enumerate(results):
            error, restored = result[key]
            if not error <= 1e-5:
                problems.append(f"{key} rank {rank}: max relative error {error:.2e}")
            if not restored:
                problems.append(f"{key} rank {rank}: the weights after removal differ from those before")
    assert not problems, "; ".join(problems)
    flux = results[0]["flux dp2_tp2 shards"]
    assert flux["transformer_blocks.0.attn.to_q.base_layer"] == "S(0)"  # column-wise: base rows ...
    assert flux["transformer_blocks.0.attn.to_q.lora_B.a"] == "S(0)"  # ... and lora_B's output features
    assert flux["transformer_blocks.0.attn.to_q.lora_A.a"] == "whole"
    assert flux["transformer_blocks.0.attn.to_out.0.base_layer"] == "S(1)"  # row-wise: input features
    assert flux["transformer_blocks.0.attn.to_out.0.lora_A.a"] == "S(1)"
    assert flux["transformer_blocks.0.attn.to_out.0.lora_B.a"] == "whole"
    assert flux["single_transformer_blocks.0.proj_out.lora_A.a"] == "S(1)"  # packed parts, row-wise
    assert flux["transformer_blocks.0.norm1.linear.lora_B.a"] == "whole"  # gathered modulation: adapters whole
    pixart = results[0]["pixart_fused tp2_ulysses2 shards"]
    assert pixart["transformer_blocks.0.attn1.to_qkv.lora_B.a"] == "S(0)"  # packed parts, column-wise


def test_lora_layout_and_refusals():
    """The resolved layout names the base layer and the factors; DoRA is refused at setup with the reason."""
    from peft import LoraConfig

    sampler = sampler_with_lora("flux")
    model = sampler.transformer
    styles = resolve_layout(model, plan_for(model)).styles
    assert styles["transformer_blocks.0.attn.to_q.base_layer"] == "colwise"
    assert styles["transformer_blocks.0.attn.to_q.lora_B.a"] == styles["transformer_blocks.0.attn.to_q.lora_B.b"]
    assert "transformer_blocks.0.attn.to_q.lora_A.a" not in styles
    assert styles["transformer_blocks.0.attn.to_out.0.lora_A.b"] == "rowwise"
    proj_out = styles["single_transformer_blocks.0.proj_out.lora_A.a"]
    inner = model.single_transformer_blocks[0].attn.inner_dim
    assert proj_out.style == "rowwise" and proj_out.blocks == (inner, 4 * inner)  # attention, MLP widths
    model.add_adapter(LoraConfig(r=2, target_modules=["to_k"], use_dora=True), adapter_name="d")
    with pytest.raises(ValueError, match=r"to_k: LoRA variant \(DoRA .*\['d'\]"):
        resolve_layout(model, plan_for(model))
