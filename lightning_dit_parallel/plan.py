"""Plans: the data that says how one DiT class is parallelized.

A plan is the only model-specific thing in the package. It names module paths and forward arguments;
it contains no code. Plans are found by class in ``registry.py``: a ``dit_plan`` class attribute, a call to
``register_plan(cls, plan)``, or one of the plans that ship for diffusers families (``plans/``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn


@dataclass(frozen=True)
class Split:
    """A token sequence in one tensor: which named sequence it is and which dim holds the tokens.

    Args:
        sequence: name of the token sequence, e.g. ``"image"`` or ``"text"``. Tensors that carry the same
            sequence (hidden states and their rotary angles) are cut the same way.
        dim: the tensor dim that holds the tokens (negative values count from the end).
    """

    sequence: str = "image"
    dim: int = 1


#: A tensor's split, or a tuple's element-wise splits (``None`` leaves an element alone).
SplitSpec = Split | tuple[Split | None, ...]


@dataclass(frozen=True)
class DiTPlan:
    """How a DiT class is parallelized. Module paths are relative to the DiT; patterns use ``fnmatch``.

    Args:
        split_inputs: forward arguments of the DiT that carry a token sequence, cut across sequence-parallel
            ranks before the forward runs, e.g. ``{"hidden_states": Split("image", 1)}``. A tuple argument (e.g.
            rotary ``(cos, sin)``) is cut element-wise with a tuple of splits (``None`` leaves an element alone).
        split_module_inputs: forward arguments of submodules, cut before the submodule runs, by module path,
            e.g. ``{"blocks.0": {"hidden_states": Split("video", 1)}}``, for a sequence that only exists as one
            tensor between modules (after a reshape or slice inside the DiT's forward). Tuples as in
            ``split_inputs``. The submodule must run once per forward.
        split_outputs: submodules whose output carries a token sequence, cut right after they run, e.g.
            ``{"pos_embed": Split("image", 1)}``. A tuple output is cut element-wise with a tuple of splits
            (``None`` leaves an element alone).
        gather_outputs: submodules whose output is gathered back into the whole sequence (padding removed),
            e.g. ``{"proj_out": Split("image", 1)}``; typically the last layer before unpatchify.
        blocks: paths of the ``nn.ModuleList``s holding the transformer blocks, in execution order
            (pipeline stages and FSDP units are cut from these).
        self_attention: patterns of attention modules whose ``F.scaled_dot_product_attention`` call attends
            over the sharded sequence, mapped to the order of the named sequences inside that call, e.g.
            ``{"transformer_blocks.*.attn1": ("image",)}`` or, for joint attention over text and image
            tokens concatenated text first, ``{"transformer_blocks.*.attn": ("text", "image")}``.
        cross_attention: patterns of attention modules whose keys and values are replicated context (text);
            their queries stay sharded and they need no communication. Listed so the plan is complete; sequence
            parallelism checks that every pattern matches a module and none is also self-attention.
        shared_modules: submodules inside blocks that the DiT also calls outside its block loop, e.g. DiT's
            final layer reuses ``transformer_blocks.0.norm1.emb``; a pipeline stage that does not own the
            block keeps these (and only these) parts of it.
    """

    split_inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    split_module_inputs: Mapping[str, Mapping[str, SplitSpec]] = field(default_factory=dict)
    split_outputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    gather_outputs: Mapping[str, Split] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()
    self_attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cross_attention: tuple[str, ...] = ()
    shared_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("split_inputs", "split_outputs", "gather_outputs", "self_attention"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        module_inputs = {path: MappingProxyType(dict(args)) for path, args in self.split_module_inputs.items()}
        object.__setattr__(self, "split_module_inputs", MappingProxyType(module_inputs))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "cross_attention", tuple(self.cross_attention))
        object.__setattr__(self, "shared_modules", tuple(self.shared_modules))
        if "" in self.split_module_inputs:
            raise ValueError(
                "split_module_inputs names submodules; put the DiT's own forward arguments in split_inputs."
            )
        if not self.split_inputs and not self.split_outputs and not self.split_module_inputs:
            raise ValueError(
                "A DiTPlan needs at least one split point (split_inputs, split_module_inputs or split_outputs)."
            )
        if not self.gather_outputs:
            raise ValueError("A DiTPlan needs at least one gather point (gather_outputs).")
        if not self.self_attention:
            raise ValueError("A DiTPlan needs at least one self_attention pattern.")
        split_sequences = {s.sequence for s in self._all_splits()}
        for pattern, order in self.self_attention.items():
            if not order or set(order) - split_sequences:
                raise ValueError(
                    f"self_attention[{pattern!r}] = {order} must name sequences that are split; split sequences:"
                    f" {sorted(split_sequences)}."
                )

    @property
    def sequences(self) -> tuple[str, ...]:
        """Names of all token sequences the plan splits, in first-seen order."""
        seen: dict[str, None] = {}
        for split in self._all_splits():
            seen.setdefault(split.sequence)
        return tuple(seen)

    def _all_splits(self) -> Iterator[Split]:
        module_inputs = [spec for args in self.split_module_inputs.values() for spec in args.values()]
        return _iter_splits(self.split_inputs.values(), module_inputs, self.split_outputs.values())

    def self_attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[str, ...]]]:
        """Yield ``(path, module, sequence order)`` for every submodule matching a self-attention pattern."""
        for path, module in model.named_modules():
            for pattern, order in self.self_attention.items():
                if fnmatch.fnmatchcase(path, pattern):
                    yield path, module, order
                    break

    def cross_attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(path, module)`` for every submodule matching a cross-attention pattern."""
        for path, module in model.named_modules():
            if any(fnmatch.fnmatchcase(path, p) for p in self.cross_attention):
                yield path, module

    def block_lists(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """The block ``ModuleList``s named by the plan, checked to exist."""
        lists = []
        for path in self.blocks:
            module = model.get_submodule(path)
            if not isinstance(module, nn.ModuleList):
                raise TypeError(f"Plan block path {path!r} is a {type(module).__name__}, not an nn.ModuleList.")
            lists.append((path, module))
        return lists


def _iter_splits(*groups) -> Iterator[Split]:
    for group in groups:
        for item in group:
            if isinstance(item, Split):
                yield item
            elif item is not None:
                yield from (s for s in item if s is not None)


def is_within(path: str, outer: str) -> bool:
    """Whether the module at ``path`` is the one at ``outer`` or inside it (``""``, the root, contains every path)."""
    return outer == "" or path == outer or path.startswith(outer + ".")
