"""Checking a plan: run a DiT under its plan on 2 and 4 CPU ranks and compare every rank with one process.

``check_plan(model, inputs)`` returns a ``PlanCheck``; ``ldp-check-plan MODULE:FACTORY`` prints it and exits with
1 when a layout fails (2 when the model cannot be checked at all).

**The factory contract.** ``FACTORY`` is a callable without arguments, defined in ``MODULE`` (an importable module,
``my_package.my_dit``, resolved from the current directory as ``python -m`` does, or a file, ``examples/own_dit.py``),
returning ``(model, inputs)``: a small configuration of the DiT (a forward should take milliseconds on a CPU) with
its weights, and the keyword arguments of one forward as a dict (or the positional arguments as a tuple). Choose
token counts that divide neither 2 nor 4 (e.g. 15 image and 3 text tokens): then the shards are padded, and a wrong
concatenation order in the plan changes the output instead of going unnoticed. Use the doubled CFG batch (two
samples) and the masks the model takes. The factory's model keeps its weights: the check sharpens a copy.

Per layout (``"ulysses2"``, ``"ring2"``, ``"ulysses4"``, ``"ring4"``, ``"usp2x2"``: Ulysses x ring degrees) it
reports the largest relative error of any rank against one process, the attention modules whose
sequence-parallel kernel was called, the planned self-attention modules that never call
``F.scaled_dot_product_attention`` (they would attend to local tokens only), forward arguments of the DiT, its
blocks and its planned attention modules that reach them uncut although one of their dims has the length of a cut
sequence (a likely missing split), and a verdict: the run finished, no planned self-attention is silent and the
error is within the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.sequence.attention import local_sdpa
from lightning_dit_parallel.parallel.sequence.backends import local_attend
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.registry import HOW_TO_DECLARE, plan_for
from lightning_dit_parallel.utils.attention_route import route_attention_during_forward
from lightning_dit_parallel.utils.hooks import remove_handles
from lightning_dit_parallel.utils.multiprocess import run_on_ranks
from lightning_dit_parallel.utils.sharpen import SHARPNESS, sharpen_attention

#: Ulysses x ring on 2 and on 4 ranks.
DEFAULT_LAYOUTS = ("ulysses2", "ring2", "ulysses4", "ring4", "usp2x2")


@dataclass(frozen=True)
class LayoutCheck:
    """The outcome of one layout.

    Args:
        layout: its name, e.g. ``"ring4"``.
        ulysses, ring: its degrees (ranks = ulysses * ring).
        max_relative_error: max over ranks of max |output - reference| / max |reference|; ``None`` when the run
            failed.
        sharded_attention: attention modules whose sequence-parallel kernel was called (on rank 0).
        silent_attention: planned self-attention modules that ran without calling ``F.scaled_dot_product_attention``
            (found on one process, the same for every layout).
        uncut_arguments: ``"module(argument): ..."`` for tensors reaching the DiT, a block or a planned attention
            module uncut although a dim has the length of a cut sequence (block indices shown as ``*``; on rank 0).
        error: the exception of a failed run (``"TypeError: ..."``), else ``None``.
        tolerance: the largest relative error that passes.
    """

    layout: str
    ulysses: int
    ring: int
    max_relative_error: float | None
    sharded_attention: tuple[str, ...]
    silent_attention: tuple[str, ...]
    uncut_arguments: tuple[str, ...]
    error: str | None
    tolerance: float

    @property
    def ranks(self) -> int:
        return self.ulysses * self.ring

    @property
    def passed(self) -> bool:
        """The run finished, no planned self-attention is silent and the error is within the tolerance."""
        return (
            self.error is None
            and not self.silent_attention
            and self.max_relative_error is not None
            and self.max_relative_error <= self.tolerance
        )


@dataclass(frozen=True)
class PlanCheck:
    """The outcome of ``check_plan``: one ``LayoutCheck`` per layout.

    Args:
        model: the DiT's class name.
        plan: the plan that was checked.
        sequences: token count of every cut sequence (from the first layout that ran).
        layouts: per layout, in the order asked for.
        tolerance: the largest relative error that passes.
    """

    model: str
    plan: DiTPlan
    sequences: Mapping[str, int]
    layouts: tuple[LayoutCheck, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.layouts) and all(layout.passed for layout in self.layouts)

    def report(self) -> str:
        """A human-readable summary, one block per layout and a final verdict."""
        counts = ", ".join(f"{name}={n}" for name, n in self.sequences.items()) or "none cut"
        lines = [f"check_plan {self.model}: tokens {counts}; tolerance {self.tolerance:.0e} (relative, vs 1 process)"]
        for check in self.layouts:
            error = "-" if check.max_relative_error is None else f"{check.max_relative_error:.2e}"
            lines.append(
                f"  {check.layout} (ulysses={check.ulysses}, ring={check.ring}):"
                f" {'PASS' if check.passed else 'FAIL'}  max relative error {error}"
            )
            if check.error:
                lines.append(f"    error: {check.error}")
            lines.append(f"    sharded attention: {_summary(check.sharded_attention)}")
            lines.append(
                f"    planned self-attention that never called F.scaled_dot_product_attention:"
                f" {_summary(check.silent_attention)}"
            )
            lines.append(
                "    uncut arguments with the length of a cut sequence (likely missing splits):"
                + ("".join(f"\n      {a}" for a in check.uncut_arguments) or " none")
            )
        lines.append(f"verdict: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def check_plan(
    model: nn.Module,
    example_inputs: Mapping[str, Any] | Sequence[Any],
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
    *,
    plan: DiTPlan | None = None,
    tolerance: float = 1e-5,
    sharpen: float | None = SHARPNESS,
    output: Callable[[Any], Tensor] | None = None,
    timeout_s: float = 120.0,
) -> PlanCheck:
    """Run ``model`` on one process and under its plan on the ranks of every layout (CPU, gloo) and compare.

    Args:
        model: a small configuration of the DiT; it is copied, the copy sharpened and put in eval mode.
        example_inputs: the keyword arguments of one forward (a dict) or its positional arguments (a tuple).
        layouts: names ``"ulyssesN"``, ``"ringN"`` or ``"uspUxR"`` (Ulysses U times ring R ranks).
        plan: the plan to check; default: the model's own (``plan_for``).
        tolerance: the largest relative error that passes.
        sharpen: the factor every attention query and key is scaled by (``None``: no sharpening).
        output: picks the tensor to compare from the forward's return; default: the tensor, ``.sample`` or the
            first element of a tuple.
        timeout_s: collective timeout of every rank (a rank that fails alone makes the others wait this long).

    Raises:
        ValueError: for an unknown layout name or a model without a plan.
    """
    parsed = [parse_layout(name) for name in layouts]
    plan = plan if plan is not None else plan_for(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} has no parallel plan to check. {HOW_TO_DECLARE}")
    model = copy.deepcopy(model).eval()
    if sharpen is not None:
        sharpen_attention(model, sharpen)
    args, kwargs = _arguments(example_inputs)
    pick = output or prediction
    with torch.no_grad():
        reference = pick(model(*args, **kwargs)).detach()
    silent = silent_self_attention(model, plan, args, kwargs)
    checks = []
    sequences: dict[str, int] = {}
    for name, (ulysses, ring) in zip(layouts, parsed):
        try:
            results = run_on_ranks(
                ulysses * ring, _run_layout, model, plan, args, kwargs, ulysses, ring, pick, timeout_s=timeout_s
            )
        except AssertionError as exc:  # a rank died or hung: no results
            results = [{"error": _last_line(str(exc)), "output": None, "sharded": [], "uncut": [], "sequences": {}}]
        error = next((r["error"] for r in results if r["error"]), None)
        worst = None if error else _worst_error(results, reference)
        if isinstance(worst, str):
            error, worst = worst, None
        sequences = sequences or results[0]["sequences"]
        checks.append(
            LayoutCheck(
                name,
                ulysses,
                ring,
                worst,
                tuple(results[0]["sharded"]),
                silent,
                tuple(results[0]["uncut"]),
                error,
                tolerance,
            )
        )
    return PlanCheck(type(model).__name__, plan, sequences, tuple(checks), tolerance)


def parse_layout(name: str) -> tuple[int, int]:
    """``(ulysses, ring)`` of a layout name: ``"ulysses4"`` -> (4, 1), ``"ring2"`` -> (1, 2), ``"usp2x2"`` -> (2, 2).

    Raises:
        ValueError: for another name or a degree below 1.
    """
    match = re.fullmatch(r"(?:(ulysses)(\d+)|(ring)(\d+)|usp(\d+)x(\d+))", name)
    if match is None:
        raise ValueError(
            f"Unknown layout {name!r}: use 'ulyssesN', 'ringN' or 'uspUxR' (e.g. {list(DEFAULT_LAYOUTS)})."
        )
    u, r = (int(match[2]), 1) if match[1] else (1, int(match[4])) if match[3] else (int(match[5]), int(match[6]))
    if u < 1 or r < 1:
        raise ValueError(f"Layout {name!r} has a degree below 1.")
    return u, r


def prediction(output: Any) -> Tensor:
    """The prediction in a DiT forward's return: the tensor, ``.sample``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output:
        return prediction(output[0])
    raise TypeError(f"Cannot find the prediction in a {type(output).__name__}; pass output=... to check_plan.")


def silent_self_attention(model: nn.Module, plan: DiTPlan, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """Planned self-attention modules that run in one forward without calling ``F.scaled_dot_product_attention``
    (one process, no plan installed)."""
    ran: set[str] = set()
    called: set[str] = set()
    handles = []
    for path, module, _ in plan.self_attention_modules(model):
        handles.append(module.register_forward_pre_hook(lambda m, a, path=path: ran.add(path)))

        def kernel(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, path=path, backend=None):
            called.add(path)
            if backend is None:
                return local_sdpa(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=scale,
                    enable_gqa=enable_gqa,
                )
            return local_attend(backend, path)(q, k, v, attn_mask=mask, scale=scale)

        handles.extend(route_attention_during_forward(module, kernel, path))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        remove_handles(handles)
    return tuple(sorted(ran - called))


# -- one layout, on every rank -----------------------------------------------------------------------------------


@dataclass
class _Probe:
    """Records, during one parallel forward, which attention modules call the sequence-parallel kernel and which
    tensors reach the DiT, its blocks and its attention modules (after the plan's cuts)."""

    sharded: set[str] = field(default_factory=set)
    seen: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # (module, argument, shape)
    state: Any = None  # the forward's ShardingState: the cut sequences and their lengths

    def install(self, model: nn.Module, plan: DiTPlan, sp) -> list:
        """Hooks registered after the plan's, so that they see cut arguments and the swapped kernel."""
        handles = [model.register_forward_pre_hook(self._root(sp), with_kwargs=True)]
        watched = [(f"{path}.{i}", block) for path, blocks in plan.block_lists(model) for i, block in enumerate(blocks)]
        attention = [(path, module) for path, module, _ in plan.self_attention_modules(model)]
        for path, module in attention:
            handles.append(module.register_forward_hook(self._recorder(path)))
        for path, module in [*watched, *attention]:
            handles.append(module.register_forward_pre_hook(self._arguments(path, module), with_kwargs=True))
        return handles

    def _root(self, sp):
        signature = inspect.signature(sp.model.forward)
        # an argument the plan cuts by name somewhere (e.g. at the first block) is whole in the DiT's forward
        cut_later = {
            name
            for kind in ("split_module_inputs", "split_module_inputs_each_call")
            for args in getattr(sp.plan, kind, {}).values()
            for name in args
        }

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.state = sp.state
            self._record("forward", signature, args, kwargs, skip=cut_later)

        return hook

    def _recorder(self, path: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            # after the plan's check hook, which raises when the module's forward did not call its kernel
            self.sharded.add(path)

        return hook

    def _arguments(self, path: str, module: nn.Module):
        signature = inspect.signature(module.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._record(path, signature, args, kwargs)

        return hook

    def _record(
        self, where: str, signature: inspect.Signature, args: tuple, kwargs: dict, skip: Collection[str] = ()
    ) -> None:
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            bound = {**{str(i): a for i, a in enumerate(args)}, **kwargs}
        for name, value in bound.items():
            if name in skip:
                continue
            items = value if isinstance(value, (tuple, list)) else (value,)
            for i, item in enumerate(items):
                if isinstance(item, Tensor) and item.dim() > 0:
                    label = name if len(items) == 1 and not isinstance(value, (tuple, list)) else f"{name}[{i}]"
                    self.seen.append((where, label, tuple(item.shape)))

    def cut_lengths(self) -> dict[str, tuple[int, int]]:
        """name -> (whole length, local length) of every sequence cut in the forward."""
        sequences = getattr(self.state, "sequences", {}) if self.state is not None else {}
        return {name: (seq.length, seq.local) for name, seq in sequences.items()}

    def uncut(self) -> list[str]:
        """Recorded tensors with a dim as long as a cut sequence (or several, concatenated) that is really cut."""
        lengths = {n: whole for n, (whole, local) in self.cut_lengths().items() if whole != local}
        sums: dict[int, str] = {}
        for size in range(1, len(lengths) + 1):
            for names in itertools.combinations(lengths, size):
                sums.setdefault(sum(lengths[n] for n in names), " + ".join(names))
        found: dict[str, None] = {}
        for where, label, shape in self.seen:
            for dim, n in enumerate(shape):
                if n in sums:
                    module = re.sub(r"\.\d+(?=\.|$)", ".*", where)
                    found.setdefault(f"{module}({label}): shape {shape}, dim {dim} has {n} tokens = {sums[n]}")
                    break
        return list(found)


def _run_layout(
    rank: int,
    world_size: int,
    model: nn.Module,
    plan: DiTPlan,
    args: tuple,
    kwargs: dict,
    ulysses: int,
    ring: int,
    pick: Callable[[Any], Tensor],
) -> dict[str, Any]:
    layout = ParallelLayout(ulysses=ulysses, ring=ring).resolve(world_size)
    groups = SequenceGroups.from_mesh(layout.build_mesh("cpu"))
    probe = _Probe()
    output, error = None, None
    try:
        sp = apply_sequence_parallel(model, plan, groups)
        probe.install(model, plan, sp)
        with torch.no_grad():
            output = pick(model(*args, **kwargs)).detach()
    except Exception as exc:  # noqa: BLE001 -- reported as this layout's error; every rank fails the same way
        error = f"{type(exc).__name__}: {exc}"
    return {
        "output": output,
        "error": error,
        "sharded": sorted(probe.sharded),
        "uncut": probe.uncut(),
        "sequences": {name: whole for name, (whole, _) in probe.cut_lengths().items()},
    }


def _worst_error(results: list[dict[str, Any]], reference: Tensor) -> float | str:
    worst = 0.0
    scale = reference.double().abs().max().item() or 1.0
    for rank, result in enumerate(results):
        out = result["output"]
        if out.shape != reference.shape:
            return f"rank {rank} returned shape {tuple(out.shape)}, one process {tuple(reference.shape)}"
        worst = max(worst, (out.double() - reference.double()).abs().max().item() / scale)
    return worst


def _arguments(example_inputs: Mapping[str, Any] | Sequence[Any]) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a dict of keyword arguments or a tuple of positional arguments, got"
        f" {type(example_inputs).__name__}."
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _summary(paths: Sequence[str]) -> str:
    """Paths with block indices folded: ``blocks.*.attn (28)``."""
    if not paths:
        return "none"
    counts: dict[str, int] = {}
    for path in paths:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", path)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{p} ({n})" if n > 1 else p for p, n in counts.items())


# -- ldp-check-plan ----------------------------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable ``FACTORY`` named by ``"MODULE:FACTORY"`` (a module name or a ``.py`` file).

    Raises:
        ValueError: for a spec without ``:`` or a factory that is not callable.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"Expected MODULE:FACTORY (e.g. my_package.my_dit:make or examples/own_dit.py:make), got {spec!r}."
        )
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"Cannot load {module_name!r} as a Python file.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules.setdefault(path.stem, module)
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:  # as ``python -m``: modules of the current directory are found
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attribute!r}.")
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    """``ldp-check-plan MODULE:FACTORY [--layouts ulysses2,ring2] [--tolerance 1e-5] [--sharpen 6]``.

    Returns 0 when every layout passes, 1 when one fails, 2 when the model cannot be checked (bad factory, no plan).
    """
    parser = argparse.ArgumentParser(
        prog="ldp-check-plan",
        description="Check a DiT's parallel plan: run it on 1 process and on 2 and 4 CPU ranks (gloo) and compare.",
        epilog="FACTORY takes no arguments and returns (model, inputs): a small DiT and the keyword arguments of one"
        " forward (a dict) or its positional arguments (a tuple).",
    )
    parser.add_argument("factory", help="MODULE:FACTORY, e.g. my_package.my_dit:make or examples/own_dit.py:make")
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated: ulyssesN, ringN, uspUxR")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error that passes")
    parser.add_argument("--sharpen", type=float, default=SHARPNESS, help="scale of attention queries and keys (0: off)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout per rank, seconds")
    options = parser.parse_args(argv)
    try:
        made = load_factory(options.factory)()
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
            raise ValueError(f"{options.factory} must return (model, inputs), got {type(made).__name__}.")
        result = check_plan(
            made[0],
            made[1],
            [name for name in options.layouts.split(",") if name],
            tolerance=options.tolerance,
            sharpen=options.sharpen or None,
            timeout_s=options.timeout,
        )
    except (ValueError, TypeError, ImportError) as exc:
        print(f"ldp-check-plan: {exc}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.passed else 1
