"""A sharded encoder's batch split over the ranks that encode the same prompts (``parallel/fsdp/encoder_rows.py``):
every output equals the whole encoder's in one process (float32, relative 1e-5) for batches that do not divide the
ranks, each rank computes only its rows, a call without a batch to cut goes whole, and misuse (ranks called with
different batches, an encoder whose outputs have no batch dim) raises the same ``ValueError`` on every rank instead
of hanging. One launch of 2 and one of 4 gloo ranks run every case."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_dit_parallel.parallel.fsdp import apply_encoder_rows, apply_fsdp, encoder_units
from tests.distributed import run_on_ranks
from tests.pipelines import WORDS, clip_vision_encoder, umt5_encoder
from tests.rank_outputs import max_relative_error


def _tokens(batch: int) -> dict[str, torch.Tensor]:
    """``batch`` prompts of 7 ids with different lengths (right-padded with 0), as pipelines call a T5."""
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, len(WORDS) + 3, (batch, 7), generator=generator)
    lengths = torch.arange(batch) % 5 + 3
    mask = (torch.arange(7) < lengths[:, None]).long()  # (batch, 7)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _pixels(batch: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))}


def _outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the output with ``output_hidden_states=True`` (hidden states entry by entry)."""
    out = model(**inputs, output_hidden_states=True)
    found = {}
    for key, value in out.items():
        values = value if isinstance(value, tuple) else (value,)
        found.update({f"{key}[{i}]": v.detach() for i, v in enumerate(values) if isinstance(v, torch.Tensor)})
    return found


class _NoBatchOutput(nn.Module):
    """An encoder that also returns a tensor without the batch dim (a mean over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(x)
        return y, y.mean(0).unsqueeze(0).expand(7, 4)


def _rows_seen(module: nn.Module) -> tuple[list[int], list]:
    """The batch sizes reaching ``module``'s embeddings, first called first (the token or patch embedding: what this
    rank computes; T5's position bias table comes later, with (tokens, tokens) indices)."""
    seen: list[int] = []
    layers = [m for m in module.modules() if isinstance(m, (nn.Embedding, nn.Conv2d))]
    return seen, [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0])) for m in layers]


def _cases(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    report: dict = {}
    for name, build, inputs in (("umt5", umt5_encoder, _tokens), ("clip_vision", clip_vision_encoder, _pixels)):
        model = build().eval()
        for batch in (1, world - 1, world + 1, 2 * world + 1):
            if batch < 1:
                continue
            whole = _outputs(model, inputs(batch))
            sharding = apply_fsdp(model, encoder_units(model), mesh)
            rows = apply_encoder_rows(model, group)
            seen, handles = _rows_seen(model)
            try:
                split = _outputs(model, inputs(batch))
            finally:
                for handle in handles:
                    handle.remove()
                rows.remove()
                sharding.remove()
            common = sorted(set(whole) & set(split))
            report[f"{name} batch {batch}"] = {
                "error": max(max_relative_error(split[k], whole[k]) for k in common),
                "keys": (sorted(whole), sorted(split)),
                "shapes": [k for k in common if split[k].shape != whole[k].shape],
                "rows": seen[0],
                "expected_rows": batch if batch == 1 else -(-batch // world),
            }
    model = umt5_encoder().eval()
    rows = apply_encoder_rows(model, group)
    try:
        model(**_tokens(2 if rank == 0 else 3))
        report["different batches"] = "no error"
    except ValueError as exc:
        report["different batches"] = str(exc)
    finally:
        rows.remove()
    odd = _NoBatchOutput()
    rows = apply_encoder_rows(odd, group)
    try:
        odd(torch.randn(3, 4))
        report["no batch dim"] = "no error"
    except ValueError as exc:
        report["no batch dim"] = str(exc)
    finally:
        rows.remove()
    return report


@pytest.fixture(scope="module", params=[2, 4])
def report(request) -> list[dict]:
    return run_on_ranks(request.param, _cases, timeout_s=120)


def test_every_output_equals_the_whole_encoder_and_each_rank_computes_its_rows(report):
    for rank, cases in enumerate(report):
        for name, case in cases.items():
            if not isinstance(case, dict):
                continue
            assert case["keys"][0] == case["keys"][1] and not case["shapes"], (rank, name, case)
            assert case["error"] <= 1e-5, (rank, name, case["error"])
            assert case["rows"] == case["expected_rows"], (rank, name, case["rows"])


def test_misuse_raises_on_every_rank(report):
    for cases in report:
        assert "called with batches" in cases["different batches"], cases["different batches"]
        assert "without a batch dim" in cases["no batch dim"], cases["no batch dim"]
