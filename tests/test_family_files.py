"""Family files (``lightning_dit_parallel/families/``): one file holds every fact about a family, and the package
finds each fact there by class - the DiT plan, the reason a class has none, the VAE cut of the parallel decode and
the latent format the planner counts tokens with. Pure checks, one process."""

from __future__ import annotations

import types
from collections.abc import Mapping

import diffusers
import pytest
from torch import nn

from lightning_dit_parallel import families, registry
from lightning_dit_parallel.families import FACTS, facts, family_modules
from lightning_dit_parallel.plan import DiTPlan, LatentFormat, Split, VaeCut
from lightning_dit_parallel.planner.tokens import vae_factors


def test_every_family_file_declares_known_facts_of_diffusers_classes():
    seen = set()
    for module in family_modules():
        declared = [name for name in FACTS if hasattr(module, name)]
        assert declared, f"{module.__name__} declares none of {sorted(FACTS)}"
        # a mapping under another upper-case name is a misspelt fact (e.g. VAE_CUT): it would be silently ignored
        stray = [
            name
            for name, value in vars(module).items()
            if name.isupper() and name not in FACTS and isinstance(value, Mapping)
        ]
        assert not stray, f"{module.__name__} defines {stray}, which are not facts the package reads"
        for kind in declared:
            for class_name in getattr(module, kind):
                assert hasattr(diffusers, class_name), f"{module.__name__}.{kind} names {class_name}, not in diffusers"
                seen.add((kind, class_name))
    assert {k for k, _ in seen} >= {"PLANS", "VAE_CUTS", "LATENTS"}
    # the planner's latent format is only for DiTs that have a plan
    assert set(facts("LATENTS")) <= set(facts("PLANS"))


def test_vae_cuts_and_plans_are_found_through_one_registry():
    wan_vae = diffusers.AutoencoderKLWan
    assert registry.vae_cut_for(wan_vae) is facts("VAE_CUTS")["AutoencoderKLWan"]
    assert registry.plan_for(diffusers.WanTransformer3DModel) is facts("PLANS")["WanTransformer3DModel"]

    class MyVae(nn.Module):
        pass

    cut = VaeCut(decoder="decoder")
    registry.register_vae_cut(MyVae, cut)
    try:
        assert registry.vae_cut_for(MyVae()) is cut
        assert registry.vae_cut_for(type("Child", (MyVae,), {})) is cut  # subclasses inherit it
    finally:
        registry.unregister_vae_cut(MyVae)
    assert registry.vae_cut_for(MyVae) is None
    with pytest.raises(TypeError, match="expects a VaeCut"):
        registry.register_vae_cut(MyVae, facts("PLANS")["WanTransformer3DModel"])
    with pytest.raises(TypeError, match="expects a DiTPlan"):
        registry.register_plan(MyVae, cut)


@pytest.fixture
def new_family(monkeypatch):
    """A family added as one module: a DiT class and a VAE class of diffusers' naming, their plan, cut and latent
    format, and nothing anywhere else."""
    dit = type("NewTransformer2DModel", (nn.Module,), {"__module__": "diffusers.models.transformers.new"})
    vae = type("AutoencoderKLNew", (nn.Module,), {"__module__": "diffusers.models.autoencoders.new"})
    module = types.ModuleType("lightning_dit_parallel.families.new")
    plan = DiTPlan(
        split_outputs={"embed": Split("image", 1)},
        gather_outputs={"proj_out": Split("image", 1)},
        blocks=("blocks",),
        self_attention={"blocks.*.attn": ("image",)},
    )
    module.PLANS = {dit.__name__: plan}
    module.VAE_CUTS = {vae.__name__: VaeCut(attention=("NewAttention",))}
    module.LATENTS = {dit.__name__: LatentFormat(spatial=16, temporal=1, channels=48)}
    shipped = family_modules()
    monkeypatch.setattr(families, "family_modules", lambda: (*shipped, module))
    facts.cache_clear()
    yield dit, vae, module
    facts.cache_clear()


def test_a_new_family_is_one_file(new_family):
    dit, vae, module = new_family
    assert registry.plan_for(dit) is module.PLANS[dit.__name__]
    assert registry.vae_cut_for(vae) is module.VAE_CUTS[vae.__name__]
    assert vae_factors(dit.__name__, {}, None) == (16, 1, 48)


def test_a_wrong_fact_is_refused_with_its_file(new_family):
    _, _, module = new_family
    module.LATENTS = {"NewTransformer2DModel": (16, 1, 48)}  # a tuple, not a LatentFormat
    facts.cache_clear()
    with pytest.raises(TypeError, match=r"families\.new\.LATENTS\['NewTransformer2DModel'\] is not a LatentFormat"):
        facts("LATENTS")
    module.LATENTS = {}
    module.PLANS = {"WanTransformer3DModel": facts("PLANS")["WanTransformer3DModel"]}  # already in wan.py
    facts.cache_clear()
    with pytest.raises(ValueError, match="WanTransformer3DModel is in PLANS of both"):
        facts("PLANS")
