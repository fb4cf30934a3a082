"""PipeFusion's patches: which tokens of each cut sequence one pass through the pipeline carries.

A denoising step after warm-up runs the DiT's forward once per patch. In pass ``i`` of ``M``, a *patched* sequence
(the image or video tokens: every sequence the plan gathers, and, with ``text_tokens="per_step"``, the others too)
is cut to its ``i``-th run of tokens; the other sequences (the text of joint attention, with
``text_tokens="every_patch"``) go whole with every pass. Runs are contiguous and as even as possible, the first
``S % M`` one token longer, so any token count works (no padding).

With sequence parallelism inside each stage, every rank of a stage then cuts its shard of the patch
(``PatchedSharding``): sequence-parallel cut of the pipeline cut, gathered back the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan import Split


def patch_bounds(length: int, patches: int) -> list[int]:
    """The ``patches + 1`` token offsets of the runs of a sequence of ``length`` tokens (first runs one longer)."""
    base, extra = divmod(length, patches)
    bounds = [0]
    for i in range(patches):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


@dataclass
class PatchPass:
    """One pass of the schedule: patch ``index`` of ``patches``.

    Args:
        patches: passes of this step (1 during warm-up: every sequence whole).
        index: this pass.
        patched: the sequences cut into patches; ``None``: all of them. The others go whole with every pass.
        lengths: whole length of each sequence cut so far in this pass (filled by ``cut``).
    """

    patches: int
    index: int
    patched: frozenset[str] | None = None
    lengths: dict[str, int] = field(default_factory=dict)

    def is_patched(self, name: str) -> bool:
        return self.patches > 1 and (self.patched is None or name in self.patched)

    def part(self, name: str) -> tuple[int, int]:
        """``(start, size)``: the tokens of sequence ``name`` this pass carries (the whole for an unpatched one)."""
        length = self.lengths[name]
        if not self.is_patched(name):
            return 0, length
        bounds = patch_bounds(length, self.patches)
        return bounds[self.index], bounds[self.index + 1] - bounds[self.index]

    def parts(self, name: str) -> list[int]:
        """The sizes of every pass's part of sequence ``name`` in this step, in pass order."""
        length = self.lengths[name]
        if not self.is_patched(name):
            return [length]
        bounds = patch_bounds(length, self.patches)
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def whole_length(self, name: str) -> int | None:
        return self.lengths.get(name)

    def cut(self, x: Tensor, split: Split, where: str) -> Tensor:
        """This pass's part of ``x`` along ``split.dim``: (..., S, ...) -> (..., S_i, ...).

        Raises:
            ValueError: for a patched sequence with fewer tokens than patches, or a sequence whose length differs
                from the one cut earlier in this pass.
        """
        dim = split.dim % x.ndim
        length = x.shape[dim]
        known = self.lengths.setdefault(split.sequence, length)
        if known != length:
            raise ValueError(
                f"{where}: {length} tokens of {split.sequence!r} along dim {split.dim}, but {known} were cut earlier in"
                " this pass; the plan's splits disagree."
            )
        if self.is_patched(split.sequence) and length < self.patches:
            raise ValueError(
                f"{where}: PipeFusion cuts the {length} tokens of sequence {split.sequence!r} into num_patches="
                f"{self.patches} patches, but a patch needs at least one token; choose num_patches <= {length}"
                + (" or text_tokens='every_patch'." if self.patched is None else ".")
            )
        start, size = self.part(split.sequence)
        return x.narrow(dim, start, size)  # (..., S, ...) -> (..., S_i, ...)


#: collect(part, split, where) -> what the gather point returns: see ``PatchCollector``.
CollectFn = Callable[[Tensor, Split, str], Tensor]

#: check(split, where): raises when a gather point runs where PipeFusion cannot collect patches.
CheckFn = Callable[[Split, str], None]


@dataclass
class PatchedSharding(ShardingState):
    """The sharding state of one PipeFusion pass: every cut is the sequence-parallel shard (padded, see
    ``ShardingState``) of this pass's part of the sequence; a gather collects the shards back into the part and
    hands it to ``collect`` (the patches of the step, assembled by the pipeline).

    With one sequence-parallel rank the shard is the part itself. ``sequences`` (what attention sees) holds the
    parts' lengths; ``whole_length`` the sequences' whole lengths (what a ``Concat``, a ``PrefixCount`` or a folded
    split reads, before any cut).
    """

    patch: PatchPass = field(default_factory=lambda: PatchPass(1, 0))
    collect: CollectFn | None = None
    check_gather: CheckFn | None = None

    def split(self, x: Tensor, split: Split, where: str) -> Tensor:
        # (..., S, ...) -> (..., S_i, ...) -> (..., ceil(S_i/N), ...)
        return super().split(self.patch.cut(x, split, where), split, where)

    def gather(self, x: Tensor, split: Split, where: str) -> Tensor:
        if self.check_gather is not None:
            self.check_gather(split, where)  # before any collective: every rank raises at the same point
        part = super().gather(x, split, where)  # (..., ceil(S_i/N), ...) -> (..., S_i, ...)
        return part if self.collect is None else self.collect(part, split, where)

    def whole_length(self, name: str) -> int | None:
        return self.patch.whole_length(name)
