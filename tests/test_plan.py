"""Plan declaration and resolution (no process group)."""

import pytest
from torch import nn

from lightning_dit_parallel import DiTPlan, Split, plan_for, register_plan, unregister_plan
from lightning_dit_parallel.registry import find_planned_modules
from tests.models import build_dit, build_pixart


class TinyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.final_layer = nn.Linear(8, 4)


PLAN = DiTPlan(
    split_outputs={"x_embedder": Split("image", 1)},
    gather_outputs={"final_layer": Split("image", 1)},
    blocks=("blocks",),
    self_attention={"blocks.*": ("image",)},
)


def test_builtin_plans_found_by_class():
    assert plan_for(build_dit()).blocks == ("transformer_blocks",)
    assert plan_for(build_pixart()).cross_attention == ("transformer_blocks.*.attn2",)


def test_register_and_class_attribute():
    assert plan_for(TinyDiT) is None
    register_plan(TinyDiT, PLAN)
    try:
        assert plan_for(TinyDiT()) is PLAN

        class Sub(TinyDiT):
            pass

        assert plan_for(Sub) is PLAN  # subclasses inherit
    finally:
        unregister_plan(TinyDiT)

    class WithAttribute(TinyDiT):
        dit_plan = PLAN

    assert plan_for(WithAttribute) is PLAN


def test_find_planned_modules_outermost_only():
    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = nn.Linear(2, 2)
            self.transformer = build_dit()

    found = find_planned_modules(Module())
    assert [path for path, _, _ in found] == ["transformer"]


def test_missing_plan_error_says_how_to_declare():
    with pytest.raises(ValueError, match="register_plan"):
        find_planned_modules(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gather_outputs={"a": Split()}, self_attention={"b": ("image",)}), "split point"),
        (dict(split_outputs={"a": Split()}, self_attention={"b": ("image",)}), "gather point"),
        (dict(split_outputs={"a": Split()}, gather_outputs={"a": Split()}), "self_attention"),
        (
            dict(split_outputs={"a": Split()}, gather_outputs={"a": Split()}, self_attention={"b": ("text",)}),
            "split sequences",
        ),
    ],
)
def test_incomplete_plans_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTPlan(**kwargs)


def test_register_plan_type_checks():
    with pytest.raises(TypeError):
        register_plan(object, PLAN)
    with pytest.raises(TypeError):
        register_plan(TinyDiT, {"split_outputs": {}})


@pytest.mark.parametrize(
    "cross, match",
    [
        (
            ("transformer_blocks.*.attn3",),
            r"cross_attention patterns \['transformer_blocks.\*.attn3'\] match no module",
        ),
        (("transformer_blocks.*.attn*",), r"\['transformer_blocks.0.attn1', .*\] .* both self-attention and cross"),
    ],
)
def test_cross_attention_patterns_are_checked(cross, match):
    from dataclasses import replace

    from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
    from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel

    model = build_pixart()
    plan = replace(plan_for(model), cross_attention=cross)
    with pytest.raises(ValueError, match=match):
        apply_sequence_parallel(model, plan, SequenceGroups())  # one rank: the checks need no process group
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "nothing installed"


def test_module_paths_count_from_the_end_and_name_outermost_matches():
    from lightning_dit_parallel.plan import module_paths

    modules = dict(build_dit(layers=2).named_modules())
    assert module_paths(modules, "transformer_blocks.-1") == ["transformer_blocks.1"]
    assert module_paths(modules, "transformer_blocks.-2.attn1") == ["transformer_blocks.0.attn1"]
    assert module_paths(modules, "transformer_blocks.-3") == []
    assert module_paths(modules, "proj_out_2.-1") == []  # not a block list
    assert module_paths(modules, "transformer_blocks.*") == ["transformer_blocks.0", "transformer_blocks.1"]
    assert module_paths(modules, "transformer_blocks.*.attn1") == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert module_paths(modules, "proj_out_2") == ["proj_out_2"]
    assert module_paths(modules, "missing.*") == []


def test_gather_paths_from_the_end_are_checked():
    from dataclasses import replace

    from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
    from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel

    model = build_dit(layers=2)
    plan = replace(plan_for(model), gather_outputs={"transformer_blocks.-3": Split("image", 1)})
    with pytest.raises(ValueError, match=r"Plan module paths \['transformer_blocks.-3'\] do not exist"):
        apply_sequence_parallel(model, plan, SequenceGroups())
    plan = replace(plan_for(model), gather_outputs={"transformer_blocks.-1": Split("image", 1)})
    apply_sequence_parallel(model, plan, SequenceGroups()).remove()


def test_each_call_patterns_name_the_outermost_modules():
    """``transformer_blocks.*`` is each block; the blocks' attention modules also take ``attention_mask`` and the
    norms do not, but neither is matched."""
    from dataclasses import replace

    from lightning_dit_parallel.parallel.sequence.module_inputs import module_input_hooks

    model = build_dit(layers=2)
    plan = replace(plan_for(model), split_module_inputs_each_call={"transformer_blocks.*": {"attention_mask": Split()}})
    assert [hook.path for hook in module_input_hooks(plan, model)] == ["transformer_blocks.0", "transformer_blocks.1"]


def test_class_without_an_exact_plan_fails_with_the_reason(monkeypatch):
    """A diffusers class that a family lists in ``UNSUPPORTED`` fails with the reason (no family lists one today:
    Qwen-Image 2.1, the last, runs under Ulysses; see tests/zoo/qwenimage21.py)."""
    from lightning_dit_parallel import registry

    class Blocked(nn.Module):
        pass

    monkeypatch.setattr(registry, "unsupported_reason", lambda cls: "its attention is odd." if cls is Blocked else None)
    with pytest.raises(
        ValueError, match=r"Blocked \(transformer\) cannot be parallelized exactly: its attention is odd"
    ):
        find_planned_modules(nn.ModuleDict({"text_encoder": nn.Linear(2, 2), "transformer": Blocked()}))


def test_optional_modules_are_dropped_for_the_configs_without_them():
    """Cosmos-Predict2 (``extra_pos_embed_type=None``) has no ``learnable_pos_embed``: ``plan_for`` the model gives the
    plan without that cut (the class's plan keeps it); a plan entry that is not listed as optional stays required."""
    from dataclasses import replace

    from diffusers import CosmosTransformer3DModel

    from lightning_dit_parallel.plan.optional import without_absent
    from tests.zoo import cosmos

    with_pos, without = cosmos.build()(), cosmos.build(extra_pos_embed_type=None)()
    assert plan_for(with_pos) is plan_for(CosmosTransformer3DModel)
    assert "learnable_pos_embed" in plan_for(CosmosTransformer3DModel).split_outputs
    assert "learnable_pos_embed" not in plan_for(without).split_outputs
    assert "rope" in plan_for(without).split_outputs
    required = replace(plan_for(CosmosTransformer3DModel), optional_modules=())
    assert without_absent(required, without) is required  # nothing optional: the sequence-parallel check then fails
    from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
    from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel

    with pytest.raises(ValueError, match=r"Plan module paths \['learnable_pos_embed'\] do not exist"):
        apply_sequence_parallel(without, required, SequenceGroups())
