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
        (dict(split_outputs={"a": Split()}, gather_outputs={"a": Split()}, self_attention={"b": ("text",)}), "split sequences"),
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
        (("transformer_blocks.*.attn3",), r"cross_attention patterns \['transformer_blocks.\*.attn3'\] match no module"),
        (("transformer_blocks.*.attn*",), r"\['transformer_blocks.0.attn1', .*\] .* both self-attention and cross"),
    ],
)
def test_cross_attention_patterns_are_checked(cross, match):
    from dataclasses import replace

    from lightning_dit_parallel.sequence.groups import SequenceGroups
    from lightning_dit_parallel.sequence.parallelize import apply_sequence_parallel

    model = build_pixart()
    plan = replace(plan_for(model), cross_attention=cross)
    with pytest.raises(ValueError, match=match):
        apply_sequence_parallel(model, plan, SequenceGroups())  # one rank: the checks need no process group
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "nothing installed"
