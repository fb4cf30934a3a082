"""A sharded encoder's token table split by vocabulary rows and never gathered.

A text encoder's token table is its largest single tensor (UMT5-XXL: 256k x 4096, 2.1 GB in bfloat16; Llama 3 8B:
1 GB), and T5's is tied (``shared`` and ``encoder.embed_tokens``: one parameter in two modules), so FSDP keeps it in
the encoder's root unit and gathers it whole for every encode (twice its size while it is copied out). Here each rank
of the encoders' group keeps rows ``[r * R, (r + 1) * R)`` of the table instead (``parallel/rows.py``: a DTensor
``Shard(0)`` that lean loading reads alone; FSDP leaves the parameter alone) and a lookup never gathers it:

1. the ranks all-gather their token ids (padded to the longest rank's count: the ranks of the group may encode
   different prompts, ``encoder_rows.py``, and data-parallel ranks different batches);
2. each rank looks up every rank's tokens that fall in its rows, zeros for the others;
3. a reduce-scatter sums those partial embeddings and gives each rank its own tokens'.

Exact: every token's row comes from one rank, the others add zeros. Memory: ``1 / N`` of the table, and while a lookup
runs ``N`` times the rank's embedded tokens; bytes: the ids, and ``(N - 1) / N`` of ``N`` times the embedded tokens.

Which tables: the encoder's input embeddings (``get_input_embeddings()``, an ``nn.Embedding`` without ``max_norm``)
with at least ``N`` rows, and every other ``nn.Embedding`` of the encoder holding the same parameter; no other module
may hold it. The lookup replaces ``nn.Embedding.forward`` for those modules (their class is swapped for a subclass;
``remove`` swaps it back), so a subclass whose own forward reaches the table through ``super().forward`` and reads
nothing of the weight but its dtype or device (Gemma's scaled embedding) is split too; any other subclass stays with
FSDP.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_dit_parallel.parallel.incomplete import mark_incomplete, meta_like
from lightning_dit_parallel.parallel.rows import is_lean, own_rows, row_range
from lightning_dit_parallel.utils.collectives import all_gather_single, reduce_scatter_single


def vocab_tables(encoder: nn.Module, ranks: int) -> list[nn.Embedding]:
    """The modules whose table ``apply_vocab_rows`` splits: the input embeddings and their tied twins, or none."""
    get = getattr(encoder, "get_input_embeddings", None)
    try:
        table = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        table = None
    if not _splittable(table) or table.num_embeddings < ranks or isinstance(table.weight, DTensor):
        return []
    holders = [m for m in encoder.modules() if any(p is table.weight for p in m.parameters(recurse=False))]
    if not all(_splittable(m) for m in holders):
        return []  # a Linear tied to it (an output head) or a subclass reads the table otherwise
    return holders


def _splittable(module: object) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` whose table only ``nn.Embedding.forward`` reads."""
    return (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and "forward" not in module.__dict__
        and _looks_up_through_embedding(type(module))
    )


#: ``self.weight`` read for anything but its dtype or device
_READS_WEIGHT = re.compile(r"self\.weight(?!\.(dtype|device)\b)")


def _looks_up_through_embedding(cls: type) -> bool:
    """``nn.Embedding`` itself, or a subclass whose forwards reach the table only through ``super().forward``."""
    for klass in cls.__mro__:
        if klass is nn.Embedding:
            return True
        if "forward" not in vars(klass):
            continue
        try:
            source = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            return False
        if "super().forward(" not in source or _READS_WEIGHT.search(source):
            return False
    return False


@dataclass
class VocabRows:
    """One encoder's token table split by rows over ``mesh`` (see the module docstring); ``remove()`` undoes it.

    Attributes:
        encoder: the encoder.
        modules: the ``nn.Embedding`` modules holding the table.
        mesh: the encoders' 1-D mesh.
    """

    encoder: nn.Module
    modules: list[nn.Embedding]
    mesh: DeviceMesh
    _requires_grad: bool = field(default=False)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    def install(self) -> VocabRows:
        weight = self.modules[0].weight
        self._requires_grad = weight.requires_grad
        self._put(own_rows(weight, self.mesh, self._requires_grad))
        for module in self.modules:
            module.__dict__[_OWNER] = (self, type(module))
            module.__class__ = _split_class(type(module))
        return self

    def remove(self) -> None:
        """The whole table back (an all-gather over the mesh, onto the host; every rank calls it), or, for a
        lean-loaded encoder, a meta tensor of its shape, read again from the files by the next setup."""
        self._restore_classes()
        weight = self.modules[0].weight
        if not isinstance(weight, DTensor):
            return
        if is_lean(self.encoder):
            self._put(meta_like(weight))
            return
        try:
            # (ceil(n / N), d) per rank -> all-gather -> (n, d), one table on the host
            whole = weight.full_tensor().detach().cpu()
        except BaseException:
            self.discard()
            raise
        self._put(nn.Parameter(whole, requires_grad=self._requires_grad))

    def discard(self) -> None:
        """Undo without a collective (after a failed predict): the table becomes a meta tensor and the encoder is
        marked incomplete (unless lean-loaded: read again at the next setup)."""
        self._restore_classes()
        weight = self.modules[0].weight
        if isinstance(weight, DTensor):
            self._put(meta_like(weight))
            if not is_lean(self.encoder):
                reason = "its token table was split over the ranks and a failure left no collective to gather it."
                mark_incomplete(self.encoder, reason)

    def _put(self, param: nn.Parameter) -> None:
        for module in self.modules:
            module._parameters["weight"] = param

    def _restore_classes(self) -> None:
        for module in self.modules:
            owner = module.__dict__.pop(_OWNER, None)
            if owner is not None:
                module.__class__ = owner[1]

    @torch.no_grad()
    def _lookup(self, module: nn.Embedding, ids: Tensor) -> Tensor:
        """``module(ids)`` from every rank's rows: (...) token ids -> (..., dim), exact (see the module docstring)."""
        n = self.mesh.size()
        local = module.weight.to_local()  # (R, dim): this rank's rows
        start, stop = row_range(module.num_embeddings, self.mesh)
        flat = ids.reshape(-1)
        count = torch.tensor([flat.numel()], device=flat.device)
        counts = torch.empty(n, dtype=count.dtype, device=flat.device)
        all_gather_single(counts, count, group=self.group)  # (1,) per rank -> (N,)
        most = int(counts.max())
        padded = flat.new_zeros(most)
        padded[: flat.numel()] = flat
        every = flat.new_empty(n * most)
        all_gather_single(every, padded, group=self.group)  # (most,) per rank -> (N * most,)
        mine = (every >= start) & (every < stop)
        partial = local.new_zeros((n * most, local.shape[1]))  # (N * most, dim): this rank's rows of every token
        if stop > start:
            partial[mine] = F.embedding(every[mine] - start, local)
        out = local.new_empty((most, local.shape[1]))
        # (N * most, dim) partial sums on every rank -> reduce-scatter -> (most, dim): this rank's tokens, summed
        reduce_scatter_single(out, partial, group=self.group)
        return out[: flat.numel()].reshape(*ids.shape, local.shape[1])


#: the instance attribute of a split table's module: ``(its VocabRows, its own class)``
_OWNER = "_ldp_vocab_rows"


class _SplitTable(nn.Embedding):
    """``nn.Embedding`` whose lookup is its ``VocabRows``' (the class a split plain table gets, a base of a split
    subclass's)."""

    def forward(self, input: Tensor) -> Tensor:
        return self.__dict__[_OWNER][0]._lookup(self, input)


_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    """The class a split table's module gets: ``_SplitTable`` for ``nn.Embedding``; for a subclass, the subclass with
    ``_SplitTable`` right above ``nn.Embedding``, so its own forward (Gemma's scaling) runs and its ``super().forward``
    is the lookup."""
    if cls is nn.Embedding:
        return _SplitTable
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Split{cls.__name__}", (cls, _SplitTable), {})
    return _CLASSES[cls]


def apply_vocab_rows(encoder: nn.Module, modules: list[nn.Embedding], mesh: DeviceMesh) -> VocabRows:
    """Split the table ``modules`` hold (``vocab_tables``) over the 1-D ``mesh``; ``remove()`` undoes it. Local work
    only; every rank of ``mesh`` must then call the encoder together (as FSDP does)."""
    return VocabRows(encoder, modules, mesh).install()
