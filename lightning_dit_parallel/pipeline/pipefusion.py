"""PipeFusion: the token sequence is cut into patches that flow through the pipeline stages (approximate).

Per DiT call (one denoising step) every rank runs the DiT's forward once per patch. The plan's split
points cut the sequence to the current patch; the block loop runs this stage's blocks (see ``loop.py``);
on the last stage the plan's gather point collects the patches and, at the last patch, returns the whole
sequence so the rest of the forward (unpatchify) runs once on real data.

Attention: each self-attention module of this stage keeps the keys and values of the whole sequence from
its previous call (``KVCache``), overwrites the current patch's rows with the fresh ones and attends over
all of them, so a patch sees the current step's keys for the patches already computed and the previous
step's for the others. Keys never computed yet (no warm-up) are masked out. The first ``warmup_steps`` calls
of a batch run unpatched, which is exact and fills the caches. The state lives with the module's owner and
is reset for each new batch, so any number of steps runs on any number of stages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.pipeline.comm import StageLink
from lightning_dit_parallel.pipeline.loop import StageDone, StageLoop
from lightning_dit_parallel.plan import DiTPlan, Split, SplitSpec, module_paths
from lightning_dit_parallel.sequence.attention import local_sdpa
from lightning_dit_parallel.splits import cut_arguments, cut_value
from lightning_dit_parallel.utils.hooks import remove_handles, swap_sdpa_during_forward


@dataclass
class PatchState:
    """The patch being computed in the current pass: ``index`` of ``patches``; ``length`` tokens in all."""

    patches: int
    index: int
    length: int | None = None

    @property
    def local(self) -> int:
        assert self.length is not None
        return self.length // self.patches

    def cut(self, x: Tensor, split: Split, where: str) -> Tensor:
        """This patch of ``x`` along ``split.dim``: (..., S, ...) -> (..., S/M, ...)."""
        dim = split.dim % x.ndim
        length = x.shape[dim]
        if self.length is None:
            if length % self.patches:
                raise ValueError(
                    f"{where}: PipeFusion cuts the {length} tokens of sequence {split.sequence!r} into num_patches="
                    f"{self.patches} patches, but {length} is not divisible by {self.patches} (patches are not padded);"
                    f" choose num_patches among the divisors of {length}."
                )
            self.length = length
        elif length != self.length:
            raise ValueError(
                f"{where}: {length} tokens of {split.sequence!r}, but {self.length} were cut earlier in this pass."
            )
        return x.narrow(dim, self.index * self.local, self.local)  # (..., S, ...) -> (..., S/M, ...)


@dataclass
class KVCache:
    """Keys and values (B, H, S, D) of the whole sequence for one attention module, and which rows are filled."""

    key: Tensor
    value: Tensor
    filled: Tensor  # (S,) bool

    @classmethod
    def empty(cls, key: Tensor, value: Tensor, length: int) -> KVCache:
        return cls(
            key.new_zeros((*key.shape[:-2], length, key.shape[-1])),  # (B, H, S, D)
            value.new_zeros((*value.shape[:-2], length, value.shape[-1])),  # (B, H, S, Dv)
            torch.zeros(length, dtype=torch.bool, device=key.device),
        )

    def matches(self, key: Tensor, value: Tensor, length: int) -> bool:
        return (
            self.key.shape == (*key.shape[:-2], length, key.shape[-1])
            and self.value.shape == (*value.shape[:-2], length, value.shape[-1])
            and self.key.dtype == key.dtype
        )


@dataclass
class PipeFusionForward:
    """Replaces the DiT's ``forward`` (as an instance attribute) with the PipeFusion schedule.

    Args:
        forward: the DiT's own forward (bound).
        model: the DiT (hooks are installed on its submodules).
        plan: its plan (split and gather points, self-attention modules).
        loop: this rank's stage loop, installed on the DiT's block lists.
        link: this rank's place in the pipeline group.
        num_patches: patches per step after warm-up.
        warmup_steps: unpatched calls at the start of each batch.
    """

    forward: Callable
    model: nn.Module
    plan: DiTPlan
    loop: StageLoop
    link: StageLink
    num_patches: int
    warmup_steps: int
    state: PatchState | None = None
    step: int = 0
    caches: dict[str, KVCache] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)
    _inputs_key: tuple | None = None

    def __post_init__(self) -> None:
        self._signature = inspect.signature(self.forward)
        self.__wrapped__ = self.forward  # inspect.signature(dit.forward) still shows the DiT's own arguments

    def begin_batch(self) -> None:
        """Forget the caches and the step count: the next call is the first step of a new batch."""
        self.caches.clear()
        self.step = 0
        self._inputs_key = None

    def __call__(self, *args, **kwargs):
        key = _inputs_key((args, kwargs))
        if key != self._inputs_key:  # a differently shaped call cannot continue the previous batch
            self.begin_batch()
            self._inputs_key = key
        patches = 1 if self.step < self.warmup_steps else self.num_patches
        self.step += 1
        result = None
        try:
            for index in range(patches):
                self.state = PatchState(patches, index)
                self.loop.begin()
                try:
                    result = self._run(args, kwargs)
                except StageDone:
                    pass
        finally:
            self.state = None
            self.loop.wait()
        device = next(leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)).device
        return self.link.broadcast_from_last(result if self.link.is_last else None, device)

    def _run(self, args: tuple, kwargs: dict):
        cut = self._require_state("forward").cut
        args, kwargs = cut_arguments(self._signature, self.plan.split_inputs, args, kwargs, cut, "forward")
        return self.forward(*args, **kwargs)

    def _require_state(self, where: str) -> PatchState:
        if self.state is None:
            raise RuntimeError(f"{where} ran outside a forward of the pipelined {type(self.model).__name__}.")
        return self.state

    # -- hooks --------------------------------------------------------------------------------------------

    def install(self, modules: dict[str, nn.Module]) -> None:
        """Hooks at the plan's split and gather points and around this stage's self-attention modules."""
        for key, split in self.plan.split_outputs.items():
            for path in module_paths(modules, key):
                self.handles.append(modules[path].register_forward_hook(self._split_output_hook(path, split)))
        for path, splits in self.plan.split_module_inputs.items():
            hook = self._split_input_hook(path, splits)
            self.handles.append(modules[path].register_forward_pre_hook(hook, with_kwargs=True))
        if self.link.is_last:
            for key, split in self.plan.gather_outputs.items():
                for path in module_paths(modules, key):
                    self.handles.append(modules[path].register_forward_hook(self._gather_hook(path, split)))
        for path, module, _ in self.plan.self_attention_modules(self.model):
            self.handles.extend(swap_sdpa_during_forward(module, self._attention_kernel(path)))

    def remove(self) -> None:
        remove_handles(self.handles)
        self.begin_batch()

    def _split_output_hook(self, path: str, split: SplitSpec):
        def hook(module: nn.Module, args: tuple, output):
            return cut_value(output, split, self._require_state(path).cut, path)

        return hook

    def _split_input_hook(self, path: str, splits: Mapping[str, SplitSpec]):
        signature = inspect.signature(self.model.get_submodule(path).forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            return cut_arguments(signature, splits, args, kwargs, self._require_state(path).cut, path)

        return hook

    def _gather_hook(self, path: str, split: Split):
        patches: list[Tensor] = []

        def hook(module: nn.Module, args: tuple, output):
            state = self._require_state(path)
            if state.index == 0:
                patches.clear()
            patches.append(output)  # (..., S/M, ...)
            if state.index < state.patches - 1:
                raise StageDone  # the rest of the forward needs the whole sequence: wait for the last patch
            whole = torch.cat(patches, dim=split.dim % output.ndim)  # M x (..., S/M, ...) -> (..., S, ...)
            patches.clear()
            return whole

        return hook

    def _attention_kernel(self, path: str) -> Callable:
        """Attention of the current patch's queries over the cached keys and values of the whole sequence."""

        def kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if attn_mask is not None or dropout_p or is_causal or enable_gqa:
                raise NotImplementedError(
                    f"{path}: PipeFusion attention does not support masks, dropout, causal attention or GQA."
                )
            state = self._require_state(path)
            if state.length is None or key.shape[-2] != state.local:
                raise RuntimeError(
                    f"{path}: PipeFusion expects keys of the current patch ({state.local} of {state.length} tokens),"
                    f" got key {tuple(key.shape)} (B, H, S, D). Check the plan's split points."
                )
            cache = self.caches.get(path)
            if cache is None or not cache.matches(key, value, state.length):
                cache = self.caches[path] = KVCache.empty(key, value, state.length)
            rows = slice(state.index * state.local, (state.index + 1) * state.local)
            cache.key[..., rows, :] = key  # (B, H, S/M, D) into (B, H, S, D)
            cache.value[..., rows, :] = value
            cache.filled[rows] = True
            mask = None if bool(cache.filled.all()) else cache.filled.view(1, -1)  # (1, S) broadcasts to (B, H, S/M, S)
            return local_sdpa(query, cache.key, cache.value, attn_mask=mask, scale=scale)

        return kernel


def check_pipefusion_plan(plan: DiTPlan, model: nn.Module) -> None:
    """PipeFusion needs one cut sequence that every self-attention attends over, cut where every stage cuts it.

    Pure computation: every rank of the pipeline reaches the same verdict before any communication.

    Raises:
        ValueError: for plans with several sequences (e.g. joint text-image attention in Flux or SD3), and for
            plans that cut tokens at the inputs of a block (e.g. Wan's ``blocks.0``): only the stage owning that
            block would cut there, and the others would exchange whole sequences for patches.
    """
    not_applied = [name for name in ("linear_attention", "token_grids") if getattr(plan, name)]
    if not_applied:
        raise ValueError(
            f"PipeFusion does not support the plan of {type(model).__name__}: it has {not_applied} (sums over all"
            " tokens, convolutions over the token grid), which PipeFusion does not apply to patches. Use pipeline"
            " mode 'microbatch' for this model."
        )
    sequences = plan.sequences
    orders = set(plan.self_attention.values())
    if len(sequences) != 1 or orders != {sequences}:
        raise ValueError(
            f"PipeFusion supports plans with one cut sequence that self-attention attends over; the plan of"
            f" {type(model).__name__} cuts {list(sequences)} and its self-attention runs over {sorted(orders)}."
            " Use pipeline mode 'microbatch' for this model."
        )
    in_blocks = [p for p in plan.split_module_inputs if any(p.startswith(f"{blocks}.") for blocks in plan.blocks)]
    if in_blocks:
        raise ValueError(
            f"PipeFusion does not support the plan of {type(model).__name__}: it cuts tokens at the inputs of"
            f" blocks {in_blocks} (split_module_inputs), which only the pipeline stage owning them runs."
            " Use pipeline mode 'microbatch' for this model."
        )
    per_call = [name for name in ("split_module_inputs_each_call", "gather_module_inputs", "replicated_tail_attention")
                if getattr(plan, name)]
    if per_call:
        raise ValueError(
            f"PipeFusion does not support the plan of {type(model).__name__}: it has {per_call}, which PipeFusion"
            " does not apply. Use pipeline mode 'microbatch' for this model."
        )


def _inputs_key(inputs) -> tuple:
    return tuple((tuple(leaf.shape), leaf.dtype) for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, Tensor))
