"""``check_plan`` and ``ldp-check-plan`` find a broken plan (a missing split, a wrong concatenation order) and pass
the right one, on a small own DiT with joint attention over text and image tokens; the factory of
``examples/own_dit.py`` passes through the command's file form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dit_parallel import DiTPlan, Split, check_plan
from lightning_dit_parallel.app.plan_check import LayoutCheck, main, parse_layout, silent_self_attention

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_dit.py"


class JointAttention(nn.Module):
    """Joint attention over ``cat([context, x])`` (text first), with separate projections per stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        n, s, d = x.shape
        t = context.shape[1]

        def heads(a: Tensor, b: Tensor) -> Tensor:  # 2 x (N, ., D) -> (N, H, T+S, D/H)
            return torch.cat([b, a], dim=1).reshape(n, t + s, self.heads, -1).transpose(1, 2)

        q = heads(self.to_q(x), self.add_q_proj(context))
        k = heads(self.to_k(x), self.add_k_proj(context))
        v = heads(self.to_v(x), self.add_v_proj(context))
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t + s, d))
        return out[:, t:], out[:, :t]  # (N, T+S, D) -> image (N, S, D), text (N, T, D)


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        x = x + pos  # a per-token position signal: cut like the image tokens
        a, c = self.attn(self.norm(x), self.norm_context(context))
        x = x + a
        return x + self.mlp(x), context + c


class JointDiT(nn.Module):
    """x: (N, S, C) image tokens, context: (N, T, Cc) text tokens, pos: (N, S, D) -> (N, S, C)."""

    dit_plan = DiTPlan(
        split_inputs={"x": Split("image", 1), "context": Split("text", 1), "pos": Split("image", 1)},
        gather_outputs={"final": Split("image", 1)},
        blocks=("blocks",),
        self_attention={"blocks.*.attn": ("text", "image")},
    )

    def __init__(self, channels: int = 8, context_channels: int = 12, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.x_embedder, self.context_embedder = nn.Linear(channels, dim), nn.Linear(context_channels, dim)
        self.blocks = nn.ModuleList([JointBlock(dim, heads) for _ in range(2)])
        self.final = nn.Linear(dim, channels)

    def forward(self, x: Tensor, context: Tensor, pos: Tensor) -> Tensor:
        x, context = self.x_embedder(x), self.context_embedder(context)  # (N, S, D), (N, T, D)
        for block in self.blocks:
            x, context = block(x, context, pos)
        return self.final(x)  # (N, S, C)


class MissingSplitDiT(JointDiT):
    dit_plan = dataclasses.replace(
        JointDiT.dit_plan, split_inputs={"x": Split("image", 1), "context": Split("text", 1)}
    )


class WrongOrderDiT(JointDiT):
    dit_plan = dataclasses.replace(JointDiT.dit_plan, self_attention={"blocks.*.attn": ("image", "text")})


def inputs(image: int = 15, text: int = 3) -> dict[str, Tensor]:
    """15 image and 3 text tokens: padded shards on 2 and 4 ranks. The CFG batch: the same latents twice."""
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(1, image, 8, generator=g).repeat(2, 1, 1),
        context=torch.randn(2, text, 12, generator=g),
        pos=torch.randn(1, image, 32, generator=g).expand(2, -1, -1),
    )


def _seeded(cls: type[JointDiT]) -> tuple[JointDiT, dict[str, Tensor]]:
    torch.manual_seed(0)
    return cls(), inputs()


def right() -> tuple[JointDiT, dict[str, Tensor]]:
    return _seeded(JointDiT)


def missing_split() -> tuple[JointDiT, dict[str, Tensor]]:
    return _seeded(MissingSplitDiT)


def wrong_order() -> tuple[JointDiT, dict[str, Tensor]]:
    return _seeded(WrongOrderDiT)


def test_parse_layout():
    assert [parse_layout(n) for n in ("ulysses4", "ring2", "usp2x2")] == [(4, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="Unknown layout 'tp2'"):
        parse_layout("tp2")


def test_right_plan_passes(capsys):
    assert main([f"{__name__}:right", "--layouts", "ulysses2,ring2"]) == 0
    report = capsys.readouterr().out
    assert "verdict: PASS" in report and report.count("sharded attention: blocks.*.attn (2)") == 2, report


def test_missing_split_is_found(capsys):
    assert main([f"{__name__}:missing_split", "--layouts", "ring2"]) == 1
    report = capsys.readouterr().out
    assert "verdict: FAIL" in report and "error: RuntimeError" in report, report
    assert "forward(pos): shape (2, 15, 32), dim 1 has 15 tokens = image" in report, report
    assert "blocks.*(pos): shape (2, 15, 32), dim 1 has 15 tokens = image" in report, report


def test_wrong_order_is_found():
    model, example = wrong_order()
    result = check_plan(model, example, ["ulysses2"])
    (check,) = result.layouts
    assert isinstance(check, LayoutCheck) and check.error is None
    assert not result.passed and check.max_relative_error > 1e-3, result.report()
    assert check.sharded_attention == ("blocks.0.attn", "blocks.1.attn") and not check.uncut_arguments
    assert result.sequences == {"image": 15, "text": 3}


def test_silent_self_attention_is_found():
    class ManualAttention(JointAttention):  # softmax by hand: never calls F.scaled_dot_product_attention
        def forward(self, x, context):
            return self.proj(x), self.add_v_proj(context)

    model, example = right()
    model.blocks[1].attn = ManualAttention(32, 4)
    assert silent_self_attention(model, JointDiT.dit_plan, (), example) == ("blocks.1.attn",)


def test_own_dit_example_factory_passes_through_the_file_form(capsys):
    assert main([f"{EXAMPLE}:check_plan_factory", "--layouts", "ring2"]) == 0, capsys.readouterr().out


def test_model_without_plan_exits_2(capsys):
    assert main([f"{__name__}:no_plan"]) == 2
    assert "check_plan" in capsys.readouterr().err


def no_plan() -> tuple[nn.Module, dict]:
    return nn.Linear(2, 2), {"input": torch.zeros(1, 2)}
