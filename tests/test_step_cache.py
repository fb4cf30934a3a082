"""Step caching (``parallel/cache/``): one decision per model-parallel group, on every exact layout.

- Threshold 0 never skips: every layout gives the uncached one-process output (rtol 1e-5).
- A positive threshold skips steps: every rank of a model-parallel group returns the same output and skipped the same
  steps (> 0), and the output equals the one-process cached run (the decision is reduced over the group, so it is the
  one the one-process run takes on the whole tensors).
- Shards that would decide differently on their own (a threshold between the two Ulysses shards' own statistics)
  still take one branch: no hang, equal outputs.
- With FSDP, a skipped block is not gathered: its parameters are still sharded when it is called in a skipped step,
  gathered in every computed step (blocks as units); with layer units and host offload the output is exact too.
- CFG parallel with separate calls (a WanPipeline held as ``self.pipe``): each cfg rank's call decides alone (with its
  Ulysses peers), as each diffusers cache context does in one process: per context the same skipped steps as the
  one-process cached run, the same output on every rank.

One launch of 2 ranks and one of 4 run every case in a row (``tests/in_process.py``), as under torchrun.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_dit_parallel import DiTParallelStrategy, PipelineStrategy, SequenceParallelStrategy
from lightning_dit_parallel.app.prompts import prompt_loader
from lightning_dit_parallel.parallel.cache import (
    DEFAULT_THRESHOLDS,
    CacheOptions,
    apply_step_cache,
    cache_config,
    check_step_cache,
)
from lightning_dit_parallel.parallel.fsdp import is_sharded
from lightning_dit_parallel.registry import find_planned_modules
from lightning_dit_parallel.strategies import CachedSingleDeviceStrategy
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch
from tests.models import build_dit, build_sd3, build_wan, dit_sampler, requests, sd3_sampler, text_requests

STEPS = 8
#: thresholds that skip some of the STEPS steps of the test DiT (its per-step changes are 0.15 .. 0.9)
THRESHOLDS = {"fbcache": 0.3, "teacache": 0.35}
#: A cached run against the one-process cached run: the same decisions (skipped steps compared exactly), and the output
#: within 2e-5 rather than the exact methods' 1e-5: a skipped step adds the residual of an earlier step, carrying that
#: step's rounding (tensor parallelism's all-reduce order) into the later steps once more. Measured: tensor parallel 2,
#: uncached 5.3e-6, fbcache 1.04e-5 (relative L2 2.5e-6 both); the other layouts stay under 1e-5.
CACHED_TOLERANCE = 2e-5


def _module(steps: int = STEPS):
    # 5 x 5 = 25 image tokens: does not divide by 2 or 4; 4 heads for Ulysses 2 x tensor parallel 2
    return dit_sampler(build_dit(sample_size=10, layers=4), steps=steps)


def _one_process(cache: str | None, threshold: float | None, batch_size: int = 2) -> tuple[torch.Tensor, list[int]]:
    """The one-process run, cached as the strategies cache it; outputs and skipped steps per batch."""
    module = _module()
    installed = []
    if cache is not None:
        ((_, dit, plan),) = find_planned_modules(module)
        installed.append(apply_step_cache(dit, plan, cache_config(cache, threshold), steps_source=module))
    outputs, skipped = [], []
    for batch in requests(2, batch_size=batch_size):
        for item in installed:
            item.begin_batch()
        outputs.append(module.sample(batch))
        skipped += [item.stats.skipped_steps for item in installed]
    for item in installed:
        item.remove()
    return torch.cat(outputs), skipped


class _Stats(L.Callback):
    """The cache's stats of every batch; and, per call of a block, whether its parameters were still sharded (FSDP)
    when its forward began (read by a pre-hook after every other, the gate's included)."""

    def __init__(self) -> None:
        self.stats = []
        self.sharded_calls = 0
        self.handles = []

    def on_predict_start(self, trainer, pl_module) -> None:
        ((_, dit, plan),) = find_planned_modules(pl_module)
        for _, blocks in plan.block_lists(dit):
            for block in blocks.children():
                names = [name for name, _ in block.named_parameters()]  # none in a block another stage holds
                if names:  # the last: of the block's own unit (the shared module is in block 0's head); looked up at
                    # the call: FSDP swaps the parameter objects when it gathers
                    self.handles.append(
                        block.register_forward_pre_hook(
                            lambda m, a, name=names[-1]: self._called(m.get_parameter(name))
                        )
                    )

    def _called(self, param) -> None:
        self.sharded_calls += int(is_sharded(param))

    def on_predict_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.stats += trainer.strategy.step_cache_stats()


def _predict(
    layout: dict, world: int, cache: str | None, threshold: float | None, stats: _Stats | None = None
) -> tuple[torch.Tensor, list]:
    stats = stats or _Stats()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=DiTParallelStrategy(**layout, cache=cache, cache_threshold=threshold),
        callbacks=[stats],
    )
    outputs = trainer.predict(_module(), requests(2, batch_size=2))
    return torch.cat(outputs), stats.stats


#: Layouts and the runs of each: None is threshold 0 (fbcache), a method name its THRESHOLDS entry. Every layout runs
#: threshold 0; each method runs on about half of them (process starts are the costly part).
LAYOUTS_2 = {
    "ulysses": (dict(ulysses_degree=2), (None, "fbcache", "teacache")),
    "ring": (dict(ring_degree=2), (None, "fbcache")),
    "tp": (dict(tp_degree=2), (None, "fbcache")),
    "fsdp_ulysses": (dict(ulysses_degree=2, fsdp=True, fsdp_units="blocks"), (None, "teacache", "fbcache")),
    "fsdp_layers_offload": (dict(ulysses_degree=2, fsdp=True, fsdp_units="layers", offload=True), ("fbcache",)),
    "pipeline": (dict(pp_degree=2, num_microbatches=1), (None, "fbcache", "teacache")),
    "pipeline_microbatches": (dict(pp_degree=2), ("fbcache",)),
    "cfg": (dict(cfg_degree=2), (None, "teacache")),
    "dp": (dict(dp_degree=2), (None, "fbcache")),
    "fsdp_dp": (dict(dp_degree=2, fsdp=True), ("teacache",)),  # the default units: rows streaming
}
LAYOUTS_4 = {
    "usp": (dict(ulysses_degree=2, ring_degree=2), (None, "fbcache")),
    "cfg_ulysses": (dict(cfg_degree=2, ulysses_degree=2), (None, "teacache")),
    "pipeline_ulysses": (dict(pp_degree=2, ulysses_degree=2, num_microbatches=1), (None, "fbcache")),
    "tp_ulysses": (dict(tp_degree=2, ulysses_degree=2), ("fbcache",)),
}
#: each rank has its own samples: compared with one-process runs of one sample, decisions per data-parallel group
PER_SAMPLE = {"dp", "fsdp_dp"}
#: with FSDP the whole FSDP group decides together, dp included: as the one-process run on all its samples at once
JOINT_SAMPLES = {"fsdp_dp"}
#: micro-batches decide one by one (the uncond and cond halves here): not the one-process whole-batch decision
PER_MICROBATCH = {"pipeline_microbatches"}
#: FSDP with blocks as units: a block called in a skipped step finds its parameters sharded (not gathered), in every
#: computed step gathered; but for teacache's first block, gathered in every step (the decision is taken inside it,
#: from the output of its modulation)
FSDP_BLOCKS = {"fsdp_ulysses"}  # block units: a skipped block's unit is not gathered

#: CFG parallel with separate calls: WanPipeline (2 blocks: fbcache skips the second), 64 x 48 (12 video tokens), 8
#: steps, one prompt; the threshold skips 3 "cond" and 2 "uncond" steps in one process (the contexts' statistics are
#: >= 0.005 away from it), where one joint decision per step could not skip unequal counts
WAN_STEPS, WAN_THRESHOLD = 8, 0.2


def _wan_module():
    from tests.test_cfg_separate import PIPELINES, WAN

    return PIPELINES["wan"]({**WAN, "num_inference_steps": WAN_STEPS, "height": 64})


def _wan_one_process() -> tuple[torch.Tensor, dict]:
    """The one-process cached WanPipeline run: its frames and skipped steps per cache context."""
    module = _wan_module()
    ((_, dit, plan),) = find_planned_modules(module.pipe.transformer)
    cache = apply_step_cache(dit, plan, cache_config("fbcache", WAN_THRESHOLD), steps_source=module)
    cache.begin_batch()
    with torch.no_grad():
        out = module.predict_step(next(iter(prompt_loader(["a red cat"], batch_size=1))), 0)
    skipped = dict(cache.stats.skipped_by_context)
    cache.remove()
    return out, skipped


def _wan_cfg_separate(world: int) -> tuple[list, dict]:
    """cfg 2 (x Ulysses 2 on 4 ranks) with separate calls, cached: this rank's frames and skipped steps per context."""
    module = _wan_module()
    stats = []

    class Stats(L.Callback):
        def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
            stats.extend(trainer.strategy.step_cache_stats())

    strategy = DiTParallelStrategy(
        cfg_degree=2, ulysses_degree=world // 2, cache="fbcache", cache_threshold=WAN_THRESHOLD
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Stats()],
    )
    out = torch.cat(trainer.predict(module, prompt_loader(["a red cat"], batch_size=1)))
    return out.tolist(), dict(stats[0].skipped_by_context)


def _cases(rank: int, world: int, port: int, harness_port: int, layouts: dict, straddle: bool) -> dict:
    torch.set_num_threads(1)
    results: dict = {}
    with external_launch(rank, world, port, harness_port):
        for name, (layout, runs) in layouts.items():
            for cache in runs:
                recorder = _Stats()
                out, stats = _predict(layout, world, cache or "fbcache", THRESHOLDS[cache] if cache else 0.0, recorder)
                results[(name, cache)] = (out.tolist(), [s.skipped_steps for s in stats])  # lists: no shared memory
                results[(name, cache, "sharded")] = (
                    recorder.sharded_calls,
                    sum(s.skipped_block_calls for s in stats),
                    sum(s.skipped_steps for s in stats),
                )
                if name == "ulysses" and cache is None:
                    never = stats  # threshold 0: every step's statistic is reduced and recorded, none skipped
        if straddle:
            results["straddle"] = _straddle(never)
            results["padding"] = _padding(never)
        results["cfg_separate"] = _wan_cfg_separate(world)
    return results


def _straddle(never: list) -> dict:
    """Ulysses 2, fbcache: a threshold between the two shards' own statistics of the first decided step (from the
    threshold-0 run's ``never``), which is the same step in a run with that threshold (nothing skipped before it)."""
    local, reduced, change = never[0].decisions[0]
    own = [_ratio(local), _ratio([r - m for r, m in zip(reduced, local)])]  # this shard's, the other shard's
    threshold = round(sum(own) / 2, 6)  # the same on both ranks (rounded: their float sums may differ in the last bit)
    out, stats = _predict(dict(ulysses_degree=2), 2, "fbcache", threshold)
    local, reduced, change = stats[0].decisions[0]
    return dict(own=own, threshold=threshold, change=change, out=out.tolist(), skipped=[s.skipped_steps for s in stats])


def _padding(never: list) -> dict:
    """Ulysses 2 over 25 image tokens (rank 1's shard ends with a padding token), threshold 0 (every step's statistic
    reduced, none skipped): the reduced statistics per decided step, with the padding left out (``never``: fbcache;
    teacache run here) and, for fbcache, with it in (``SequenceParallel.padding_rows`` made to find none)."""
    from lightning_dit_parallel.parallel.sequence.parallelize import SequenceParallel

    changes = {"fbcache": [d[2] for s in never for d in s.decisions]}
    _, stats = _predict(dict(ulysses_degree=2), 2, "teacache", 0.0)
    changes["teacache"] = [d[2] for s in stats for d in s.decisions]
    masked = SequenceParallel.padding_rows
    SequenceParallel.padding_rows = lambda self, x: None
    try:
        _, stats = _predict(dict(ulysses_degree=2), 2, "fbcache", 0.0)
    finally:
        SequenceParallel.padding_rows = masked
    changes["fbcache with padding"] = [d[2] for s in stats for d in s.decisions]
    return changes


def _one_process_changes(cache: str) -> list[float]:
    """The one-process run's statistic per decided step at threshold 0 (none skipped)."""
    module = _module()
    ((_, dit, plan),) = find_planned_modules(module)
    installed = apply_step_cache(dit, plan, cache_config(cache, 0.0), steps_source=module)
    changes = []
    for batch in requests(2, batch_size=2):
        installed.begin_batch()
        module.sample(batch)
        changes += [d[2] for d in installed.stats.decisions]
    installed.remove()
    return changes


def _check_padding(results: list[dict]) -> list[str]:
    """The reduced statistic of a padded Ulysses shard equals the one-process statistic to float32 precision, the same
    on both ranks; with the padding in, it does not (the comparison can fail)."""
    failures = []
    one_process = {cache: torch.tensor(_one_process_changes(cache), dtype=torch.float64) for cache in THRESHOLDS}
    for cache, expected in one_process.items():
        for rank, result in enumerate(results):
            got = torch.tensor(result["padding"][cache], dtype=torch.float64)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=0):
                failures.append(f"padding, {cache}, rank {rank}: statistics {got.tolist()} vs one process {expected}")
        if results[0]["padding"][cache] != results[1]["padding"][cache]:
            failures.append(f"padding, {cache}: the ranks' reduced statistics differ")
    expected = one_process["fbcache"]
    padded = torch.tensor(results[0]["padding"]["fbcache with padding"], dtype=torch.float64)
    if padded.shape == expected.shape and ((padded - expected).abs() / expected).max() < 1e-3:
        failures.append(
            f"padding: with the padding in, the statistic {padded.tolist()} still equals the one-process one"
        )
    return failures


def _ratio(sums: list[float]) -> float:
    return sum(sums[0::2]) / sum(sums[1::2])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check(results: list[dict], layouts: dict) -> list[str]:
    failures = _check_cfg_separate(results)
    plain, _ = _one_process(None, None)
    plain_each, _ = _one_process(None, None, batch_size=1)
    cached = {c: _one_process(c, t) for c, t in THRESHOLDS.items()}
    cached_each = {c: _one_process(c, t, batch_size=1) for c, t in THRESHOLDS.items()}
    for name, (_, runs) in layouts.items():
        per_sample = name in PER_SAMPLE
        for rank, result in enumerate(results):
            if None not in runs:
                continue
            expected = plain_each[rank : rank + 1] if per_sample else plain
            error = _relative(torch.tensor(result[(name, None)][0]), expected)
            if not error <= 1e-5:
                failures.append(f"{name}, threshold 0, rank {rank}: relative error {error:.2e} vs the uncached run")
        for cache in [c for c in runs if c is not None]:
            outs = [torch.tensor(r[(name, cache)][0]) for r in results]
            skipped = [r[(name, cache)][1] for r in results]
            if name in FSDP_BLOCKS:
                for rank, result in enumerate(results):
                    sharded, skipped_calls, skipped_steps = result[(name, cache, "sharded")]
                    expected = skipped_calls - (skipped_steps if cache == "teacache" else 0)
                    if not (sharded == expected > 0):
                        failures.append(
                            f"{name}, {cache}, rank {rank}: {sharded} block calls found their parameters"
                            f" sharded, {skipped_calls} were skipped in {skipped_steps} steps (must be {expected}:"
                            " a skipped block is not gathered, a computed one and teacache's first block are)"
                        )
            if per_sample:
                for rank, (out, steps) in enumerate(zip(outs, skipped)):
                    reference, reference_skipped = cached[cache] if name in JOINT_SAMPLES else cached_each[cache]
                    if name not in JOINT_SAMPLES:
                        reference_skipped = reference_skipped[rank : rank + 1]
                    if not _relative(out, reference[rank : rank + 1]) <= CACHED_TOLERANCE or steps != reference_skipped:
                        failures.append(
                            f"{name}, {cache}, rank {rank}: not the one-process run of its sample"
                            f" (skipped {steps} vs {reference_skipped})"
                        )
                continue
            if any(not torch.equal(out, outs[0]) for out in outs):
                failures.append(f"{name}, {cache}: the ranks' outputs differ")
            if any(s != skipped[0] for s in skipped) or not sum(skipped[0]) > 0:
                failures.append(f"{name}, {cache}: skipped steps per rank {skipped} (must be equal and > 0)")
            if name not in PER_MICROBATCH:
                reference, reference_skipped = cached[cache]
                error = _relative(outs[0], reference)
                if not error <= CACHED_TOLERANCE or skipped[0] != reference_skipped:
                    failures.append(
                        f"{name}, {cache}: relative error {error:.2e}, skipped {skipped[0]} vs the"
                        f" one-process cached run ({reference_skipped})"
                    )
    return failures


def _check_cfg_separate(results: list[dict]) -> list[str]:
    """CFG parallel with separate calls, cached: rank ``r`` of the cfg axis (cfg is the outer mesh axis) computes the
    "cond" (r = 0) or "uncond" (r = 1) call after the first step; its skips are the one-process run's of that
    context, its output the one-process output on every rank."""
    failures = []
    reference, skipped = _wan_one_process()
    if not (skipped.get("cond", 0) > 0 and skipped.get("uncond", 0) > 0):
        failures.append(f"cfg separate: the one-process run skipped {skipped}: the test's threshold skips nothing")
    outs = [torch.tensor(r["cfg_separate"][0]) for r in results]
    for rank, (out, result) in enumerate(zip(outs, results)):
        context = "cond" if rank < len(results) // 2 else "uncond"
        if result["cfg_separate"][1] != {context: skipped[context]}:
            failures.append(
                f"cfg separate, rank {rank}: skipped {result['cfg_separate'][1]}, the one-process"
                f" {context!r} context {skipped}"
            )
        error = _relative(out, reference)
        if not error <= CACHED_TOLERANCE:
            failures.append(f"cfg separate, rank {rank}: relative error {error:.2e} vs the one-process cached run")
        if not torch.equal(out, outs[0]):
            failures.append(f"cfg separate, rank {rank}: output differs from rank 0's")
    return failures


def test_step_cache_on_two_ranks():
    results = run_on_ranks(2, _cases, free_port(), free_port(), LAYOUTS_2, True, timeout_s=600)
    failures = _check(results, LAYOUTS_2)
    straddle = [r["straddle"] for r in results]
    own, threshold = straddle[0]["own"], straddle[0]["threshold"]
    assert min(own) < threshold < max(own), f"the shards' own statistics {own} do not straddle {threshold}"
    assert all(s["threshold"] == threshold for s in straddle)
    assert straddle[0]["change"] == straddle[1]["change"]  # the reduced statistic, bit for bit
    assert straddle[0]["out"] == straddle[1]["out"] and straddle[0]["skipped"] == straddle[1]["skipped"]
    failures += _check_padding(results)
    assert not failures, "\n".join(failures)


def test_step_cache_on_four_ranks():
    results = run_on_ranks(4, _cases, free_port(), free_port(), LAYOUTS_4, False, timeout_s=600)
    failures = _check(results, LAYOUTS_4)
    assert not failures, "\n".join(failures)


# -- one process, interface, refusals -------------------------------------------------------------------------


def test_threshold_zero_is_the_plain_run_and_a_threshold_skips():
    plain, _ = _one_process(None, None)
    for cache in THRESHOLDS:
        never, skipped = _one_process(cache, 0.0)
        assert torch.equal(never, plain) and skipped == [0]
        cached, skipped = _one_process(cache, THRESHOLDS[cache])
        assert skipped[0] > 0 and not torch.equal(cached, plain)


def test_schedule_options_bound_the_skips():
    module = _module(steps=12)
    ((_, dit, plan),) = find_planned_modules(module)
    options = CacheOptions(warmup_steps=3, final_steps=2, max_skips=1)
    cache = apply_step_cache(
        dit, plan, cache_config("fbcache", 10.0, options), steps_source=module
    )  # skip whenever allowed
    cache.begin_batch()
    skipped_at = []  # read at the last block, once the step's branch is taken
    hook = cache.infos[-1].block.register_forward_pre_hook(lambda *_: skipped_at.append(cache.skip))
    module.sample(next(iter(requests(2))))
    hook.remove()
    cache.remove()
    # warm-up 0..2 and the last 2 computed; never 2 skips in a row
    assert skipped_at == [False, False, False, True, False, True, False, True, False, True, False, False]


def test_teacache_decides_from_the_modulated_input():
    """teacache's distance is the relative L1 change, from one step to the next, of the first block's timestep-modulated
    input (the DiT block's ``norm1``, an AdaLayerNormZero, returns it), read at the block's first attention; a skipped
    step computes the first block up to there only. The rescale polynomial applies before accumulation: a constant
    polynomial gives a fixed pattern. A first block with none of the plan's attention modules decides from its own
    arguments."""
    module = _module()
    ((_, dit, plan),) = find_planned_modules(module)
    first = plan.block_lists(dit)[0][1][0]
    seen = []
    handle = first.norm1.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    cache = apply_step_cache(dit, plan, cache_config("teacache", 0.0), steps_source=module)
    assert cache._probes == [first.attn1]
    cache.begin_batch()
    module.sample(next(iter(requests(2))))
    changes = [d[2] for d in cache.stats.decisions]  # steps 1 .. STEPS - 2 (warm-up and final steps are forced)
    seen64 = [x.double() for x in seen]
    expected = [float((seen64[i] - seen64[i - 1]).abs().sum() / seen64[i - 1].abs().sum()) for i in range(1, STEPS - 1)]
    assert changes == pytest.approx(expected, rel=1e-9)
    cache.remove()
    # rescale [1.0]: every step adds 1; threshold 2.5 skips two steps after each computed one, the last step computed
    cache = apply_step_cache(dit, plan, cache_config("teacache", 2.5, {"rescale": [1.0]}), steps_source=module)
    cache.begin_batch()
    seen.clear()
    skipped_at = []  # read at the last block, once the step's branch is taken
    last = cache.infos[-1].block.register_forward_pre_hook(lambda *_: skipped_at.append(cache.skip))
    module.sample(next(iter(requests(2))))
    assert skipped_at == [False, True, True, False, True, True, False, False]
    assert len(seen) == STEPS  # the first block's modulation ran in every step, skipped or not
    assert cache.stats.skipped_block_calls == 4 * len(cache.infos)
    last.remove()
    handle.remove()
    cache.remove()
    order = plan.self_attention["transformer_blocks.*.attn1"]
    elsewhere = dataclasses.replace(plan, self_attention={"transformer_blocks.1.attn1": order})
    cache = apply_step_cache(dit, elsewhere, cache_config("teacache", 10.0), steps_source=module)
    assert cache._probes == []  # the fallback: the first block's own arguments
    cache.begin_batch()
    module.sample(next(iter(requests(2))))
    assert cache.stats.skipped_steps > 0 and cache.stats.decisions
    cache.remove()


def test_padding_rows_of_a_shard():
    """``ShardingState.padding_rows``: a tensor laid out like a cut of a padded sequence (its dims, its local length
    along the cut dim) holds padding after its real tokens on the last rank; none elsewhere; ambiguous layouts (two
    sequences of the same local length, different padding) give None."""
    from types import SimpleNamespace

    from lightning_dit_parallel import Split
    from lightning_dit_parallel.parallel.sequence.sharding import ShardingState

    states = [ShardingState(SimpleNamespace(size=2, rank=rank)) for rank in range(2)]
    for state in states:
        state.split(torch.zeros(1, 25, 4), Split("image", 1), "hidden")  # 13 per rank, rank 1: 12 real
        state.split(torch.zeros(25, 3), Split("image", -2), "ids")
    inside = torch.zeros(2, 13, 8)  # a block's hidden states: other batch and channels, the same token layout
    assert states[0].padding_rows(inside) is None and states[1].padding_rows(inside) == (1, 12)
    assert states[1].padding_rows(torch.zeros(13, 5)) == (0, 12)
    assert states[1].padding_rows(torch.zeros(2, 12, 8)) is None  # not a shard of a cut sequence
    states[1].split(torch.zeros(1, 26, 4), Split("text", 1), "context")  # 13 per rank, no padding: ambiguous
    assert states[1].padding_rows(inside) is None


def test_joint_attention_blocks_cache_both_streams():
    """SD3 blocks return (encoder_hidden_states, hidden_states): both carried; its last block (context_pre_only,
    returning (None, hidden_states)) always runs."""
    module = sd3_sampler(build_sd3(), steps=STEPS)
    ((_, dit, plan),) = find_planned_modules(module)
    cache = apply_step_cache(dit, plan, cache_config("teacache", 10.0), steps_source=module)
    cache.begin_batch()
    module.sample(next(iter(text_requests(2))))
    first = cache.by_index[0]
    assert first.mapping is not None and len([p for p in first.mapping if p is not None]) == 2
    assert cache.by_index[1].mapping is None
    assert cache.stats.skipped_steps > 0 and cache.stats.skipped_block_calls == cache.stats.skipped_steps
    cache.remove()
    assert all("forward" not in m.__dict__ for m in dit.modules())


def test_single_device_strategy_caches():
    stats = _Stats()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stats],
        strategy=CachedSingleDeviceStrategy(cache="fbcache", cache_threshold=THRESHOLDS["fbcache"]),
    )
    out = torch.cat(trainer.predict(_module(), requests(2)))
    reference, skipped = _one_process("fbcache", THRESHOLDS["fbcache"])
    assert torch.equal(out, reference) and [s.skipped_steps for s in stats.stats] == skipped


def test_cache_arguments_are_validated():
    default = SequenceParallelStrategy(ulysses_degree=2, cache="fbcache")._cache.threshold
    assert default == DEFAULT_THRESHOLDS["fbcache"] == 0.2
    assert DiTParallelStrategy(cache="teacache")._cache.threshold == DEFAULT_THRESHOLDS["teacache"] == 0.1
    with pytest.raises(ValueError, match="need cache='fbcache' or 'teacache'"):
        SequenceParallelStrategy(ulysses_degree=2, cache_threshold=0.1)
    with pytest.raises(ValueError, match="cache must be None or one of"):
        DiTParallelStrategy(cache="deepcache")
    with pytest.raises(ValueError, match="Unknown cache_options"):
        DiTParallelStrategy(cache="fbcache", cache_options={"warmup": 2})
    with pytest.raises(ValueError, match="rescale applies to cache='teacache' only"):
        DiTParallelStrategy(cache="fbcache", cache_options={"rescale": [1.0]})
    with pytest.raises(ValueError, match=r"Invalid cache_options \['rescale'\]"):
        DiTParallelStrategy(cache="teacache", cache_options={"rescale": []})
    assert DiTParallelStrategy(cache="teacache", cache_options={"rescale": [2, 0.5]})._cache.options.rescale == (2, 0.5)
    with pytest.raises(ValueError, match="does not compose with PipeFusion"):
        PipelineStrategy(pp_degree=2, mode="pipefusion", cache="fbcache")
    module = _module()
    ((_, dit, plan),) = find_planned_modules(module)
    with pytest.raises(ValueError, match="does not compose with DistriFusion"):
        check_step_cache(cache_config("teacache"), dit, plan, distrifusion=True)
    with pytest.raises(ValueError, match="fbcache runs the first 4 blocks always"):
        check_step_cache(cache_config("fbcache", None, {"first_blocks": 4}), dit, plan)


def test_command_line_reaches_the_cache():
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        ulysses = compose(config_name="predict", overrides=["strategy.cache=fbcache", "strategy.cache_threshold=0.1"])
        none = compose(
            config_name="predict",
            overrides=["strategy=none", "strategy.cache=teacache", "strategy.cache_options={max_skips: 2}"],
        )
    strategy = instantiate(ulysses.strategy)
    assert strategy._cache.method == "fbcache" and strategy._cache.threshold == 0.1
    single = instantiate(none.strategy)
    assert isinstance(single, CachedSingleDeviceStrategy) and single._cache.options.max_skips == 2


def test_diffusers_cache_contexts_keep_their_own_state():
    """A pipeline that calls the transformer twice per step names the calls (``cache_context("cond")`` ...): each
    context counts its own steps and keeps its own residuals; ``num_inference_steps`` there sets the final steps."""
    dit = build_wan()
    ((_, _, plan),) = find_planned_modules(dit)
    cache = apply_step_cache(dit, plan, cache_config("fbcache", 10.0))  # skip whenever the schedule allows
    cache.begin_batch()
    generator = torch.Generator().manual_seed(0)
    inputs = dict(encoder_hidden_states=torch.randn(1, 7, 16, generator=generator))
    latents = torch.randn(1, 4, 2, 6, 6, generator=generator)
    skipped = {"cond": [], "uncond": []}
    with torch.no_grad():
        for step in range(5):
            for name in ("cond", "uncond"):
                with dit.cache_context(name, step_index=step, num_inference_steps=5):
                    dit(latents * (1 - 0.05 * step), timestep=torch.tensor([900.0 - 150 * step]), **inputs)
                    skipped[name].append(cache.stats.skipped_steps)
    assert sorted(key[0] for key in cache._states) == ["cond", "uncond"]
    # per context: step 0 warm-up, 1-3 skipped, 4 the final step (from the context's num_inference_steps) computed;
    # the counts are of both contexts together, read after each call
    assert skipped["cond"] == [0, 1, 3, 5, 6] and skipped["uncond"] == [0, 2, 4, 6, 6]
    cache.remove()
    assert "cache_context" not in dit.__dict__
