"""Sequence parallelism on the attention backend the user set with ``set_attention_backend``.

For Flux, Wan 2.2 and QwenImage (token counts that do not divide 2 or 4, a text mask on QwenImage), the backends of
``CASES`` (diffusers' ``native``, ``_native_math``, ``flex`` and two backends the test registers in diffusers' registry,
one with ``return_lse`` and masks, one with neither) under Ulysses, Ring and USP on 2 and 4 gloo ranks must equal the
one-process output of the same model on the same backend (float32, relative 1e-5); each world size is one launch. Call
counters prove the chosen backend did the attention: Ulysses calls it, Ring calls its log-sum-exp (or warns once and
uses torch's kernel when it has none).
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from lightning_dit_parallel import plan_for
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.utils.attention_route import ROUTER_NAME, route_attention_during_forward
from tests.backend_cases import BACKENDS, WITH_LSE, WITHOUT_LSE, Captured, layout_groups, register_test_backends
from tests.distributed import run_on_ranks
from tests.models import build_dit
from tests.rank_outputs import max_relative_error
from tests.zoo import flux, qwenimage, wan22

#: case -> backends run on it: every backend on Flux; flex (slow in eager on CPU) on Flux only; QwenImage passes its
#: text mask, which the maskless test kernel (like flash-attn) refuses already in one process
CASES = {
    "flux-15img-3txt": BACKENDS,
    "wan22-27vid-3txt-persample": tuple(b for b in BACKENDS if b != "flex"),
    "qwenimage-15img-7txt": tuple(b for b in BACKENDS if b not in ("flex", WITHOUT_LSE)),
}

#: world size -> {layout: ulysses degree} (ring degree = world / ulysses)
LAYOUTS = {2: {"ulysses2": 2, "ring2": 1}, 4: {"ulysses4": 4, "ring4": 1, "usp2x2": 2}}


def _case(name: str):
    return next(c for c in (*flux.CASES, *wan22.CASES, *qwenimage.CASES) if c.name == name)


def _backend_cases(rank: int, world: int) -> dict:
    calls: Counter = Counter()
    restore = register_test_backends(calls)
    warnings = Captured("lightning_dit_parallel.parallel.sequence.backends")
    groups = {name: layout_groups(rank, world, u) for name, u in LAYOUTS[world].items()}
    errors: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    try:
        for case_name, backends in CASES.items():
            case = _case(case_name)
            for backend in backends:
                model = case.build()
                model.set_attention_backend(backend)
                with torch.no_grad():
                    reference = case.output(model(**case.inputs(model)))
                    for layout, layout_groups_ in groups.items():
                        calls.clear()
                        handle = apply_sequence_parallel(model, plan_for(model), layout_groups_)
                        try:
                            output = case.output(model(**case.inputs(model)))
                        finally:
                            handle.remove()
                        key = f"{case_name}/{backend}/{layout}"
                        errors[key] = max_relative_error(output, reference)
                        counts[key] = dict(calls)
    finally:
        restore()
    return {"errors": errors, "counts": counts, "warnings": warnings.messages}


@pytest.mark.parametrize("world", [2, 4])
def test_backends_exact_under_every_layout(world):
    results = run_on_ranks(world, _backend_cases, timeout_s=600)
    problems = []
    for rank, result in enumerate(results):
        for key, error in result["errors"].items():
            if not error <= 1e-5:
                problems.append(f"rank {rank} {key}: max relative error {error:.2e}")
    assert not problems, "\n".join(problems)
    counts, warnings = results[0]["counts"], results[0]["warnings"]
    for key, used in counts.items():
        _, backend, layout = key.split("/")
        plain = used.get(backend, 0)
        lse = used.get(backend + "+lse", 0) + (used.get("flex_attention+lse", 0) if backend == "flex" else 0)
        if layout.startswith("ulysses"):  # the backend itself runs the local attention
            assert plain > 0, f"{key}: the backend was not called ({used})"
        elif backend in (WITH_LSE, "flex"):  # Ring/USP: ring blocks on the backend's log-sum-exp
            assert lse > 0, f"{key}: ring blocks did not use the backend's lse ({used})"
        others = {
            k
            for k in used
            if k.split("+")[0] not in (backend, ROUTER_NAME, "flex_attention" if backend == "flex" else "")
        }
        assert not others, f"{key}: other backends ran: {used}"
    fallbacks = [w for w in warnings if repr(WITHOUT_LSE) in w and "no log-sum-exp" in w]
    assert len(fallbacks) == 1, warnings  # the backend without return_lse: warned once, then torch's kernel
    refused_masks = [w for w in warnings if repr(WITHOUT_LSE) in w and "refused a mask" in w]
    assert len(refused_masks) == 1, warnings  # padded shards under Ulysses: torch's kernel for the masked calls


def test_two_threads_two_models_do_not_interfere():
    """While thread A is inside a routed attention (parked in its kernel), thread B runs a plain DiT (calls
    F.scaled_dot_product_attention) and a plain Flux (through the dispatcher): B gets its own results, and A's kernel
    never sees B's calls. With a process-wide swap of F.scaled_dot_product_attention B would land in A's kernel."""
    flux_case = _case("flux-15img-3txt")
    dit_a, dit_b, flux_a, flux_b = build_dit(), build_dit(), flux_case.build(), flux_case.build()
    dit_inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 1]), class_labels=torch.tensor([1, 2])
    )
    with torch.no_grad():
        expected_dit = dit_b(**dit_inputs).sample
        expected_flux = flux_case.output(flux_b(**flux_case.inputs(flux_b)))
    for model_a in (dit_a, flux_a):
        inside, done, seen = threading.Event(), threading.Event(), []

        def kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=None, _seen=seen):
            _seen.append(threading.current_thread().name)
            if not inside.is_set():
                inside.set()
                assert done.wait(60), "thread B did not finish"
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

        path, attention, _ = next(iter(plan_for(model_a).self_attention_modules(model_a)))
        handles = route_attention_during_forward(attention, kernel, path)
        results = {}

        def run_a(model=model_a):
            with torch.no_grad():
                model(**(dit_inputs if model is dit_a else flux_case.inputs(model)))

        def run_b():
            assert inside.wait(60)
            with torch.no_grad():
                results["dit"] = dit_b(**dit_inputs).sample
                results["flux"] = flux_case.output(flux_b(**flux_case.inputs(flux_b)))
            done.set()

        threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for handle in handles:
            handle.remove()
        assert seen and set(seen) == {"A"}, seen
        assert torch.equal(results["dit"], expected_dit) and torch.equal(results["flux"], expected_flux)
    # nothing left behind: the processors are as the user left them, F.sdpa is torch's
    assert all(
        getattr(m.processor, "_parallel_config", None) is None for m in flux_a.modules() if hasattr(m, "processor")
    )
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_one_rank_routes_every_backend_bit_identically():
    """With one sequence-parallel rank the routed model is the plain model, bit for bit, for each backend."""
    case = _case("flux-15img-3txt")
    calls: Counter = Counter()
    restore = register_test_backends(calls)
    try:
        for backend in BACKENDS:
            model = case.build()
            model.set_attention_backend(backend)
            with torch.no_grad():
                reference = case.output(model(**case.inputs(model)))
                handle = apply_sequence_parallel(model, plan_for(model), SequenceGroups())
                calls.clear()
                output = case.output(model(**case.inputs(model)))
                handle.remove()
            assert torch.equal(output, reference), backend
            assert calls, backend
    finally:
        restore()


def _refusals(rank: int, world: int) -> dict[str, str]:
    """Each refusal on every rank: a backend whose constraints reject the tensors, a backend without log-sum-exp
    under Ring with ``lse_fallback="error"``, and a model whose attention reaches neither route."""
    from diffusers.models.attention_processor import AttnProcessor

    calls: Counter = Counter()
    restore = register_test_backends(calls)
    case = _case("flux-15img-3txt")
    ring = layout_groups(rank, world, 1)
    outcomes = {}

    def attempt(name, model, inputs, groups, **options):
        handle = apply_sequence_parallel(model, plan_for(model), groups, **options)
        try:
            with torch.no_grad():
                model(**inputs)
            outcomes[name] = "returned"
        except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
            outcomes[name] = f"{type(err).__name__}: {err}"
        finally:
            handle.remove()

    try:
        with_cudnn = case.build()
        restore()  # diffusers' own _native_cudnn: bfloat16/float16 only
        with_cudnn.set_attention_backend("_native_cudnn")
        attempt("constraint", with_cudnn, case.inputs(with_cudnn), ring)
        restore = register_test_backends(calls)
        no_lse = case.build()
        no_lse.set_attention_backend(WITHOUT_LSE)
        attempt("no-lse", no_lse, case.inputs(no_lse), ring, lse_fallback="error")
        silent = build_dit()
        for module in silent.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())  # explicit softmax(QK^T)V: neither the dispatcher nor F.sdpa
        dit_inputs = dict(
            hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 1]), class_labels=torch.tensor([1, 2])
        )
        attempt("silent", silent, dit_inputs, ring)
    finally:
        restore()
    return outcomes


def test_refusals_are_the_same_error_on_every_rank():
    outcomes = run_on_ranks(2, _refusals, timeout_s=120)
    assert outcomes[0] == outcomes[1], outcomes
    got = outcomes[0]
    assert got["constraint"].startswith("ValueError") and "'_native_cudnn'" in got["constraint"], got
    assert "bfloat16" in got["constraint"], got
    assert got["no-lse"].startswith("ValueError") and "lse_fallback='error'" in got["no-lse"], got
    assert got["silent"].startswith("RuntimeError") and "reached neither" in got["silent"], got


GPU_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "flash", "_flash_3", "sage")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backend_kernels_on_gpu(backend):
    """On CUDA in bfloat16, each installed backend's Ulysses kernel and its Ring blocks (two key blocks merged through
    their log-sum-exp, with and without a key mask) match float32 attention over all keys; backends that cannot run
    here are skipped with diffusers' reason."""
    from lightning_dit_parallel.parallel.sequence.backends import check_backend, local_attend, local_attend_with_lse
    from lightning_dit_parallel.parallel.sequence.local_attention import merge_partial

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=g).cuda().bfloat16() for _ in range(3))  # (B, H, S, D), 300: uneven
    try:
        check_backend(backend, q, k, v, "test")
    except ValueError as err:
        pytest.skip(str(err))
    tolerance = 6e-2 if backend == "sage" else 2e-2  # sage quantizes q/k to int8

    def relative(x, ref):
        return ((x.float() - ref).abs().max() / ref.abs().max()).item()

    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert relative(local_attend(backend, "test")(q, k, v, attn_mask=None, scale=None), reference) < tolerance
    with_lse = local_attend_with_lse(backend, "test")
    a, lse_a = with_lse(q, k[:, :, :128], v[:, :, :128], None, None)
    b, lse_b = with_lse(q, k[:, :, 128:], v[:, :, 128:], None, None)
    assert relative(merge_partial(a, lse_a, b, lse_b)[0], reference) < tolerance
    valid = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    valid[1, 250:] = False  # the second sample's last 50 keys are padding
    masked = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=valid[:, None, None, :]
    )
    a, lse_a = with_lse(q, k[:, :, :128], v[:, :, :128], valid[:, :128], None)
    b, lse_b = with_lse(q, k[:, :, 128:], v[:, :, 128:], valid[:, 128:], None)
    assert relative(merge_partial(a, lse_a, b, lse_b)[0], masked) < tolerance
