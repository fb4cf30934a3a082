"""Regional compilation: ``torch.compile`` on each transformer block of a parallelized DiT.

``block.compile()`` (``nn.Module.compile``) compiles the block's ``_call_impl`` in place: its forward and the hooks the
parallelizers installed on it and on its submodules (the attention routes of ``utils/attention_route.py``, the
sequence cuts). Blocks of one list share their code, so the first block's compiled graphs serve the others (guards
on the module), which keeps compile time near that of one block instead of the whole model. Collectives inside the
attention kernels are graph breaks: they run eagerly between compiled regions, so the result stays exact.

``torch.compile(transformer)`` on the whole parallelized model works as well (tests/test_attention_compile.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from torch import nn

from lightning_dit_parallel.plan import DiTPlan

#: ``False``: no compilation; ``True``: ``torch.compile`` with its default backend (inductor); a string: that backend
#: (e.g. ``"aot_eager"``).
CompileOption = Union[bool, Literal["inductor", "aot_eager", "eager", "cudagraphs"], str]


def check_compile_option(option: CompileOption) -> None:
    """Raise a ValueError for anything but a bool or a non-empty backend name (before any collective)."""
    if isinstance(option, bool) or (isinstance(option, str) and option):
        return
    raise ValueError(f"compile must be False, True or a torch.compile backend name, got {option!r}.")


@dataclass
class RegionalCompile:
    """The blocks compiled by ``apply_regional_compile``; ``remove()`` puts their eager forward back."""

    blocks: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; the module then runs eagerly again
        self.blocks.clear()


def apply_regional_compile(dits: list[tuple[nn.Module, DiTPlan]], option: CompileOption) -> RegionalCompile:
    """``block.compile(backend=...)`` on every block of every plan block list (the plan's ``block_lists``).

    Raises:
        ValueError: when a DiT's plan declares no block list (nothing to compile regionally; compile the whole model
            with ``torch.compile(transformer)`` instead).
    """
    check_compile_option(option)
    result = RegionalCompile()
    if option is False:
        return result
    kwargs = {} if option is True else {"backend": option}
    for dit, plan in dits:
        lists = list(plan.block_lists(dit))
        if not lists:
            raise ValueError(
                f"compile=True compiles each transformer block, but the plan of {type(dit).__name__} declares no block"
                " list; use torch.compile(model) on the whole model instead."
            )
        for _, blocks in lists:
            for block in blocks:
                if getattr(block, "runs_on_this_rank", True):
                    block.compile(**kwargs)
                    result.blocks.append(block)
    return result
