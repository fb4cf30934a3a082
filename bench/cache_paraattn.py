"""First-Block Cache side by side with ParaAttention's, on the same tiny Flux pipeline, Ulysses over 2 gloo ranks.

ParaAttention (https://github.com/chengzeyi/ParaAttention) is not a dependency of this package: give its source folder
with ``--paraattn SRC_DIR`` (the ``src`` folder of an unpacked sdist), or have ``import para_attn`` work; without it
only this package's rows are printed.

One launch of 2 ranks builds, from the same seed, a FluxPipeline offline (small configs, a word-level tokenizer; the
tiny encoders and VAE of ``tests/pipelines.py``; the transformer larger than the tests', with random non-zero weights)
once per variant, and samples the same prompts with the same per-prompt generators:

* **one process, uncached**: rank 0 alone; the reference of every PSNR;
* **this package**: ``parallelize(pipe.transformer, ParallelLayout(ulysses=2), cache=fbcache)`` at each threshold
  (``first_blocks=1``, ``warmup_steps=1``, ``final_steps=0``: ParaAttention's schedule, which has no forced final
  step), and uncached;
* **ParaAttention**: ``para_attn.context_parallel.diffusers_adapters.parallelize_pipe(pipe, mesh=...)`` (Ulysses 2) and
  ``para_attn.first_block_cache.diffusers_adapters.apply_cache_on_pipe(pipe, residual_diff_threshold=...)`` at the
  same thresholds, and uncached (context parallel only).

Per variant: steps skipped (of DiT calls), transformer blocks computed (of block calls), the median wall time of a
whole pipeline call (all prompts) and its ratio against the same system's uncached Ulysses run (medians of the ratios
of adjacent runs: the variants alternate in every repetition, so drift cancels), and the PSNR (images in [0, 1])
against the one-process uncached images. A rank stands for a device: every process runs with ``--threads`` threads.

The two statistics differ: ParaAttention compares the mean absolute change of the first double block's image-stream
residual, averaged over the ranks (``all_reduce(avg)`` of per-shard means); this package the sum over both streams
(text and image) of the absolute change, summed over the ranks, over the sum of the absolute residual. Equal
thresholds are therefore not equal settings: compare the rows at equal PSNR.

Two things keep ParaAttention 0.3.38 from running as it is here, both worked around below and printed:

* diffusers 0.42's native attention backend calls ``F.scaled_dot_product_attention(..., enable_gqa=False)``, and
  ParaAttention's ``ulysses_attn_func`` takes no ``enable_gqa`` (``TypeError: ulysses_attn_func() got an unexpected
  keyword argument 'enable_gqa'``): the shim drops ``enable_gqa`` when it is False (it does not change the result);
* ``parallelize_pipe`` and ``apply_cache_on_pipe`` patch ``__call__`` on the pipeline's *class*, once (the cache
  threshold is bound in that patch): each ParaAttention variant gets its own subclass of ``FluxPipeline`` (named
  ``Flux...`` so that ParaAttention's adapter lookup by class name finds it), and the other pipelines are untouched.

ParaAttention cuts the image and the text tokens into equal chunks (it asserts divisibility): the defaults give 256
image and 8 text tokens.

    python bench/cache_paraattn.py --paraattn /tmp/para_attn-0.3.38/src
    python bench/cache_paraattn.py --paraattn SRC --thresholds 0.05 0.1 0.2 --steps 20 --reps 5
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import traceback

import torch

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.cache import CacheOptions, cache_config
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

PROMPTS = ("a red cat on the grass", "a small blue bird in the sky")
TEXT_TOKENS = 8  # even: ParaAttention cuts the text tokens into equal chunks too


def flux_pipeline(hidden_heads: int, head_dim: int, double: int, single: int, seed: int = 0, cls=None):
    """A FluxPipeline built offline from small configs (the tests' tiny encoders, tokenizers and VAE), its transformer
    ``double`` double- and ``single`` single-stream blocks of ``hidden_heads`` heads of ``head_dim``, seeded."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from tests.models import randomize_zero_init
    from tests.pipelines import clip_encoder, t5_encoder, tiny_vae, word_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=hidden_heads,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    randomize_zero_init(transformer, seed)
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0)  # Flux's pipeline shifts the latents by it
    pipe = (cls or FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_encoder(seed=seed),
        tokenizer=word_tokenizer(),
        text_encoder_2=t5_encoder(seed=seed),
        tokenizer_2=word_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, args) -> torch.Tensor:
    """Every prompt, each with its own seeded generator: (prompts, 3, size, size) in [0, 1]."""
    return torch.cat([_sample_one(pipe, args, i, prompt) for i, prompt in enumerate(PROMPTS)])


class _BlockCalls:
    """Counts the calls of every transformer block (forward pre-hooks): ParaAttention's cached steps do not call the
    blocks after the first."""

    def __init__(self, transformer) -> None:
        self.calls = 0
        for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
            for block in blocks:
                block.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1


def _ours(args, threshold: float | None):
    """This package: Ulysses 2, fbcache at ``threshold`` (``None``: uncached)."""
    pipe = flux_pipeline(args.heads, args.head_dim, args.double, args.single)
    layout = ParallelLayout(ulysses=2).resolve(2)
    options = CacheOptions(warmup_steps=1, final_steps=0, num_steps=args.steps)
    config = None if threshold is None else cache_config("fbcache", threshold, options)
    parallelized = parallelize(pipe.transformer, layout, layout.build_mesh("cpu"), cache=config)
    caches = [item for item in parallelized.applied if hasattr(item, "skipped_output")]
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)

    def run():
        skipped = calls = skipped_blocks = 0
        images = []
        for i, prompt in enumerate(PROMPTS):  # one batch per prompt: the cache starts afresh for each
            parallelized.begin_batch()
            images.append(_sample_one(pipe, args, i, prompt))
            if caches:
                stats = caches[0].stats
                skipped, calls = skipped + stats.skipped_steps, calls + stats.steps
                skipped_blocks += stats.skipped_block_calls
        calls = calls or args.steps * len(PROMPTS)
        return torch.cat(images), [skipped, calls, skipped_blocks, calls * blocks]

    return run


def _sample_one(pipe, args, index: int, prompt: str) -> torch.Tensor:
    """One prompt: the final packed latents (1, tokens, 16) and the decoded image (1, 3, size, size) in [0, 1],
    flattened and concatenated (the VAE decode as ``FluxPipeline`` does it)."""
    with torch.no_grad():
        latents = pipe(
            prompt=prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=3.5,
            max_sequence_length=TEXT_TOKENS,
            generator=torch.Generator().manual_seed(index),
            output_type="latent",
        ).images
        unpacked = pipe._unpack_latents(latents, args.size, args.size, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.image_processor.postprocess(pipe.vae.decode(unpacked).sample, output_type="pt")
    return torch.cat([latents.flatten(), image.flatten()])[None]  # (1, latents + image values)


def _para_attn_shim() -> list[str]:
    """Make ParaAttention 0.3.38 run with diffusers 0.42 (see the module docstring); returns what was changed."""
    import para_attn.para_attn_interface as interface
    from para_attn.first_block_cache import utils

    original = interface.ulysses_attn_func

    def ulysses_attn_func(*args, enable_gqa: bool = False, **kwargs):
        if enable_gqa:
            raise NotImplementedError("ParaAttention's Ulysses attention has no grouped-query attention")
        return original(*args, **kwargs)

    interface.ulysses_attn_func = ulysses_attn_func

    def call_remaining_transformer_blocks(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        """``CachedTransformerBlocks.call_remaining_transformer_blocks`` (its path without skip-layer guidance) for
        diffusers' single-stream blocks that take both streams and return ``(encoder_hidden_states, hidden_states)``
        (diffusers >= 0.33); ParaAttention 0.3.38 concatenates the streams and passes one tensor."""
        assert not utils.is_slg_enabled(), "the shim covers ParaAttention's path without skip-layer guidance"
        original_hidden_states, original_encoder_hidden_states = hidden_states, encoder_hidden_states
        for block in [*self.transformer_blocks[1:], *(self.single_transformer_blocks or [])]:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, *args, **kwargs)
        hidden_states, encoder_hidden_states = hidden_states.contiguous(), encoder_hidden_states.contiguous()
        return (
            hidden_states,
            encoder_hidden_states,
            (hidden_states - original_hidden_states).contiguous(),
            (encoder_hidden_states - original_encoder_hidden_states).contiguous(),
        )

    utils.CachedTransformerBlocks.call_remaining_transformer_blocks = call_remaining_transformer_blocks
    return [
        "para_attn_interface.ulysses_attn_func: drops diffusers' enable_gqa=False (TypeError: unexpected keyword)",
        "first_block_cache.utils.CachedTransformerBlocks.call_remaining_transformer_blocks: calls diffusers 0.42's"
        " single-stream blocks with both streams (TypeError: FluxSingleTransformerBlock.forward() missing 1 required"
        " positional argument: 'encoder_hidden_states')",
    ]


def _para_attn(args, threshold: float | None, index: int):
    """ParaAttention: its context parallel (Ulysses 2) and, with ``threshold``, its First-Block Cache."""
    from diffusers import FluxPipeline
    from para_attn.context_parallel import init_context_parallel_mesh
    from para_attn.context_parallel.diffusers_adapters import parallelize_pipe
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe

    cls = type(f"FluxPipelineParaAttn{index}", (FluxPipeline,), {})  # its own class: ParaAttention patches __call__
    pipe = flux_pipeline(args.heads, args.head_dim, args.double, args.single, cls=cls)
    mesh = init_context_parallel_mesh("cpu", max_ulysses_dim_size=2)
    parallelize_pipe(pipe, mesh=mesh)
    if threshold is not None:
        apply_cache_on_pipe(pipe, residual_diff_threshold=threshold)
    counter = _BlockCalls(pipe.transformer)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)

    def run():
        counter.calls = 0
        images = torch.cat([_sample_one(pipe, args, i, p) for i, p in enumerate(PROMPTS)])
        calls = args.steps * len(PROMPTS)
        # a cached step calls only the first double block: skipped steps = (all block calls - calls made) / (blocks - 1)
        skipped = (calls * blocks - counter.calls) // (blocks - 1)
        return images, [skipped, calls, calls * blocks - counter.calls, calls * blocks]

    return run


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    results: dict = {"notes": []}
    variants: dict = {}
    reference = flux_pipeline(args.heads, args.head_dim, args.double, args.single)
    variants[("one process", "none")] = (lambda: (_sample(reference, args), None), time_rank_zero)
    variants[("this package", "none")] = (_ours(args, None), time_all_ranks)
    for t in args.thresholds:
        variants[("this package", f"fbcache {t}")] = (_ours(args, t), time_all_ranks)
    if args.paraattn_ok:
        try:
            results["notes"] += _para_attn_shim()
            variants[("ParaAttention", "none")] = (_para_attn(args, None, 0), time_all_ranks)
            for i, t in enumerate(args.thresholds):
                variants[("ParaAttention", f"fbcache {t}")] = (_para_attn(args, t, i + 1), time_all_ranks)
        except Exception:  # record why it cannot run; this package's rows still come
            results["notes"].append("ParaAttention could not be set up:\n" + traceback.format_exc())
    rows: dict = {}
    for key, (run, timer) in list(variants.items()):  # warm-up, and the outputs
        box: list = []
        try:
            timer(lambda run=run, box=box: box.append(run()))
        except Exception:
            results["notes"].append(f"{key} failed:\n" + traceback.format_exc())
            del variants[key]
            continue
        if box:
            images, counts = box[0]
            rows[key] = dict(images=images.tolist(), counts=counts, times=[], cpu=[])  # lists: no shared memory
    for _ in range(args.reps):  # alternating, so that drift between repetitions cancels in the ratios
        for key, (run, timer) in variants.items():
            seconds, cpu = timer(run)
            if key in rows:
                rows[key]["times"].append(seconds)
                rows[key]["cpu"].append(cpu)
    results["rows"] = rows
    return results


def _psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((out - reference) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paraattn", default=None, help="ParaAttention's source folder (its sdist's src/)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side: (size / 4)^2 image tokens")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.paraattn:
        sys.path.insert(0, args.paraattn)
    try:
        importlib.import_module("para_attn")
        args.paraattn_ok = True
    except ImportError as error:
        args.paraattn_ok = False
        print(f"ParaAttention not importable ({error}): only this package's rows")
    results = run_on_ranks(2, _worker, args, threads=args.threads, timeout_s=3600)
    merged = results[0]  # rank 0 ran the one-process reference; every rank has the Ulysses images
    for note in merged["notes"]:
        print("note:", note)
    rows = merged["rows"]
    for result in results:
        for row in result["rows"].values():
            row["images"] = torch.tensor(row["images"])
    reference = rows[("one process", "none")]["images"]
    tokens = (args.size // 4) ** 2
    latent_values = tokens * 16  # per prompt: the packed latents (16 = 4 channels x 2 x 2) first, then the image
    print(
        f"tiny Flux: {args.double} double + {args.single} single blocks, {args.heads} heads x {args.head_dim},"
        f" {tokens} image + {TEXT_TOKENS} text tokens, {args.steps} steps, {len(PROMPTS)} prompts (one call each),"
        f" guidance 3.5; 2 ranks (gloo), {args.threads} thread(s) per rank; {args.reps} repetitions"
    )
    print(
        "| system | cache | steps skipped | blocks computed | time (s, median) | time vs own uncached (median,"
        " range) | CPU time vs own uncached | PSNR vs one process (dB) | latents rel. L2 vs one process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (system, variant), r in rows.items():
        base = rows.get((system, "none"))
        ratio = cpu = "-"
        if system != "one process" and base is not None:
            ratios = [t / b for t, b in zip(r["times"], base["times"])]
            ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            cpu = f"{statistics.median([t / b for t, b in zip(r['cpu'], base['cpu'])]):.2f}"
        skipped, calls, skipped_blocks, block_calls = r["counts"] or [0, 0, 0, 0]
        steps = f"{skipped}/{calls}" if calls else "0"
        blocks = f"{block_calls - skipped_blocks}/{block_calls}" if block_calls else "all"
        print(
            f"| {system} | {variant} | {steps} | {blocks} | {statistics.median(r['times']):.3f} | {ratio} | {cpu} |"
            f" {_psnr(r['images'][:, latent_values:], reference[:, latent_values:]):.1f} |"
            f" {_relative(r['images'][:, :latent_values], reference[:, :latent_values]):.2e} |"
        )
    same = all(torch.equal(res["rows"][k]["images"], rows[k]["images"]) for res in results[1:] for k in res["rows"])
    print(f"every rank's images identical per variant: {same}")


if __name__ == "__main__":
    main()
