"""A rank holds only its share of a saved pipeline, from loading to teardown, on the paths users load it.

``PipelineSampler(path=...)`` (what ``ldp-predict model=pipeline`` builds) and a module whose ``configure_model``
calls ``WanPipeline.from_pretrained(path)`` load lean: the components are built on the meta device, each rank reads
from the safetensors files only what it keeps after parallelizing, and teardown puts the deferred weights back on
the meta device instead of gathering them. Every layout equals one process of plain diffusers (float32, relative
1e-5), twice in a row in the same process. Two guards catch a rank that makes the whole model: the parameter bytes
resident on each rank, watched at every block of every step, and the peak resident set size of each rank over a
whole predict of a pipeline whose transformer weighs 0.9 GB.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline

from lightning_dit_parallel import FSDPInferenceStrategy, PipelineStrategy, TensorParallelStrategy
from lightning_dit_parallel.app.prompts import prompt_loader
from lightning_dit_parallel.app.sampling import PipelineSampler
from lightning_dit_parallel.loading import deferred_roots, lean_from_pretrained
from lightning_dit_parallel.utils.memory import peak_rss, reset_peak_rss, resident_bytes
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.pipelines import WAN_CALL, wan_pipeline

PROMPTS = ["a red cat", "a blue dog on the grass"]
CALL = {k: v for k, v in WAN_CALL.items() if k != "output_type"}

#: 2-rank layouts; FSDP alone takes dp = 2 (each rank its own prompt, one sharded copy of the weights).
LAYOUTS = {
    "fsdp": lambda: FSDPInferenceStrategy(),
    "fsdp_ulysses2": lambda: FSDPInferenceStrategy(ulysses_degree=2, dp_degree=1),
    "fsdp_layers_ulysses2": lambda: FSDPInferenceStrategy(ulysses_degree=2, dp_degree=1, fsdp_units="layers"),
    "pipeline2": lambda: PipelineStrategy(pp_degree=2),
    "tp2": lambda: TensorParallelStrategy(tp_degree=2),
}


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan")
    wan_pipeline().save_pretrained(folder)
    return folder


class FromPretrainedInConfigureModel(L.LightningModule):
    """The pattern for a model larger than one device: the pipeline is loaded in ``configure_model``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.pipe = None

    def configure_model(self) -> None:
        if self.pipe is None:
            self.pipe = WanPipeline.from_pretrained(self.folder)
            self.pipe.set_progress_bar_config(disable=True)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, output_type="pt", **CALL).frames


def plain_diffusers(folder: Path) -> torch.Tensor:
    """The reference: plain diffusers in one process, sample i seeded with i."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return torch.cat(
        [
            pipe(prompt=[p], generator=torch.Generator("cpu").manual_seed(i), output_type="pt", **CALL).frames
            for i, p in enumerate(PROMPTS)
        ]
    )


class WatchHeldBytes(L.Callback):
    """The most parameter bytes of the transformer resident on this rank at any block of any step (local shards,
    released blocks excluded; a block FSDP gathers for its forward counts whole)."""

    def __init__(self) -> None:
        self.most = 0
        self.handles = []

    def on_predict_start(self, trainer, pl_module) -> None:
        transformer = pl_module.pipe.transformer
        self.most = max(self.most, resident_bytes(transformer, buffers=False))

        def watch(module, args, *rest):
            self.most = max(self.most, resident_bytes(transformer, buffers=False))

        for block in transformer.blocks.children():
            self.handles += [block.register_forward_pre_hook(watch), block.register_forward_hook(watch)]

    def on_predict_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def _every_layout_twice(rank: int, world: int, folder: Path, reference: torch.Tensor, ports) -> list[str]:
    failures = []
    plain = WanPipeline.from_pretrained(folder).transformer
    whole = _bytes(plain.parameters())
    block = max(_bytes(b.parameters()) for b in plain.blocks)
    root = whole - _bytes(plain.blocks.parameters())
    # a rank's share: half of every tensor, plus the other half of one block and of the root's own parameters while
    # FSDP gathers them; pipeline stages and tensor-parallel shards hold less. The whole model is `block/2` more.
    share = (whole + block + root) / 2 * 1.02  # FSDP pads a shard of an odd number of rows by one row
    with external_launch(rank, world, *ports):
        modules = {
            "sampler": PipelineSampler(path=folder, call=CALL),
            "configure_model": FromPretrainedInConfigureModel(folder),
        }
        for how, module in modules.items():
            for name, make in LAYOUTS.items():
                for attempt in ("first", "second"):
                    what = f"{how} {name} ({attempt}), rank {rank}"
                    strategy = make()
                    watch = WatchHeldBytes()
                    trainer = L.Trainer(
                        accelerator="cpu",
                        devices=world,
                        strategy=strategy,
                        logger=False,
                        enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[watch],
                    )
                    batch = 1 if name == "fsdp" else 2
                    out = torch.cat(trainer.predict(module, prompt_loader(PROMPTS, batch_size=batch)))
                    expected = reference[rank::world] if name == "fsdp" else reference
                    error = ((out - expected).abs().max() / expected.abs().max()).item()
                    if out.shape != expected.shape or not error <= 1e-5:
                        failures.append(f"{what}: output {tuple(out.shape)}, relative error {error:.2e}")
                    if watch.most > share:
                        failures.append(
                            f"{what}: held {watch.most} transformer bytes at once; share {share}, whole {whole}"
                        )
                    # the text encoder too: UMT5 ties its embeddings (one parameter under two names)
                    for part in ("transformer", "text_encoder"):
                        component = getattr(module.pipe, part)
                        if not all(p.is_meta for p in component.parameters()):
                            failures.append(f"{what}: the {part}'s weights were not released at teardown")
                        if not [m for _, m, _ in deferred_roots(component)]:
                            failures.append(f"{what}: the {part} was not loaded lean")
    return failures


def test_every_layout_loads_lean_and_equals_plain_diffusers(wan_folder: Path):
    reference = plain_diffusers(wan_folder)
    results = run_on_ranks(2, _every_layout_twice, wan_folder, reference, (free_port(), free_port()), timeout_s=600)
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures)


def test_lean_pipeline_outside_a_parallel_strategy_reads_everything_once(wan_folder: Path):
    """One process, no parallel strategy: the sampler reads the deferred weights whole before its first call."""
    reference = plain_diffusers(wan_folder)
    module = PipelineSampler(path=wan_folder, call=CALL)
    assert all(p.is_meta for p in module.pipe.transformer.parameters())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    out = torch.cat(trainer.predict(module, prompt_loader(PROMPTS, batch_size=2)))
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= 1e-5


def test_lean_from_pretrained_falls_back_for_what_it_cannot_serve(wan_folder: Path, tmp_path: Path):
    """A config override is loaded by the library itself (whole); a folder without safetensors too."""
    from diffusers import WanTransformer3DModel

    with lean_from_pretrained():
        lean = WanTransformer3DModel.from_pretrained(wan_folder, subfolder="transformer")
        overridden = WanTransformer3DModel.from_pretrained(wan_folder, subfolder="transformer", num_layers=1)
    assert all(p.is_meta for p in lean.parameters())
    assert not any(p.is_meta for p in overridden.parameters()) and len(overridden.blocks) == 1
    assert WanTransformer3DModel.from_pretrained.__func__.__name__ == "from_pretrained"


# -- peak resident memory per rank over a whole predict --------------------------------------------------------------


@pytest.fixture(scope="module")
def large_wan_folder(tmp_path_factory) -> tuple[Path, int]:
    """A Wan pipeline whose transformer holds 0.9 GB of float32 weights (8 blocks of 1024 wide), with the tiny text
    encoder and VAE: weights dominate the process."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from lightning_dit_parallel.loading import build_on_meta
    from tests.pipelines import tiny_wan_vae, umt5_encoder, word_tokenizer

    folder = tmp_path_factory.mktemp("large_wan")
    transformer = build_on_meta(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=8,
            attention_head_dim=128,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=8192,
            num_layers=8,
            rope_max_seq_len=32,
        )
    )
    transformer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02, generator=generator)
    pipe = WanPipeline(
        tokenizer=word_tokenizer(),
        text_encoder=umt5_encoder(),
        vae=tiny_wan_vae(),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(folder)
    whole = sum(p.numel() * p.element_size() for p in transformer.parameters())
    return folder, whole


def _peak_over_predicts(rank: int, world: int, folder: Path, ports) -> dict[str, int]:
    grown = {}
    with external_launch(rank, world, *ports):
        for name in ("pipeline2", "tp2"):
            reset_peak_rss()
            before = peak_rss()
            module = PipelineSampler(path=folder, call={**CALL, "num_inference_steps": 1})
            predict_here(module, prompt_loader(PROMPTS[:1], batch_size=1), LAYOUTS[name](), world)
            del module
            grown[name] = peak_rss() - before
    return grown


def test_no_rank_holds_the_whole_model_at_any_moment(large_wan_folder):
    """Peak RSS of each rank over loading, setup, the steps and teardown, less what it held before loading: well
    under the transformer's size with 2 pipeline stages or 2 tensor-parallel shards (a rank that loaded, moved or
    gathered the whole transformer at any moment would exceed it)."""
    folder, whole = large_wan_folder
    for rank, grown in enumerate(
        run_on_ranks(2, _peak_over_predicts, folder, (free_port(), free_port()), timeout_s=600)
    ):
        for name, bytes_grown in grown.items():
            assert bytes_grown < 0.8 * whole, (
                f"rank {rank} {name}: peak grew by {bytes_grown / 1e9:.2f} GB, whole {whole / 1e9:.2f} GB"
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_peak_per_rank_is_its_share(large_wan_folder):
    """On a GPU: the device's peak over a whole predict with 2 pipeline stages on one device per rank stays under
    the transformer's size (the whole model never lands on the device)."""
    folder, whole = large_wan_folder
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.cuda.reset_peak_memory_stats()
    module = PipelineSampler(path=folder, call={**CALL, "num_inference_steps": 1})
    trainer = L.Trainer(
        accelerator="gpu",
        devices=2,
        strategy=PipelineStrategy(pp_degree=2, start_method="fork"),
        logger=False,
        enable_progress_bar=False,
    )
    trainer.predict(module, prompt_loader(PROMPTS[:1], batch_size=1))
    assert torch.cuda.max_memory_allocated() < 0.8 * whole


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_lean_loading_keeps_the_dtypes_diffusers_and_transformers_give(tmp_path: Path, dtype):
    """Saved in bfloat16, loaded with and without ``torch_dtype``: every parameter and buffer has the dtype plain
    ``from_pretrained`` gives it (Wan keeps its norms, time embedder and rotary tables in float32; transformers models
    load as saved), and the video is the same."""
    from lightning_dit_parallel.loading import materialize

    wan_pipeline().to(torch.bfloat16).save_pretrained(tmp_path)
    plain = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=dtype)
    with lean_from_pretrained():
        lean = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=dtype)
    for name, component in lean.components.items():
        if isinstance(component, torch.nn.Module):
            reference = getattr(plain, name)
            expected = {n: t.dtype for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
            assert {n: t.dtype for n, t in [*component.named_parameters(), *component.named_buffers()]} == expected, (
                name
            )
            materialize(component)
    call = {**CALL, "output_type": "pt"}
    for pipe in (plain, lean):
        pipe.set_progress_bar_config(disable=True)
    assert torch.equal(
        plain(prompt=["a cat"], generator=torch.Generator().manual_seed(0), **call).frames,
        lean(prompt=["a cat"], generator=torch.Generator().manual_seed(0), **call).frames,
    )


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_lean_loading_keeps_tied_weights_tied(tmp_path: Path, dtype):
    """UMT5 stores its tied embedding once (``shared.weight`` for ``encoder.embed_tokens.weight`` too): loaded lean,
    with or without a dtype cast, the two names stay one parameter, so the checkpoint covers the model and it loads
    lean (on the meta device, read later) instead of whole."""
    from transformers import UMT5EncoderModel

    from tests.pipelines import umt5_encoder

    umt5_encoder().save_pretrained(tmp_path)
    with lean_from_pretrained():
        lean = UMT5EncoderModel.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.is_meta for p in lean.parameters())
    assert lean.shared.weight is lean.encoder.embed_tokens.weight
    assert [m for _, m, _ in deferred_roots(lean)] == [lean]
