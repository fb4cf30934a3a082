"""Tensor parallelism (``tp`` axis, torch DTensor column-/row-wise styles) through ``Trainer.predict``.

One LightningModule holds a sampler of every family (DiT, PixArt, PixArt with fused q/k/v projections, SD3, Flux,
Wan), so one launch checks all of them under one layout: every rank's output must equal the one-process output
(float32, relative 1e-5, sharpened attention). Token counts (25 image tokens, 15 + 7 for Flux, 27 video tokens) do
not divide the sequence-parallel degrees of the compositions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_dit_parallel import (
    DiTParallelStrategy,
    DiTPlan,
    Packed,
    ParallelLayout,
    TensorParallelStrategy,
    parallelize,
    plan_for,
)
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.parallel.tensor import check_layout, resolve_layout
from lightning_dit_parallel.parallel.tensor.styles import unpack
from tests.distributed import run_on_ranks
from tests.models import (
    POOLED_DIM,
    TEXT_DIM,
    build_dit,
    build_flux,
    build_pixart,
    build_sd3,
    build_wan,
    dit_sampler,
    flux_sampler,
    pixart_sampler,
    sd3_sampler,
    tiny_wan,
    wan_sampler,
)
from tests.rank_outputs import assert_exact
from tests.zoo_module import SaveRankDicts


def build_pixart_fused() -> nn.Module:
    """PixArt with fused projections (``to_qkv`` in self-attention, ``to_kv`` in cross-attention): packed styles."""
    model = build_pixart(10)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
            module.set_processor(FusedAttnProcessor2_0())
    return model


#: family -> sampler factory. Image tokens: 25 (DiT, PixArt, SD3), 15 (Flux, 3 x 5), 27 video tokens (Wan).
FAMILIES: dict[str, Callable[[], DiffusionSampler]] = {
    "dit": lambda: dit_sampler(build_dit(10), steps=2),
    "pixart": lambda: pixart_sampler(build_pixart(10), steps=2),
    "pixart_fused": lambda: pixart_sampler(build_pixart_fused(), steps=2),
    "sd3": lambda: sd3_sampler(build_sd3(), size=10, steps=2),
    "flux": lambda: flux_sampler(build_flux(), 3, 5, steps=2),
    "wan": lambda: wan_sampler(build_wan(), frames=3, size=6, steps=2),
}


class Requests(Dataset):
    """What every family's conditioning reads: index, class label, text embedding (7, 16), pooled embedding (8,)."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(99)  # request i is the same whatever n
        self.embeds = torch.randn(8, 7, TEXT_DIM, generator=generator)[:n]
        self.pooled = torch.randn(8, POOLED_DIM, generator=generator)[:n]

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, i: int) -> dict:
        return {
            "index": torch.tensor(i),
            "class_label": torch.tensor(i % 10),
            "prompt_embeds": self.embeds[i],
            "pooled_embeds": self.pooled[i],
        }


def loader(n: int = 2) -> DataLoader:
    return DataLoader(Requests(n), batch_size=2)


class Families(L.LightningModule):
    """``predict_step`` samples the batch with every family's sampler: ``{family: samples}``."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.samplers = nn.ModuleDict({name: FAMILIES[name]() for name in names})

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return {name: sampler.sample(batch) for name, sampler in self.samplers.items()}


def predict(names: list[str], strategy, devices: int, dirpath: Path, n: int = 2) -> list[dict[str, Tensor]]:
    """Every rank's ``{family: samples}`` (batches concatenated) from one ``Trainer.predict`` launch."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveRankDicts(dirpath)],
    )
    trainer.predict(Families(names), loader(n), return_predictions=False)
    return [torch.load(Path(dirpath) / f"rank{r}.pt") for r in range(devices)]


@pytest.fixture(scope="module")
def references() -> dict[str, Tensor]:
    """One-process samples of 4 requests (2 batches) for every family."""
    module = Families(list(FAMILIES))
    return {
        name: torch.cat([module.predict_step(batch, i)[name] for i, batch in enumerate(loader(4))]) for name in FAMILIES
    }


#: name -> (devices, strategy arguments, families): every family with tp on 2 and 4 ranks; the compositions on 4 ranks
#: with four families each (the default layout, packed styles, diffusers' ``_tp_plan``, joint attention, sharded norms).
LAYOUTS = {
    "tp2": (2, dict(tp_degree=2), list(FAMILIES)),
    "tp4": (4, dict(tp_degree=4), list(FAMILIES)),
    "tp2_ulysses2_fsdp": (4, dict(tp_degree=2, ulysses_degree=2, fsdp=True), ["dit", "sd3", "flux", "wan"]),
    "tp2_ring2": (4, dict(tp_degree=2, ring_degree=2), ["pixart", "sd3", "flux", "wan"]),
    "tp2_cfg2": (4, dict(tp_degree=2, cfg_degree=2), ["dit", "pixart_fused", "flux", "wan"]),
    "tp2_pp2": (4, dict(tp_degree=2, pp_degree=2), ["dit", "flux", "wan"]),  # micro-batch pipeline of 2 stages
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_parallel_equals_one_process(layout, references, tmp_path, record_property):
    devices, degrees, names = LAYOUTS[layout]
    outputs = predict(names, TensorParallelStrategy(**degrees, start_method="fork"), devices, tmp_path)
    for name in names:
        error = assert_exact([out[name] for out in outputs], references[name][:2], f"{name} {layout}")
        record_property(f"max_relative_error_{name}", error)


def test_tensor_parallel_with_data_parallel_and_fsdp(references, tmp_path):
    """dp 2 x tp 2 with FSDP2 over the dp axis of the tensor-parallel shards (2-D): each dp group samples its own
    requests (4 requests in batches of 2: batch i goes to group i)."""
    names = ["dit", "flux", "wan"]
    strategy = DiTParallelStrategy(dp_degree=2, tp_degree=2, fsdp=True, start_method="fork")
    outputs = predict(names, strategy, 4, tmp_path, n=4)
    for name in names:
        # Lightning's predict sampler deals samples round-robin over the dp groups
        assert_exact([out[name] for out in outputs[:2]], references[name][0::2], f"{name} dp group 0")
        assert_exact([out[name] for out in outputs[2:]], references[name][1::2], f"{name} dp group 1")


# -- layouts, resolved without any process group ---------------------------------------------------------------------


def test_default_layout_of_a_dit_block():
    """Attention projections column-wise, output row-wise, MLP up/down; per-sample modules (adaLN modulation, the
    block's timestep and label embedders) split with their small outputs gathered or all-reduced."""
    model = build_dit()
    layout = resolve_layout(model, plan_for(model))
    block = {
        p.removeprefix("transformer_blocks.0."): s
        for p, s in layout.styles.items()
        if p.startswith("transformer_blocks.0.")
    }
    assert block == {
        "attn1.to_q": "colwise",
        "attn1.to_k": "colwise",
        "attn1.to_v": "colwise",
        "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise",
        "ff.net.2": "rowwise",
        "norm1.linear": "colwise_gather",
        "norm1.emb.timestep_embedder.linear_1": "colwise",
        "norm1.emb.timestep_embedder.linear_2": "rowwise",
        "norm1.emb.class_embedder.embedding_table": "colwise_gather",
    }
    assert layout.attention == ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    assert "default" in layout.source


def test_layout_sources_and_automatic_norms():
    flux = build_flux()
    layout = resolve_layout(flux, plan_for(flux))
    assert "_tp_plan" in layout.source  # diffusers' own plan, with the modulation it leaves whole
    assert layout.styles["single_transformer_blocks.0.proj_out"] == Packed("rowwise", None)
    assert layout.styles["transformer_blocks.0.norm1_context.linear"] == "colwise_gather"
    assert "single_transformer_blocks.0.attn" in layout.attention  # heads split, no output projection needed
    wan = build_wan()
    styles = resolve_layout(wan, plan_for(wan)).styles
    assert styles["blocks.0.attn1.norm_q"] == styles["blocks.0.attn2.norm_k"] == "sharded_norm"  # over all heads
    sd3 = build_sd3()
    assert not any(p.endswith(("norm_q", "norm_k")) for p in resolve_layout(sd3, plan_for(sd3)).styles)  # per head
    fused = resolve_layout(build_pixart_fused(), plan_for(build_pixart_fused())).styles
    assert fused["transformer_blocks.0.attn1.to_qkv"] == Packed("colwise", (1, 1, 1))
    assert fused["transformer_blocks.0.attn2.to_kv"] == Packed("colwise", (1, 1))


def test_root_linears_are_split_unless_their_weights_are_read_by_name():
    """The root's Linears (embedders, output projection) get ``colwise_gather``; those whose weight an enclosing
    forward reads by name (``HunyuanDiTAttentionPool`` passes ``q_proj.weight`` to
    ``F.multi_head_attention_forward``) stay whole, as do the blocks' modules (styled per block)."""
    from tests.zoo import hunyuan_dit

    wan = build_wan()
    root = resolve_layout(wan, plan_for(wan)).root
    assert {"condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "proj_out"} <= set(root)
    assert set(root.values()) == {"colwise_gather"} and not any(p.startswith("blocks.") for p in root)
    model = hunyuan_dit.CASES[0].build()
    root = resolve_layout(model, plan_for(model)).root
    pooler = [p for p, m in model.named_modules() if type(m).__name__ == "HunyuanDiTAttentionPool"]
    assert pooler and not any(p.startswith(pooler[0] + ".") for p in root), sorted(root)
    assert any(p.startswith("time_extra_emb.") for p in root)


def test_plan_declares_the_layout():
    model = build_dit()
    base = plan_for(model)
    plan = DiTPlan(
        split_outputs=base.split_outputs,
        gather_outputs=base.gather_outputs,
        blocks=base.blocks,
        self_attention=base.self_attention,
        shared_modules=base.shared_modules,
        tensor_parallel={"transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise"},
    )
    layout = resolve_layout(model, plan)
    assert sorted(layout.styles) == [f"transformer_blocks.{i}.ff.net.{j}" for i in (0, 1) for j in ("0.proj", 2)]
    assert layout.attention == ()  # no attention projection split: heads stay whole
    with pytest.raises(ValueError, match="tensor_parallel styles must be one of"):
        DiTPlan(
            split_outputs=base.split_outputs,
            gather_outputs=base.gather_outputs,
            self_attention=base.self_attention,
            tensor_parallel={"x": "diagonal"},
        )
    for styles, match in [
        ({"proj_out_2": "rowwise"}, r"outside the plan's blocks \['transformer_blocks'\]"),
        ({"transformer_blocks.*.attn9.to_q": "colwise"}, "matches no module"),
        ({"transformer_blocks.*.norm1.emb": "colwise"}, "needs an nn.Linear"),
    ]:
        bad = DiTPlan(
            split_outputs=base.split_outputs,
            gather_outputs=base.gather_outputs,
            blocks=base.blocks,
            self_attention=base.self_attention,
            tensor_parallel=styles,
        )
        with pytest.raises(ValueError, match=match):
            resolve_layout(model, bad)


def test_features_that_do_not_split_are_an_error():
    model = build_wan()  # ffn_dim 32 splits over 2 and 4; 4 heads of 12
    layout = resolve_layout(model, plan_for(model))
    with pytest.raises(ValueError, match=r"4 attention heads cannot be split over tp_degree=8"):
        check_layout(model, plan_for(model), layout, ParallelLayout(tp=8).resolve(8))
    with pytest.raises(
        ValueError,
        match=r"tp_degree=2 x ulysses_degree=4 .* Use tp_degree=2, ulysses_degree=2,"
        r" ring_degree=2",
    ):
        check_layout(model, plan_for(model), layout, ParallelLayout(tp=2, ulysses=4).resolve(8))


def test_unpack_inverts_the_packed_shards():
    full = torch.arange(12.0).reshape(12, 1)  # parts of 6, 2, 4 rows
    sizes, n = (6, 2, 4), 2
    shards = []
    for rank in range(n):
        offsets = [0, 6, 8]
        shards.append(torch.cat([full[o + rank * s // n : o + (rank + 1) * s // n] for o, s in zip(offsets, sizes)]))
    assert torch.equal(unpack(torch.cat(shards), 0, sizes, n), full)


def test_registered_name_and_layout():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["dit_tp"]["init_params"] == {"tp_degree": "auto"}
    trainer = L.Trainer(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False, strategy="dit_tp")
    assert type(trainer.strategy) is TensorParallelStrategy
    assert TensorParallelStrategy(tp_degree=2)._requested_layout.describe() == (
        "dp=auto cfg=1 pp=1 ring=1 ulysses=1 tp=2 fsdp=False"
    )
    layout = ParallelLayout(dp=2, ulysses=2, tp=2).resolve(8)
    assert layout.coordinates(1) == dict(dp=0, cfg=0, pp=0, ring=0, ulysses=0, tp=1)  # tp innermost
    assert layout.coordinates(2) == dict(dp=0, cfg=0, pp=0, ring=0, ulysses=1, tp=0)
    assert layout.model_parallel_degree == 4
    with pytest.raises(ValueError, match=r"multiply to 4 but the world size is 2 \(.* tp=2 .*\).*ulysses\*tp"):
        ParallelLayout(ulysses=2, tp=2).resolve(2)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelLayout(tp=0)


# -- on ranks without Trainer: errors on every rank, removal ----------------------------------------------------------


def _small_wan() -> nn.Module:
    """``build_wan``'s configuration without the seeded re-initialisation (which cannot run on the meta device)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_wan()).eval()


def _on_ranks(rank: int, world: int, weights: str) -> dict:
    from lightning_dit_parallel.loading import build_on_meta, defer_weights, materialize

    results: dict = {}
    for name, build, degrees in [
        ("dit6_tp4", lambda: build_dit(heads=6), dict(tp=4)),
        ("sd3_6_tp2_ulysses2", lambda: build_sd3(heads=6), dict(tp=2, ulysses=2)),
    ]:
        layout = ParallelLayout(**degrees).resolve(world)
        try:
            parallelize(build(), layout, layout.build_mesh("cpu"))
            results[name] = "no error"
        except ValueError as err:
            results[name] = str(err)
    # tp 2 x dp 2: apply, compare, remove; the plain module comes back (parameters, head counts, hooks) and can be
    # parallelized again
    layout = ParallelLayout(dp=2, tp=2).resolve(world)
    mesh = layout.build_mesh("cpu")
    sampler = wan_sampler(build_wan(), steps=1)
    batch = next(iter(loader()))
    before = {k: v.clone() for k, v in sampler.state_dict().items()}
    reference = sampler.sample(batch)
    for _ in range(2):
        handle = parallelize(sampler, layout, mesh)
        local = sampler.transformer.blocks[0].attn1
        local_weights = (tuple(local.to_q.weight.to_local().shape), local.norm_q.weight.to_local().numel())
        results["local"] = (local.heads, *local_weights)
        results["error"] = ((sampler.sample(batch) - reference).abs().max() / reference.abs().max()).item()
        handle.remove()
    after = sampler.state_dict()
    results["restored"] = all(type(v) is torch.Tensor and torch.equal(v, before[k]) for k, v in after.items())
    results["heads"] = sampler.transformer.blocks[0].attn1.heads
    results["hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in sampler.modules())
    added = {"forward", "_distribute_module_applied"}
    results["attributes"] = [n for n, m in sampler.named_modules() if added & set(vars(m))]
    # deferred loading reads only each rank's shards: tp 2 with FSDP over dp 2 on top
    reference = wan_sampler(_small_wan(), steps=1).sample(batch)
    lazy = defer_weights(build_on_meta(_small_wan), weights)
    layout = ParallelLayout(dp=2, tp=2, fsdp=True).resolve(world)
    parallelize(lazy, layout, layout.build_mesh("cpu"))
    materialize(lazy)
    loaded = wan_sampler(lazy, steps=1).sample(batch)
    results["loaded"] = ((loaded - reference).abs().max() / reference.abs().max()).item()
    try:  # Flux's packed single-stream proj_out cannot be read as one region per rank
        parallelize(defer_weights(build_on_meta(build_flux_meta), weights), layout, layout.build_mesh("cpu"))
        results["packed"] = "no error"
    except ValueError as err:
        results["packed"] = str(err)
    return results


def build_flux_meta() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        axes_dims_rope=(4, 6, 6),
    )


def test_errors_on_every_rank_removal_and_deferred_loading(tmp_path):
    from lightning_dit_parallel.loading import save_weights

    weights = str(tmp_path / "wan.safetensors")
    save_weights(_small_wan(), weights)
    for result in run_on_ranks(4, _on_ranks, weights):
        assert "6 attention heads cannot be split over tp_degree=4" in result["dit6_tp4"]
        assert "Use tp_degree=2, ring_degree=2" in result["dit6_tp4"]
        assert "6 attention heads cannot be split over tp_degree=2 x ulysses_degree=2" in result["sd3_6_tp2_ulysses2"]
        assert "ulysses_degree=1, ring_degree=2" in result["sd3_6_tp2_ulysses2"]
        assert result["local"] == (2, (24, 48), 24)  # 4 heads of 12: 2 per rank, norm over the rank's 24 features
        assert result["error"] <= 1e-5
        assert result["restored"] and result["heads"] == 4
        assert result["hooks"] == 0 and result["attributes"] == []
        assert result["loaded"] <= 1e-5
        assert "packed tensor-parallel styles on deferred weights" in result["packed"]


# -- CUDA / NCCL ------------------------------------------------------------------------------------------------


def _device_errors(rank: int, world: int, names: list[str], device: str = "cuda") -> dict[str, float]:
    """Each family's sampler on this rank's device, tensor-parallel over ``world`` ranks, against the plain model on
    the same device. With one rank, parallelize() leaves tp=1 alone, so the styles are applied directly: the DTensor
    linears, packed shards and sharded norms run their collectives over a one-rank group."""
    from lightning_dit_parallel.parallel.tensor import apply_tensor_parallel

    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
    layout = ParallelLayout(tp=world).resolve(world)
    mesh = layout.build_mesh(device)
    batch = {k: v.to(device) for k, v in next(iter(loader())).items()}
    errors = {}
    for name in names:
        sampler = FAMILIES[name]().to(device)
        reference = sampler.sample(batch)
        if world > 1:
            handle = parallelize(sampler, layout, mesh)
        else:
            transformer = sampler.transformer
            handle = apply_tensor_parallel(transformer, resolve_layout(transformer, plan_for(transformer)), mesh["tp"])
            assert any(hasattr(p, "to_local") for p in transformer.parameters())  # DTensors on the CUDA mesh
        errors[name] = ((sampler.sample(batch) - reference).abs().max() / reference.abs().max()).item()
        handle.remove()
    return errors


def _nccl_worker(rank: int, world: int, port: int, names: list[str], queue) -> None:
    import traceback

    import torch.distributed as dist

    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            queue.put((rank, _device_errors(rank, world, names)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- reported to the parent, which fails the test
        queue.put((rank, traceback.format_exc()))


def test_styles_on_a_one_rank_mesh_change_nothing():
    """The path the one-GPU case of the NCCL test takes, here on CPU with gloo."""
    (errors,) = run_on_ranks(1, _device_errors, ["dit", "pixart_fused", "flux", "wan"], "cpu")
    assert max(errors.values()) <= 1e-6, errors


@pytest.mark.gpu
def test_tensor_parallel_on_cuda_with_nccl():
    """The NCCL path: tp over the visible GPUs (2 or 4; one GPU: a one-rank tp mesh) against the same model on one
    GPU, in spawned processes (CUDA in this process would keep later tests from forking)."""
    import torch.multiprocessing as mp

    from lightning_dit_parallel.utils.multiprocess import free_port

    count = torch.cuda.device_count()
    world = 4 if count >= 4 else 2 if count >= 2 else 1
    names = ["dit", "pixart_fused", "flux", "wan"]
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_nccl_worker, args=(r, world, port, names, queue)) for r in range(world)]
    for p in processes:
        p.start()
    try:
        results = dict(queue.get(timeout=600) for _ in range(world))
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    failed = {r: v for r, v in results.items() if isinstance(v, str)}
    assert not failed, "\n".join(failed.values())
    for rank, errors in results.items():
        assert max(errors.values()) <= 1e-5, (rank, errors)
