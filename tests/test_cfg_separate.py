"""CFG parallel for pipelines that make the conditional and unconditional DiT calls separately (diffusers WanPipeline,
Wan 2.2 with two experts, WanImageToVideoPipeline, FluxPipeline with true CFG, QwenImagePipeline): each cfg rank
computes one call of every pair after the first step, and the outputs equal one process (float32, relative 1e-5),
with 1 and 2 prompts per batch, on 2 ranks (cfg=2) and 4 ranks (cfg=2 x ulysses=2, token counts that do not divide
2). The transformer blocks' calls are recorded on every rank to prove that the calls, not the prompts, were split.
Patterns that cannot be served (guidance off, a pair cut short mid-loop or at the end, 3 calls per step, FSDP over
the cfg axis) raise one clear error on every rank.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy
from lightning_dit_parallel.app.prompts import prompt_loader
from lightning_dit_parallel.parallel.guidance.pattern import CallPattern, Decision, call_signature, step_key
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.pipelines import (
    FLUX_CALL,
    TEXT_TOKENS,
    WAN_CALL,
    WAN_I2V_CALL,
    flux_pipeline,
    wan_i2v_pipeline,
    wan_pipeline,
)
from tests.zoo import qwenimage, randn, wan22

PROMPTS = ["a red cat", "a blue dog on the grass"]
#: Wan: one frame of 48 x 48 (latents 6 x 6: 9 video tokens, odd), 3 steps.
WAN = {**WAN_CALL, "height": 48, "width": 48, "num_frames": 1, "num_inference_steps": 3}
#: Flux with true CFG (a second, unconditional call per step): 25 image tokens, 3 steps.
FLUX = {**FLUX_CALL, "num_inference_steps": 3, "true_cfg_scale": 2.0, "negative_prompt": "a green bird"}


def wan22_pipeline():
    """Wan 2.2 A14B-style: two experts (``transformer`` for high noise, ``transformer_2`` for low), boundary 0.7
    (with 4 steps: two steps each)."""
    from diffusers import WanPipeline

    base, other = wan_pipeline(0), wan_pipeline(1)
    pipe = WanPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=base.transformer,
        transformer_2=other.transformer,
        boundary_ratio=0.7,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class HoldsPipeline(L.LightningModule):
    """``self.pipe`` only; records the batch size of every call of each DiT's first block while ``predict_step``
    runs (what this rank really computed)."""

    def __init__(self, make, call: dict, output: str, blocks: str) -> None:
        super().__init__()
        self.pipe = make()
        self.call, self.output = call, output
        self.seen: dict[str, list[int]] = {}
        for name in ("transformer", "transformer_2"):
            dit = getattr(self.pipe, name, None)
            if dit is not None:
                self.seen[name] = []
                dit.get_submodule(blocks).register_forward_pre_hook(
                    lambda m, args, kwargs, name=name: self.seen[name].append(
                        (args[0] if args else kwargs["hidden_states"]).shape[0]
                    ),
                    with_kwargs=True,
                )

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return getattr(self.pipe(prompt=list(batch["prompt"]), generator=generators, **self.call), self.output)


class HoldsWanI2V(HoldsPipeline):
    """Wan 2.1 image-to-video from a fixed image; the text embeddings through Wan T2V's text path (the I2V module's
    own prompt cleaning needs ftfy), the empty negative prompt as the pipeline's default."""

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from diffusers import WanPipeline
        from PIL import Image

        pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(5)) * 255
        image = Image.fromarray(pixels.to(torch.uint8).numpy())
        embeds = [
            WanPipeline._get_t5_prompt_embeds(self.pipe, p, max_sequence_length=TEXT_TOKENS, device=torch.device("cpu"))
            for p in (list(batch["prompt"]), [""] * len(batch["prompt"]))
        ]
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(
            image=image, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], generator=generators, **self.call
        ).frames


def qwenimage_pipeline():
    """QwenImagePipeline around the tiny Qwen-Image transformer only: the module passes text embeddings, and the
    latents are the output (no text encoder, no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=qwenimage.build()(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class HoldsQwenImage(HoldsPipeline):
    """Qwen-Image with true CFG: seeded text embeddings per sample (7 tokens), a negative one of another length
    (5 tokens), so the two calls of a step differ in shape."""

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        index = [int(i) for i in batch["index"]]
        embeds = torch.cat([randn(1, 7, qwenimage.TEXT_DIM, seed=100 + i) for i in index])  # (B, 7, D)
        negative = randn(1, 5, qwenimage.TEXT_DIM, seed=7).repeat(len(index), 1, 1)  # (B, 5, D)
        generators = [torch.Generator("cpu").manual_seed(i) for i in index]
        return self.pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=torch.ones(len(index), 7, dtype=torch.long),
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=torch.ones(len(index), 5, dtype=torch.long),
            generator=generators,
            **self.call,
        ).images


#: Qwen-Image: 48 x 48 (latents 6 x 6, packed 3 x 3 = 9 image tokens), 3 steps, output the packed latents.
QWEN = dict(height=48, width=48, num_inference_steps=3, true_cfg_scale=4.0, output_type="latent")

PIPELINES = {
    "wan": lambda call=WAN: HoldsPipeline(wan_pipeline, call, "frames", "blocks.0"),
    "wan22": lambda call=None: HoldsPipeline(wan22_pipeline, {**WAN, "num_inference_steps": 4}, "frames", "blocks.0"),
    "wan_i2v": lambda call=None: HoldsWanI2V(
        wan_i2v_pipeline, {**WAN_I2V_CALL, "num_inference_steps": 3}, "frames", "blocks.0"
    ),
    "flux": lambda call=FLUX: HoldsPipeline(flux_pipeline, call, "images", "transformer_blocks.0"),
    "qwenimage": lambda call=None: HoldsQwenImage(qwenimage_pipeline, QWEN, "images", "transformer_blocks.0"),
}


class ManualLoop(L.LightningModule):
    """A denoising loop over a tiny Wan DiT making ``calls[i]`` calls (same timestep) in step ``i``."""

    def __init__(self, calls: list[int]) -> None:
        super().__init__()
        self.transformer, self.calls = wan22.build(), calls

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = wan22.randn(1, wan22.CHANNELS, 1, 6, 6, seed=1)
        text = wan22.randn(1, 5, wan22.TEXT_DIM, seed=2)
        for i, n in enumerate(self.calls):
            t = torch.tensor([900.0 - 200 * i])
            outs = [
                self.transformer(latents, timestep=t, encoder_hidden_states=text * (j + 1), return_dict=False)[0]
                for j in range(n)
            ]
            latents = latents - 0.1 * sum(outs)
        return latents


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _expected_calls(one_process: list[int], batch: int) -> list[int]:
    """Per cfg rank, from the one-process calls of one DiT (2 per step, each of the prompt batch): the first step's
    two calls computed on every rank (split over the prompts when they divide), then one call per later step."""
    if not one_process:
        return []
    first = [batch // 2] * 2 if batch % 2 == 0 else [batch] * 2
    return first + [batch] * (len(one_process) // 2 - 1)


def _cases(world: int) -> list[tuple[str, str, int, dict]]:
    """(name, pipeline, prompts per batch, further strategy arguments)."""
    if world == 2:
        # the replicated-input guard checking every call: it runs in the calls a rank skips too
        return [
            ("wan b1", "wan", 1, {}),
            ("wan b2", "wan", 2, {}),
            ("wan22 b1", "wan22", 1, {}),
            ("wan i2v b1", "wan_i2v", 1, {}),
            ("flux b1", "flux", 1, {}),
            ("flux b2", "flux", 2, {}),
            ("qwenimage b2", "qwenimage", 2, {}),
            ("wan b1 every_call", "wan", 1, {"check_inputs": "every_call"}),
        ]
    return [
        ("wan b1", "wan", 1, {}),
        ("wan b2", "wan", 2, {}),
        ("flux b1", "flux", 1, {}),
        ("qwenimage b1", "qwenimage", 1, {}),
    ]


def _references(world: int) -> dict:
    """One-process outputs and block calls of every (pipeline, batch) (computed once, before the ranks fork)."""
    refs = {}
    for _, family, batch, _ in _cases(world):
        if (family, batch) in refs:
            continue
        module = PIPELINES[family]()
        with torch.no_grad():
            out = module.predict_step(next(iter(prompt_loader(PROMPTS[:batch], batch_size=batch))), 0)
        refs[family, batch] = (out, {k: list(v) for k, v in module.seen.items()})
    return refs


def _run(rank: int, world: int, ports: tuple[int, int], refs: dict) -> list[str]:
    failures: list[str] = []

    def outcome(module, strategy, prompts: list[str], batch: int) -> str:
        try:
            predict_here(module, prompt_loader(prompts, batch_size=batch), strategy, world)
            return "ran"
        except ValueError as err:
            return str(err)

    with external_launch(rank, world, *ports):
        for name, family, batch, options in _cases(world):
            module = PIPELINES[family]()
            strategy = DiTParallelStrategy(cfg_degree=2, ulysses_degree=world // 2, **options)
            out = predict_here(module, prompt_loader(PROMPTS[:batch], batch_size=batch), strategy, world)
            ref, ref_seen = refs[family, batch]
            error = _relative_error(out, ref) if out.shape == ref.shape else float("inf")
            if not error <= 1e-5:
                failures.append(f"{name}, rank {rank}: output {tuple(out.shape)}, relative error {error:.2e}")
            expected = {k: _expected_calls(v, batch) for k, v in ref_seen.items()}
            if module.seen != expected:
                failures.append(
                    f"{name}, rank {rank}: block calls {module.seen}, expected {expected} (one process: {ref_seen})"
                )
            for key in module.seen:  # teardown restored the plain DiT: no instance forward, no hooks on the root
                dit = getattr(module.pipe, key)
                if "forward" in dit.__dict__ or dit._forward_hooks or dit._forward_pre_hooks:
                    failures.append(f"{name}, rank {rank}: {key} not restored after teardown")
        if world == 2:
            unguided = outcome(
                PIPELINES["wan"]({**WAN, "guidance_scale": 1.0}), DiTParallelStrategy(cfg_degree=2), PROMPTS[:1], 1
            )
            for part in (
                "WanTransformer3DModel.forward(hidden_states=...) has batch size 1",
                "called once per denoising step",
                "guidance_scale > 1",
            ):
                if part not in unguided:
                    failures.append(f"guidance off, rank {rank}: {part!r} not in {unguided!r}")
            fsdp = outcome(PIPELINES["wan"](), DiTParallelStrategy(cfg_degree=2, fsdp=True), PROMPTS[:1], 1)
            if "FSDP (fsdp=True) shards the weights over the cfg axis" not in fsdp:
                failures.append(f"fsdp, rank {rank}: {fsdp!r}")
            for calls, part in (
                (
                    [2, 1, 2],
                    "the step with t=700 made one call of WanTransformer3DModel.forward only, before a call with t=500",
                ),
                (
                    [2, 2, 1],
                    "the step with t=500 made one call of WanTransformer3DModel.forward only, at the end of the batch",
                ),
                ([3, 3], "was called 3 times with the same timestep (t=900)"),
            ):
                message = outcome(ManualLoop(calls), DiTParallelStrategy(cfg_degree=2), ["x"], 1)
                if part not in message:
                    failures.append(f"calls per step {calls}, rank {rank}: {part!r} not in {message!r}")
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_separate_calls_equal_one_process(world):
    refs = _references(world)
    results = run_on_ranks(world, _run, (free_port(), free_port()), refs, timeout_s=300)
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures)


# -- the call pattern alone (no process group) ------------------------------------------------------------------


def _decide(pattern: CallPattern, steps: list[int], batch: int = 1, shapes=None, start: int = 0) -> list[Decision]:
    decisions = []
    for i, n in enumerate(steps, start):
        for j in range(n):
            shape = shapes[j] if shapes else 4
            key = step_key(torch.tensor([900.0 - i])) if pattern.step_argument else None
            decisions.append(
                pattern.next_call(key, ("hidden_states", batch), call_signature({"x": torch.zeros(shape)}, None))
            )
    return decisions


def test_pattern_pairs_separate_calls_after_the_first_step():
    for rank in (0, 1):
        pattern = CallPattern(rank, 2, "DiT.forward", "timestep")
        kinds = [(d.kind, d.compute) for d in _decide(pattern, [2, 2, 2])]
        assert kinds == [("whole", True)] * 2 + [("first", rank == 0), ("second", rank == 1)] * 2
        pattern.end_batch()
        pattern.begin_batch()  # a new batch learns again, but knows the output shapes
        assert [d.kind for d in _decide(pattern, [2, 2], batch=2)] == ["split", "split", "first", "second"]


def test_pattern_keeps_the_doubled_batch_split():
    pattern = CallPattern(0, 2, "DiT.forward", "timestep")
    assert {d.kind for d in _decide(pattern, [1, 1, 1], batch=4)} == {"split"}
    pattern.end_batch()


def test_pattern_computes_a_pair_with_new_shapes_and_a_changed_second_call_on_both_ranks():
    pattern = CallPattern(0, 2, "DiT.forward", "timestep")
    _decide(pattern, [2], shapes=[4, 5])
    # the second call's shape was not learned: rank 0 computes it too
    first, second = _decide(pattern, [2], shapes=[4, 6], start=1)
    assert (first.compute, second.kind, second.compute, second.receive_second) == (True, "second", True, False)
    first, second = _decide(pattern, [2], shapes=[7, 7], start=2)  # a new first signature: the pair is learned again
    assert (first.kind, second.kind) == ("whole", "whole")


def test_pattern_refusals_name_the_cause():
    with pytest.raises(ValueError, match=r"batch size 3, which does not divide by 2, nor a second .* once per"):
        _decide(CallPattern(0, 2, "DiT.forward", "timestep"), [1, 1], batch=3)
    with pytest.raises(ValueError, match=r"batch size 3, .* has no timestep argument"):
        _decide(CallPattern(0, 2, "DiT.forward", None), [1], batch=3)
    pattern = CallPattern(1, 2, "DiT.forward", "timestep")
    _decide(pattern, [1], batch=3)
    with pytest.raises(ValueError, match="batch size 3"):
        pattern.end_batch()  # one step, one call: no guidance, found at the end of the batch
    with pytest.raises(ValueError, match="FSDP"):
        _decide(CallPattern(0, 2, "DiT.forward", "timestep", "FSDP shards ..."), [2, 2])


def test_step_key_and_signature():
    assert step_key(None) is None
    assert step_key(torch.tensor([3.0, 3.0])).tolist() == [3.0, 3.0]
    assert step_key(2.5).tolist() == [2.5]
    a = call_signature({"x": torch.zeros(2, 3), "t": torch.tensor([1.0]), "scale": 0.5, "n": 3}, "t")
    b = call_signature({"x": torch.ones(2, 3), "t": torch.tensor([9.0]), "scale": 0.7, "n": 3}, "t")
    c = call_signature({"x": torch.ones(2, 3), "t": torch.tensor([9.0]), "scale": 0.7, "n": 4}, "t")
    assert a == b != c  # values of tensors and floats do not matter; ints (sizes) do
