"""Cutting a DiT's transformer blocks into pipeline stages and releasing the blocks a stage does not own.

The blocks of all the plan's ``blocks`` lists, concatenated in order, are numbered ``0 .. L-1`` (Flux: the
double-stream blocks, then the single-stream ones). Stage ``s`` owns a contiguous range of them. A rank keeps
its own blocks and everything outside the block lists (embeddings, final layer); every other block is
replaced in its ``ModuleList`` by an empty ``ReleasedBlock`` so that its parameters are freed. The stub keeps
the released block's structure with its tensors on the meta device (no storage), so that ``restore_blocks`` can
put it back with the weights broadcast from the stage that owns it: the plain model again on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lightning_dit_parallel.loading.deferred import deferred_roots
from lightning_dit_parallel.plan import DiTPlan


def stage_sizes(num_blocks: int, stages: int, layers_per_stage: tuple[int, ...] | None = None) -> list[int]:
    """Blocks per stage: ``layers_per_stage`` checked, or an even split (earlier stages take the remainder).

    Raises:
        ValueError: for more stages than blocks, or ``layers_per_stage`` of the wrong length or sum.
    """
    if stages > num_blocks:
        raise ValueError(
            f"Cannot cut {num_blocks} transformer blocks into {stages} pipeline stages: every stage needs at least"
            f" one block (pp degree {stages} > {num_blocks} blocks)."
        )
    if layers_per_stage is None:
        base, extra = divmod(num_blocks, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    sizes = list(layers_per_stage)
    if len(sizes) != stages or sum(sizes) != num_blocks or min(sizes) < 1:
        raise ValueError(
            f"layers_per_stage={sizes} must give {stages} positive counts (one per stage) summing to the"
            f" {num_blocks} blocks of the plan; they sum to {sum(sizes)}."
        )
    return sizes


@dataclass(frozen=True)
class StageAssignment:
    """Which blocks each stage owns.

    Args:
        list_paths: the plan's block-list paths, in execution order.
        list_lengths: blocks per list.
        sizes: blocks per stage, in stage order.
    """

    list_paths: tuple[str, ...]
    list_lengths: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.sizes)

    @property
    def num_blocks(self) -> int:
        return sum(self.list_lengths)

    def owned(self, stage: int) -> range:
        """Global block indices owned by ``stage``."""
        start = sum(self.sizes[:stage])
        return range(start, start + self.sizes[stage])

    def owner(self, block: int) -> int:
        """The stage that owns global block ``block``."""
        for stage in range(self.num_stages):
            if block in self.owned(stage):
                return stage
        raise IndexError(f"block {block} is outside 0..{self.num_blocks - 1}.")

    def locate(self, block: int) -> tuple[int, int]:
        """``(list index, index inside that list)`` of global block ``block``."""
        for list_index, length in enumerate(self.list_lengths):
            if block < length:
                return list_index, block
            block -= length
        raise IndexError("block index beyond the last block list.")

    def global_index(self, list_index: int, index: int) -> int:
        return sum(self.list_lengths[:list_index]) + index

    def describe(self, stage: int) -> str:
        blocks = self.owned(stage)
        return f"stage {stage}/{self.num_stages} owns blocks {blocks.start}..{blocks.stop - 1} of {self.num_blocks}"


def assign_stages(
    model: nn.Module, plan: DiTPlan, stages: int, layers_per_stage: tuple[int, ...] | None = None
) -> StageAssignment:
    """The stage assignment of ``model``'s planned blocks (pure computation: the same verdict on every rank).

    Raises:
        ValueError: when the plan names no block list, or the blocks do not cut into ``stages`` stages.
    """
    lists = plan.block_lists(model)
    if not lists:
        raise ValueError(
            f"The plan of {type(model).__name__} names no block lists (DiTPlan.blocks); pipeline stages are cut"
            " from them."
        )
    lengths = tuple(len(blocks) for _, blocks in lists)
    sizes = stage_sizes(sum(lengths), stages, layers_per_stage)
    return StageAssignment(tuple(path for path, _ in lists), lengths, tuple(sizes))


class ReleasedBlock(nn.Module):
    """Stands in for a block that another pipeline stage owns. It holds no parameters except the plan's
    ``shared_modules`` inside the block, which keep their attribute paths (e.g. ``norm1.emb``)."""

    #: read by parallelizers that hook a block's inputs (sequence parallel's ``split_module_inputs``)
    runs_on_this_rank = False

    def __init__(self, path: str, owner_note: str, original: nn.Module | None = None) -> None:
        super().__init__()
        self._released_path = path
        self._owner_note = owner_note
        # the released block with its tensors on the meta device, in a list so that it is not a submodule
        self._original = [] if original is None else [original]

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._released_path} was released on this rank ({self._owner_note}); it cannot run here. Pipeline"
            " stages see only their own blocks when the DiT's forward iterates a block list (`for block in"
            " self.blocks`); a forward that indexes the list instead is not supported."
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(
                f"{self._released_path}.{name} was released on this rank ({self._owner_note}). If the DiT uses it"
                f" outside its block loop, list '{self._released_path}.{name}' (or a submodule) in the plan's"
                " shared_modules."
            ) from None


def release_blocks(model: nn.Module, plan: DiTPlan, assignment: StageAssignment, stage: int) -> list[str]:
    """Replace every block that ``stage`` does not own by a ``ReleasedBlock`` keeping only shared submodules.

    Returns:
        The paths of the released blocks.

    Raises:
        ValueError: for a ``shared_modules`` entry that is not inside a block or does not exist.
    """
    owned = assignment.owned(stage)
    shared = _shared_by_block(model, plan, assignment)
    released = []
    originals = []
    for list_index, (path, blocks) in enumerate(plan.block_lists(model)):
        for index in range(len(blocks)):
            if assignment.global_index(list_index, index) in owned or isinstance(blocks[index], ReleasedBlock):
                continue
            block_path = f"{path}.{index}"
            owner = assignment.owner(assignment.global_index(list_index, index))
            original = blocks[index]
            stub = ReleasedBlock(block_path, f"pipeline stage {owner} owns it, this rank is stage {stage}", original)
            for relative in shared.get(block_path, []):
                _attach(stub, relative, original.get_submodule(relative))
            blocks[index] = stub
            released.append(block_path)
            originals.append(original)
    # what the rank still holds (shared modules, tensors tied to kept modules) keeps its storage; the rest goes
    kept = {id(t) for t in (*model.parameters(), *model.buffers())}
    for original in originals:
        _to_meta(original, kept)
    return released


def restore_blocks(model: nn.Module, plan: DiTPlan, assignment: StageAssignment, group: ProcessGroup) -> list[str]:
    """Put every released block back, its tensors broadcast from the stage that owns it: the undo of
    ``release_blocks``.

    A collective over the pipeline ``group`` (stage = rank in the group): every rank calls it, and all of them
    walk every block of every stage in the same order, so the broadcasts pair up. Tensors of the plan's
    ``shared_modules`` are held by every rank and are not sent.

    Returns:
        The paths of the blocks put back on this rank.
    """
    stage = dist.get_rank(group)
    shared = _shared_by_block(model, plan, assignment)
    device = _device_of(model)
    # a model with deferred weights gets its parameters read from its files again at the next setup: only its
    # buffers are sent (the same choice on every rank, so the broadcasts still pair up)
    lean = any(path == "" for path, _, _ in deferred_roots(model))
    restored = []
    for list_index, (path, blocks) in enumerate(plan.block_lists(model)):
        for index in range(len(blocks)):
            block_path = f"{path}.{index}"
            owner = assignment.owner(assignment.global_index(list_index, index))
            here = blocks[index]
            if owner != stage and not (isinstance(here, ReleasedBlock) and here._original):
                raise RuntimeError(f"{block_path} was released without its structure; it cannot be restored.")
            block = here if owner == stage else here._original[0]
            source = dist.get_global_rank(group, owner)
            received: dict[int, torch.Tensor] = {}  # id of a meta tensor -> its storage
            for tensor in _block_tensors(block, shared.get(block_path, [])):
                if lean and isinstance(tensor, nn.Parameter):
                    continue
                if owner == stage:
                    dist.broadcast(tensor.detach().contiguous(), source, group=group)  # (shape) -> every stage
                    continue
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                dist.broadcast(buffer, source, group=group)  # (shape) from the owning stage
                if tensor.is_meta:
                    # onto the host block by block: never the whole model on a device
                    received[id(tensor)] = buffer.cpu()
            if owner != stage:
                _fill(block, received)
                blocks[index] = block
                restored.append(block_path)
    return restored


def put_back_released(model: nn.Module, plan: DiTPlan) -> list[str]:
    """Put every released block back as it is, its tensors on the meta device (no collective: the undo of
    ``release_blocks`` after a failure). Returns the paths of the blocks put back."""
    put_back = []
    for path, blocks in plan.block_lists(model):
        for index in range(len(blocks)):
            here = blocks[index]
            if isinstance(here, ReleasedBlock) and here._original:
                blocks[index] = here._original[0]
                put_back.append(f"{path}.{index}")
    return put_back


def _to_meta(block: nn.Module, kept: set[int]) -> None:
    """Replace every parameter and buffer of ``block`` that is not in ``kept`` by a meta tensor (ties kept)."""
    replaced: dict[int, torch.Tensor] = {}
    for module in block.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or id(tensor) in kept or tensor.is_meta:
                    continue
                if id(tensor) not in replaced:
                    meta = torch.empty_like(tensor, device="meta")
                    if isinstance(tensor, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                    replaced[id(tensor)] = meta
                store[name] = replaced[id(tensor)]


def _block_tensors(block: nn.Module, shared: list[str]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``block`` outside its ``shared`` submodules, each tied tensor once, in
    ``named_modules`` order (the same on every rank)."""
    found, seen = [], set()
    for path, module in block.named_modules():
        if any(path == s or path.startswith(f"{s}.") for s in shared):
            continue
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.append(tensor)
    return found


def _fill(block: nn.Module, received: dict[int, torch.Tensor]) -> None:
    """Replace each meta tensor of ``block`` by the storage received for it (tied places get the same one)."""
    made: dict[int, torch.Tensor] = {}
    for module in block.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or id(tensor) not in received:
                    continue
                if id(tensor) not in made:
                    value = received[id(tensor)]
                    if isinstance(tensor, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    made[id(tensor)] = value
                store[name] = made[id(tensor)]


def _device_of(model: nn.Module) -> torch.device:
    """Where the rank keeps the model: the device of its first tensor with storage."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _shared_by_block(model: nn.Module, plan: DiTPlan, assignment: StageAssignment) -> dict[str, list[str]]:
    shared: dict[str, list[str]] = {}
    for entry in plan.shared_modules:
        block_path = next(
            (
                f"{p}.{i}"
                for p, n in zip(assignment.list_paths, assignment.list_lengths)
                for i in range(n)
                if entry.startswith(f"{p}.{i}.")
            ),
            None,
        )
        if block_path is None:
            raise ValueError(
                f"Plan shared_modules entry {entry!r} is not inside a block of {list(assignment.list_paths)}."
            )
        try:
            model.get_submodule(entry)
        except AttributeError as exc:
            raise ValueError(f"Plan shared_modules entry {entry!r} does not exist in {type(model).__name__}.") from exc
        shared.setdefault(block_path, []).append(entry[len(block_path) + 1 :])
    return shared


def _attach(stub: nn.Module, relative: str, module: nn.Module) -> None:
    """Put ``module`` at ``relative`` (dotted) under ``stub``, creating empty containers on the way."""
    *parents, leaf = relative.split(".")
    node = stub
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    node.add_module(leaf, module)


def check_cuts_on_every_stage(
    model: nn.Module, plan: DiTPlan, assignment: StageAssignment, what: str, name: str | None = None
) -> None:
    """Every stage must make the plan's cuts (pure check, the same verdict on every rank).

    Cuts at forward arguments (``split_inputs``) and at submodule outputs outside the blocks (``split_outputs``) run
    on every stage. A cut at a block's inputs (``split_module_inputs`` on ``blocks.i``) is made by each stage's
    first block of that list from index ``i`` on, so every stage must own one; a cut inside a block runs on the
    owning stage only and is not supported.

    Args:
        what: the combination being checked, for the messages, e.g. ``"Pipeline (pp=2) with sequence parallelism"``.
        name: how the messages name the model (default: its class name).

    Raises:
        ValueError: naming the cut and the stage that would not make it.
    """
    name = name or type(model).__name__
    inside = [
        p
        for p in (*plan.split_module_inputs, *plan.split_outputs)
        if plan.block_position(p) is None and any(p.startswith(f"{b}.") for b in plan.blocks)
    ]
    if inside:
        raise ValueError(
            f"{what} is not supported for {name}: its plan cuts tokens inside blocks at {inside}, which only the stage"
            " owning that block runs."
        )
    for cut in plan.split_module_inputs:
        position = plan.block_position(cut)
        if position is None:
            continue
        list_index = assignment.list_paths.index(position[0])
        for stage in range(assignment.num_stages):
            if not any(
                assignment.locate(b)[0] == list_index and assignment.locate(b)[1] >= position[1]
                for b in assignment.owned(stage)
            ):
                raise ValueError(
                    f"{what}: {name} cuts tokens at the inputs of {cut!r}, but {assignment.describe(stage)}, none of"
                    f" them in {position[0]!r} from index {position[1]} on, so that stage would never cut. Choose"
                    f" layers_per_stage so that every stage owns a block of {position[0]!r}, or use pp_degree=1."
                )


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements ``module`` holds (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


__all__ = [
    "ReleasedBlock",
    "StageAssignment",
    "assign_stages",
    "check_cuts_on_every_stage",
    "count_parameters",
    "release_blocks",
    "restore_blocks",
    "stage_sizes",
]
