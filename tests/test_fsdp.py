"""FSDP inference: exact against one process, 1/N of each block held between uses, a clean undo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy, ParallelLayout, parallelize
from lightning_dit_parallel.parallel.fsdp import is_sharded, module_units
from lightning_dit_parallel.utils.memory import resident_bytes
from tests.distributed import run_on_ranks
from tests.models import FAMILIES, build_dit, dit_sampler, requests
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_alone_is_data_parallel_over_one_sharded_copy(family, tmp_path):
    """dp = world: each rank generates its own samples, all from one copy of the weights sharded over 2 ranks."""
    build, sampler = FAMILIES[family]
    reference = predict_single(sampler(build()), requests(4, batch_size=2))
    strategy = FSDPInferenceStrategy(start_method="fork")
    outputs = predict_on_ranks(sampler(build()), requests(4, batch_size=2), strategy, 2, tmp_path)
    # the predict sampler deals samples round-robin over the dp ranks
    assert_exact([outputs[0]], reference[0::2])
    assert_exact([outputs[1]], reference[1::2])


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_with_ulysses_on_two_ranks(family, tmp_path):
    build, sampler = FAMILIES[family]
    reference = predict_single(sampler(build()), requests())
    strategy = FSDPInferenceStrategy(ulysses_degree=2, start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), requests(), strategy, 2, tmp_path), reference)


def test_uneven_batches_over_data_parallel_groups_are_a_clear_error(tmp_path):
    """3 samples in batches of 1 over dp=2 give the groups 2 and 1 batches: the FSDP all-gathers could not pair up."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        strategy=FSDPInferenceStrategy(start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match=r"gives the 2 data-parallel ranks \[2, 1\] batches"):
        trainer.predict(dit_sampler(build_dit()), requests(3, batch_size=1), return_predictions=False)


def _shard_forward_remove(rank: int, world: int) -> dict:
    """Shard a DiT, measure what each rank holds, run it, undo it; returns measurements for the parent."""
    layout = ParallelLayout(ulysses=world, fsdp=True).resolve(world)
    sampler = dit_sampler(build_dit())
    dit = sampler.transformer
    batch = next(iter(requests()))
    plain = sampler.sample(batch)
    full_blocks = [resident_bytes(b) for b in dit.transformer_blocks]
    full_root = resident_bytes(dit)

    def hook_counts() -> dict:
        return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in dit.named_modules()}

    hooks_before = hook_counts()
    state_keys = list(dit.state_dict())
    cls = type(dit)

    handle = parallelize(sampler, layout, layout.build_mesh("cpu"))
    before_use = [resident_bytes(b) for b in dit.transformer_blocks]
    root_before_use = resident_bytes(dit)
    parallel = sampler.sample(batch)
    between_uses = [resident_bytes(b) for b in dit.transformer_blocks]
    root_between_uses = resident_bytes(dit)
    all_sharded = all(is_sharded(p) for p in dit.parameters())
    handle.remove()

    after = sampler.sample(batch)  # plain again: no process group needed, same numbers as before
    return {
        "full_blocks": full_blocks,
        "full_root": full_root,
        "before_use": before_use,
        "between_uses": between_uses,
        "root_before_use": root_before_use,
        "root_between_uses": root_between_uses,
        "all_sharded": all_sharded,
        "error": ((parallel - plain).abs().max() / plain.abs().max()).item(),
        "restored_equal": bool(after.equal(plain)),
        "class_restored": type(dit) is cls,
        "plain_params": not any(is_sharded(p) for p in dit.parameters()),
        "hooks_restored": hook_counts() == hooks_before,
        "state_keys_restored": list(dit.state_dict()) == state_keys,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_holds_one_nth_of_each_block_between_uses_and_remove_restores(world):
    for rank, r in enumerate(run_on_ranks(world, _shard_forward_remove)):
        assert r["all_sharded"], f"rank {rank}: some parameter is not sharded"
        assert r["error"] <= 1e-5, f"rank {rank}: relative error {r['error']:.2e}"
        for i, (full, before, between) in enumerate(zip(r["full_blocks"], r["before_use"], r["between_uses"])):
            # dim-0 shards of every parameter: at most ceil(rows/N) rows each; a few rows of slack per tensor
            assert before <= full / world * 1.1, f"rank {rank} block {i}: holds {before} of {full} bytes before use"
            assert between <= full / world * 1.1, f"rank {rank} block {i}: holds {between} of {full} bytes between uses"
        root, full_root = r["root_between_uses"], r["full_root"]
        assert root <= full_root / world * 1.1, f"rank {rank}: root holds {root} of {full_root}"
        for key in ("restored_equal", "class_restored", "plain_params", "hooks_restored", "state_keys_restored"):
            assert r[key], f"rank {rank}: after remove(), {key} is False"


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class _WithEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_encoder = _Encoder()
        self.transformer = build_dit()


def _shard_text_encoder(rank: int, world: int) -> dict:
    layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
    module = _WithEncoder()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(7))
    plain = module.text_encoder(x)
    full = resident_bytes(module.text_encoder)
    handle = parallelize(module, layout, layout.build_mesh("cpu"), shard_modules=("text_encoder",))
    held = resident_bytes(module.text_encoder)
    sharded = all(is_sharded(p) for p in module.text_encoder.parameters())
    out = module.text_encoder(x)
    handle.remove()
    return {
        "full": full,
        "held": held,
        "sharded": sharded,
        "equal": bool(torch.allclose(out, plain, rtol=1e-5, atol=1e-6)),
        "after": bool(module.text_encoder(x).equal(plain)),
    }


def test_shard_modules_shards_a_text_encoder():
    for rank, r in enumerate(run_on_ranks(2, _shard_text_encoder)):
        assert r["sharded"] and r["equal"] and r["after"], f"rank {rank}: {r}"
        assert r["held"] <= r["full"] / 2 * 1.1, f"rank {rank}: holds {r['held']} of {r['full']} bytes"


def test_module_units_are_the_layers_then_the_module():
    encoder = _Encoder()
    assert module_units(encoder) == [*encoder.layers, encoder]


def _unknown_shard_module(rank: int, world: int) -> str:
    layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
    try:
        parallelize(_WithEncoder(), layout, layout.build_mesh("cpu"), shard_modules=("encoder",))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_bad_shard_modules_are_clear_errors():
    for message in run_on_ranks(2, _unknown_shard_module):
        assert "'encoder', which is not a submodule" in message and "text_encoder" in message
    with pytest.raises(ValueError, match="needs fsdp=True"):
        DiTParallelStrategy(dp_degree=2, shard_modules=["text_encoder"])
    with pytest.raises(TypeError, match="always shards"):
        FSDPInferenceStrategy(fsdp=False)


def test_registered_name_builds_the_fsdp_preset():
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="dit_fsdp", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, FSDPInferenceStrategy)
    assert trainer.strategy._requested_layout.fsdp


def _undeclared_outside_call(rank: int, world: int) -> float:
    """The DiT calls ``transformer_blocks[0].norm1.emb`` after its block loop; with a plan that does not declare
    it in ``shared_modules`` the whole block 0 is gathered around that call instead."""
    import dataclasses

    from diffusers import DiTTransformer2DModel

    from lightning_dit_parallel import plan_for, register_plan, unregister_plan

    class UndeclaredDiT(DiTTransformer2DModel):
        pass

    register_plan(UndeclaredDiT, dataclasses.replace(plan_for(DiTTransformer2DModel), shared_modules=()))
    try:
        layout = ParallelLayout(dp=world, fsdp=True).resolve(world)
        sampler = dit_sampler(build_dit())
        batch = next(iter(requests()))
        plain = sampler.sample(batch)
        sampler.transformer.__class__ = UndeclaredDiT
        handle = parallelize(sampler, layout, layout.build_mesh("cpu"))
        out = sampler.sample(batch)
        handle.remove()
        return ((out - plain).abs().max() / plain.abs().max()).item()
    finally:
        unregister_plan(UndeclaredDiT)


def test_block_submodule_called_outside_its_block_without_a_declaration():
    for rank, error in enumerate(run_on_ranks(2, _undeclared_outside_call)):
        assert error <= 1e-5, f"rank {rank}: relative error {error:.2e}"
