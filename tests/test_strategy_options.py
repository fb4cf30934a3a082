"""The strategy's grouped options (no processes): option objects, the keyword aliases that fill them, and the nested
Hydra nodes with the override paths of earlier versions."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_dit_parallel import (
    AutoOptions,
    DistriFusionOptions,
    DiTParallelStrategy,
    PatchParallelStrategy,
    PipelineOptions,
    PipelineStrategy,
)


def test_aliases_fill_the_option_objects():
    grouped = DiTParallelStrategy(pp_degree=2, pipeline=PipelineOptions("pipefusion", num_patches=4, warmup_steps=2))
    flat = DiTParallelStrategy(pp_degree=2, pp_mode="pipefusion", num_patches=4, warmup_steps=2)
    preset = PipelineStrategy(pp_degree=2, mode="pipefusion", num_patches=4, warmup_steps=2)
    assert grouped._pipeline == flat._pipeline == preset._pipeline == PipelineOptions("pipefusion", 4, 2)
    # an alias fills a field the object leaves at its default
    mixed = DiTParallelStrategy(pp_degree=2, pipeline=PipelineOptions("pipefusion"), num_patches=3)
    assert mixed._pipeline == PipelineOptions("pipefusion", 3)
    assert PipelineStrategy(pp_degree=2, layers_per_stage=[1, 3])._pipeline.layers_per_stage == (1, 3)
    auto = DiTParallelStrategy(auto=True, height=256, width=256, memory="8GiB")
    assert auto._auto == AutoOptions(height=256, width=256, memory="8GiB")
    assert DiTParallelStrategy(auto=AutoOptions(tokens=64))._auto == AutoOptions(tokens=64)
    assert PatchParallelStrategy(warmup_steps=3)._distrifusion == DistriFusionOptions(3)
    assert PatchParallelStrategy(distrifusion=DistriFusionOptions(2))._distrifusion == DistriFusionOptions(2)


def test_one_field_given_twice_or_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match=r"num_patches=3 and pipeline.num_patches=4 both set"):
        DiTParallelStrategy(pp_degree=2, pipeline=PipelineOptions("pipefusion", 4), num_patches=3)
    with pytest.raises(TypeError, match=r"height=512 and auto.height=256 both set"):
        DiTParallelStrategy(auto=AutoOptions(height=256), height=512)
    with pytest.raises(TypeError, match=r"warmup_steps=3 and distrifusion.warmup_steps=2 both set"):
        PatchParallelStrategy(warmup_steps=3, distrifusion=DistriFusionOptions(2))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['num_patch'\]"):
        DiTParallelStrategy(pp_degree=2, num_patch=4)
    with pytest.raises(TypeError, match="pipeline must be a PipelineOptions"):
        DiTParallelStrategy(pp_degree=2, pipeline={"mode": "pipefusion"})
    with pytest.raises(TypeError, match=r"sets \['pipeline'\] itself"):
        PatchParallelStrategy(pipeline=PipelineOptions())


def test_each_object_validates_its_fields_and_one_function_the_rest():
    with pytest.raises(ValueError, match="num_patches is a PipeFusion option, but mode='microbatch'"):
        DiTParallelStrategy(pp_degree=2, num_patches=4)
    with pytest.raises(ValueError, match="auto sizes must be positive integers"):
        AutoOptions(height=0)
    with pytest.raises(ValueError, match=r"\['tokens'\] are options of auto=True"):
        DiTParallelStrategy(tokens=64)
    with pytest.raises(ValueError, match="auto=True chooses the degrees"):
        DiTParallelStrategy(auto=True, pipeline=PipelineOptions(num_microbatches=2))
    with pytest.raises(ValueError, match="does not compose with PipeFusion"):
        DiTParallelStrategy(pp_degree=2, pipeline=PipelineOptions("pipefusion"), cache="fbcache")


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        return instantiate(compose(config_name="predict", overrides=overrides).strategy)


def test_nested_hydra_nodes_and_the_flat_override_paths():
    assert _compose(["strategy=pipefusion", "strategy.pipeline.num_patches=4"])._pipeline == PipelineOptions(
        "pipefusion", 4
    )
    # the keyword aliases still reach the strategy from the command line (added with +, as any unlisted argument)
    flat = _compose(["strategy=pipefusion", "+strategy.num_patches=4", "+strategy.text_tokens=every_patch"])
    assert flat._pipeline == PipelineOptions("pipefusion", 4, text_tokens="every_patch")
    assert _compose(["strategy=pipeline", "strategy.pipeline.num_microbatches=2"])._pipeline.num_microbatches == 2
    hybrid = _compose(["strategy=hybrid", "strategy.pp_degree=2", "strategy.cfg_degree=1", "strategy.fsdp=false"])
    assert hybrid._requested_layout.pp == 2 and hybrid._pipeline == PipelineOptions()
    assert _compose(["strategy=distrifusion", "strategy.warmup_steps=2"])._distrifusion == DistriFusionOptions(2)
    assert _compose(["strategy=distrifusion", "strategy.distrifusion.warmup_steps=3"])._distrifusion.warmup_steps == 3
    auto = _compose(["strategy=auto", "strategy.auto.height=256", "strategy.auto.width=256"])
    assert auto._auto == AutoOptions(height=256, width=256)
    assert _compose(["strategy=auto", "+strategy.tokens=64"])._auto.tokens == 64
