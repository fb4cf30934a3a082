"""What step caching knows about each transformer block of a plan: its place, whether it may be skipped, and how
its outputs map onto its inputs (learned while the blocks run).

Skipping a block means returning, instead of its output, the inputs it was given (the same tensor objects) in the
shape of its output; the last skipped block of a run adds the run's cached residual. For that every output tensor of
the block must be one of its inputs carried forward: the DiT's forward passes a block's outputs to the next block of
the same list (``hidden_states = block(hidden_states, ...)``; Flux / SD3 / CogVideoX blocks return both streams,
``encoder_hidden_states, hidden_states = block(hidden_states=..., encoder_hidden_states=...)``). This mapping is found
the way the pipeline stages find the tensors they send (``pipeline/loop.py``): by object identity between one block's
outputs and the next block's arguments, with no per-family knowledge. The last block of a list (nothing follows it in
the list) takes the mapping of the block before it when both are called and return alike. A block whose mapping stays
unknown (SD3's last block returns ``(None, hidden_states)``; a list of one block) always runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.utils._pytree as pytree
from torch import Tensor, nn

from lightning_dit_parallel.parallel.pipeline.stages import ReleasedBlock
from lightning_dit_parallel.plan import DiTPlan, module_paths


@dataclass
class BlockInfo:
    """One block of the plan's lists.

    Attributes:
        index: position in execution order over all the plan's lists (the pipeline's global block index).
        list_index: which of ``plan.blocks`` holds it.
        skippable: not a block that always runs (fbcache's first blocks, a block with a plan cut point).
        mapping: for every output leaf, the position of the argument leaf it carries forward (``None`` for a leaf that
            is not a tensor, e.g. SD3's ``None``); ``None`` while unknown.
        args_spec, out_spec: the pytree structures of its ``(args, kwargs)`` and of its output.
        constants: the output leaves that are not tensors, by position.
    """

    block: nn.Module
    path: str
    index: int
    list_index: int
    skippable: bool
    mapping: tuple[int | None, ...] | None = None
    args_spec: pytree.TreeSpec | None = None
    out_spec: pytree.TreeSpec | None = None
    constants: dict[int, object] = field(default_factory=dict)


def block_infos(model: nn.Module, plan: DiTPlan, always_run: int) -> list[BlockInfo]:
    """Every block of the plan's lists that this rank holds (a pipeline stage releases the others), in execution
    order. ``always_run``: the first blocks that are never skipped (fbcache's deciding blocks).

    A block that is, or holds, a module at which the plan cuts or gathers a sequence (``split_outputs``,
    ``gather_outputs``, ``split_module_inputs`` inside it) always runs: skipping it would skip the cut.
    """
    modules = dict(model.named_modules())
    cut_paths = [q for p in (*plan.split_outputs, *plan.gather_outputs) for q in module_paths(modules, p)]
    cut_paths += [p for p in plan.split_module_inputs if plan.block_position(p) is None]
    infos, index = [], 0
    for list_index, (path, blocks) in enumerate(plan.block_lists(model)):
        for i in range(len(blocks)):  # by index: a pipeline stage's iteration yields its own blocks only
            block, block_path = blocks[i], f"{path}.{i}"
            if not isinstance(block, ReleasedBlock):
                cut = any(c == block_path or c.startswith(block_path + ".") for c in cut_paths)
                infos.append(BlockInfo(block, block_path, index, list_index, index >= always_run and not cut))
            index += 1
    return infos


def flatten_call(args: tuple, kwargs: dict) -> tuple[list, pytree.TreeSpec]:
    """The leaves and structure of a block call."""
    return pytree.tree_flatten((args, kwargs))


def learn_mapping(
    previous: BlockInfo,
    previous_args: list,
    outputs: list,
    out_spec: pytree.TreeSpec,
    next_args: list,
    next_spec: pytree.TreeSpec,
) -> bool:
    """Learn ``previous``'s mapping from the call that followed it in the same list (same call structure): each output
    tensor must be passed on as one of the next call's argument leaves, at a position where ``previous`` got a tensor
    of the same shape. Returns whether it was learned."""
    if previous.args_spec != next_spec:
        return False
    mapping: list[int | None] = []
    constants = {}
    for j, leaf in enumerate(outputs):
        if not isinstance(leaf, Tensor):
            mapping.append(None)
            constants[j] = leaf
            continue
        position = next((p for p, arg in enumerate(next_args) if arg is leaf), None)
        if position is None or not _same_shape(previous_args[position], leaf):
            return False
        mapping.append(position)
    previous.mapping, previous.out_spec, previous.constants = tuple(mapping), out_spec, constants
    return True


def inherit_mapping(info: BlockInfo, before: BlockInfo, args: list, outputs: list, out_spec: pytree.TreeSpec) -> bool:
    """The last block of a list (no call follows it there) takes the mapping of the block called before it, when
    both are called and return alike and the shapes agree. Returns whether it did."""
    if before.mapping is None or before.args_spec != info.args_spec or before.out_spec != out_spec:
        return False
    for j, position in enumerate(before.mapping):
        if position is None:
            if isinstance(outputs[j], Tensor) or outputs[j] != before.constants.get(j):
                return False
        elif not _same_shape(args[position], outputs[j]):
            return False
    info.mapping, info.out_spec, info.constants = before.mapping, out_spec, dict(before.constants)
    return True


def carried(info: BlockInfo, args: list) -> list:
    """The block's output leaves when skipped: the argument leaves it carries forward (constants as recorded)."""
    assert info.mapping is not None
    return [info.constants.get(j) if p is None else args[p] for j, p in enumerate(info.mapping)]


def _same_shape(a: object, b: object) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
