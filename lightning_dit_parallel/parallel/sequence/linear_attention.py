"""Exact sequence parallelism for linear attention: key-value statistics are summed over every rank; tokens stay put.

Linear attention gives query token ``i`` the output ``(sum_j v_j phi(k_j)^T) phi(q_i) / (sum_j phi(k_j))^T phi(q_i)``:
the whole sequence enters only through sums over key tokens, ``S = sum_j phi(k_j) v_j^T`` (H x D x D per sample) and
``z = sum_j phi(k_j)`` (H x D). With the sequence cut over ranks, each rank computes these sums over its own tokens
and one all-reduce over the sequence-parallel group (the Ulysses group, then the ring group) completes them; no token
moves. That is ``B * H * D * (D + 1)`` values per layer, whatever the number of tokens.

``TokenSums`` finds those sums while a linear-attention module runs: every ``torch.matmul`` (also ``Tensor.matmul``
and ``@``, ``torch.bmm``) that contracts a dim of the local token length, and every ``sum`` over such a dim, is a
sum over key tokens (in self-attention nothing else contracts over tokens: outputs keep their query tokens).
Padded tokens (``sharding.py`` pads uneven sequences) are zeroed in the operand first, since ``phi(0)`` need not be
zero (a bias or a norm comes before ``phi``); then the local sum is computed and all-reduced. Any other call runs
unchanged. When a contracted dim and another dim of the call both have the local token length the shapes cannot
tell which dim is the tokens, and ``TokenSums`` raises rather than guess (the same on every rank, so none waits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState

#: Calls that contract the last dim of the first operand with the second-to-last of the second.
MATMULS = frozenset({torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm})
#: Calls that sum over dims.
SUMS = frozenset({torch.sum, torch.Tensor.sum})


def all_reduce_sum(x: Tensor, groups: SequenceGroups) -> Tensor:
    """Sum ``x`` over every sequence-parallel rank: over the Ulysses group, then over the ring group (shape kept)."""
    x = x.contiguous()
    for group in (groups.ulysses, groups.ring):
        if group is not None:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)  # (...) partial sums -> (...) sums over the group
    return x


def zero_padded(x: Tensor, dim: int, valid: Tensor | None) -> Tensor:
    """``x`` with the padded tokens along ``dim`` set to zero; ``valid``: (tokens,) bool, ``None`` when none is padded.

    ``torch.where`` rather than a product, so that a non-finite value in a padded token cannot leak in.
    """
    if valid is None:
        return x
    shape = [1] * x.dim()
    shape[dim] = valid.numel()
    return torch.where(valid.view(shape), x, x.new_zeros(()))  # (..., T, ...) with padded tokens zeroed


class TokenSums(TorchFunctionMode):
    """While active, sums over the token dim (matmul contractions and ``sum``) are summed over every rank.

    Args:
        tokens: this rank's token count in the module (padding included), the length of the token dim.
        valid: (tokens,) bool, which of them are real; ``None`` when none is padded.
        groups: the sequence-parallel groups the sums run over.
        where: the module's path, for error messages.

    After the module ran, ``reductions`` counts the sums completed and ``reduced_bytes`` what they all-reduced.
    """

    def __init__(self, tokens: int, valid: Tensor | None, groups: SequenceGroups, where: str) -> None:
        super().__init__()
        self.tokens = tokens
        self.valid = valid
        self.groups = groups
        self.where = where
        self.reductions = 0
        self.reduced_bytes = 0

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in MATMULS:
            return self._matmul(func, args, kwargs)
        if func in SUMS:
            return self._sum(func, args, kwargs)
        return func(*args, **kwargs)

    def _matmul(self, func, args: tuple, kwargs: dict) -> Any:
        a, b = args[0], args[1]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.dim() < 2 or b.dim() < 2:
            if any(isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == self.tokens for t in (a, b)):
                raise NotImplementedError(f"{self.where}: a 1-D matmul over {self.tokens} tokens is not supported.")
            return func(*args, **kwargs)
        if a.shape[-1] != self.tokens:
            return func(*args, **kwargs)  # contracts a feature dim: local
        if a.shape[-2] == self.tokens or b.shape[-1] == self.tokens:
            self._ambiguous(f"matmul of {tuple(a.shape)} and {tuple(b.shape)}")
        self._refuse_out(kwargs)
        # (..., X, T) @ (..., T, Y) -> (..., X, Y): the sum over this rank's real tokens, then over all ranks
        return self._complete(func(zero_padded(a, a.dim() - 1, self.valid), b, *args[2:], **kwargs))

    def _sum(self, func, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(x, Tensor) or x.dim() == 0:
            return func(*args, **kwargs)
        summed = range(x.dim()) if dim is None else [d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)]
        token_dims = [d for d in summed if x.shape[d] == self.tokens]
        if not token_dims:
            return func(*args, **kwargs)  # sums over feature dims: local
        if len(token_dims) > 1:
            self._ambiguous(f"sum of {tuple(x.shape)} over dims {list(summed)}")
        self._refuse_out(kwargs)
        # (..., T, ...) -> (..., [1,] ...): the sum over this rank's real tokens, then over all ranks
        return self._complete(func(zero_padded(x, token_dims[0], self.valid), *args[1:], **kwargs))

    def _complete(self, partial: Tensor) -> Tensor:
        self.reductions += 1
        self.reduced_bytes += partial.numel() * partial.element_size()
        return all_reduce_sum(partial, self.groups)

    def _refuse_out(self, kwargs: dict) -> None:
        if kwargs.get("out") is not None:
            raise NotImplementedError(f"{self.where}: a sum over tokens into out= is not supported.")

    def _ambiguous(self, call: str) -> None:
        raise NotImplementedError(
            f"{self.where}: linear attention over {self.tokens} local tokens: the {call} has more than one dim of that"
            " length, so the token dim is ambiguous. Use a sequence length (or degree) that gives another local token"
            " count."
        )


def install_linear_attention(
    module: nn.Module,
    path: str,
    order: tuple[str, ...],
    groups: SequenceGroups,
    require_state: Callable[[str], ShardingState],
) -> list[RemovableHandle]:
    """Hooks that make ``module``'s sums over tokens run over the whole sequence during its forward.

    ``order``: the sequences concatenated in the module's token dim. Returns the hook handles (remove all to undo).

    Raises (during the forward, on every rank alike):
        ValueError: when the local token count equals the module's head dim (the token dim would be ambiguous).
        RuntimeError: when the forward made no sum over tokens (it attended to local tokens only).
    """
    active: list[TokenSums] = []  # the mode of the forward in progress
    finished: list[TokenSums] = []  # the mode of the forward that just ended, for ``check``

    def enter(module: nn.Module, args: tuple) -> None:
        state = require_state(path)
        tokens = state.local_length(order)
        head_dim = _head_dim(module)
        if head_dim == tokens:
            raise ValueError(
                f"{path}: linear attention with head dim {head_dim} over {tokens} local tokens: the token dim cannot be"
                " told from the head dim. Use a sequence length (or degree) that gives another local token count."
            )
        valid = state.key_valid(order, [groups.rank], _device(module))  # (tokens,) bool or None
        mode = TokenSums(tokens, valid, groups, path)
        mode.__enter__()
        active.append(mode)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        if active:  # empty when ``enter`` raised
            mode = active.pop()
            mode.__exit__(None, None, None)
            finished[:] = [mode]

    def check(module: nn.Module, args: tuple, output: object) -> object:
        mode = finished.pop()
        if mode.reductions == 0:
            raise RuntimeError(
                f"{path} is declared as linear attention over the sharded sequence, but it made no sum over its"
                f" {mode.tokens} local tokens that sequence parallelism recognizes (torch.matmul, Tensor.matmul, @,"
                " torch.bmm, sum), so it attended to local tokens only. Fix the plan or the attention processor."
            )
        return output

    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
        module.register_forward_hook(check),
    ]


def _head_dim(module: nn.Module) -> int | None:
    """diffusers-style ``inner_dim // heads``, or ``None`` when the module does not say."""
    heads, inner = getattr(module, "heads", None), getattr(module, "inner_dim", None)
    return inner // heads if isinstance(heads, int) and isinstance(inner, int) and heads else None


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
