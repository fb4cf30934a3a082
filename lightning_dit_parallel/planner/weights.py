"""Parameter counts from a component's weight files, reading headers only (never the weights).

A ``*.safetensors`` file starts with an 8-byte little-endian header length and a JSON header that gives every
tensor's dtype, shape and byte range; a ``*.safetensors.index.json`` maps tensor names to shard files and gives the
bytes of all shards (``metadata.total_size``). So a folder of weights is counted exactly, tensor by tensor, by
reading a few kilobytes per file.

``component_weights(folder)`` picks one set of weights per folder: the shards of an index (the one without a variant
such as ``.fp16`` first) when all of them are present, else one unsharded file (again the variant-less one first);
an index whose shards are absent still gives its byte total (``WeightFiles.tensors`` is then ``None``).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from lightning_dit_parallel.planner.spec import Unit

#: A header longer than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of the dtypes a config's ``torch_dtype`` names (the stored dtype of an index-only count).
STORED_DTYPE_BYTES = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

_LAYER = re.compile(r"^(.*?\.\d+)\.")
#: tensor names of embedding tables (T5's ``shared``, ``embed_tokens``, ``word_embeddings``, GPT's ``wte``/``wpe``)
_EMBEDDING = re.compile(r"(embed|shared\.|\bwte\b|\bwpe\b)")
#: tensor names of token tables, which a sharded encoder splits by rows (``fsdp/vocab_rows.py``)
_TOKEN_TABLE = re.compile(r"(^|\.)(shared|embed_tokens|token_embedding|word_embeddings|wte)\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class WeightFiles:
    """The weights of one component as their files describe them.

    Args:
        files: the files read (safetensors shards, or the index alone when its shards are absent).
        nbytes: bytes of all tensors as stored.
        tensors: every tensor (from the headers); ``None`` when only an index's ``total_size`` is known.
        names: tensor names (from the headers, or the index's ``weight_map``).
    """

    files: tuple[Path, ...]
    nbytes: int
    tensors: tuple[TensorInfo, ...] | None
    names: tuple[str, ...] = ()

    @property
    def numel(self) -> int | None:
        """Elements of all tensors (``None`` without headers)."""
        return None if self.tensors is None else sum(t.numel for t in self.tensors)

    def describe(self) -> str:
        if self.tensors is None:
            return f"the total_size of {self.files[0].name}"
        return f"{len(self.files)} safetensors header{'s' if len(self.files) > 1 else ''}"


def read_safetensors_header(path: str | Path) -> list[TensorInfo]:
    """Every tensor of a safetensors file, from its header (the weights are not read).

    Raises:
        ValueError: when the file does not start with a safetensors header.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is too short to be a safetensors file.")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} does not start with a safetensors header (header length {length}).")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} does not start with a safetensors header ({exc}).") from None
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensors.append(TensorInfo(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), int(end - begin)))
    return tensors


def _variant_rank(path: Path) -> tuple[int, str]:
    """Variant-less names first: ``model.safetensors`` before ``model.fp16.safetensors``."""
    stem = path.name.removesuffix(".index.json").removesuffix(".safetensors")
    stem = re.sub(r"-\d+-of-\d+$", "", stem)
    return (stem.count("."), path.name)


def component_weights(folder: str | Path) -> WeightFiles | None:
    """The weights of a component folder (see the module docstring); ``None`` when it has none.

    Raises:
        ValueError: when a safetensors file or an index cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    indexes = sorted(folder.glob("*.safetensors.index.json"), key=_variant_rank)
    for index in indexes:
        data = json.loads(index.read_text())
        weight_map = data.get("weight_map") or {}
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        if shards and all(s.is_file() for s in shards):
            return _from_files(shards)
    if indexes:
        data = json.loads(indexes[0].read_text())
        total = (data.get("metadata") or {}).get("total_size")
        if isinstance(total, (int, float)) and total > 0:
            return WeightFiles((indexes[0],), int(total), None, tuple(sorted((data.get("weight_map") or {}))))
    files = sorted(folder.glob("*.safetensors"), key=_variant_rank)
    return _from_files(files[:1]) if files else None


def _from_files(files: list[Path]) -> WeightFiles:
    tensors = [t for f in files for t in read_safetensors_header(f)]
    return WeightFiles(tuple(files), sum(t.nbytes for t in tensors), tuple(tensors), tuple(t.name for t in tensors))


def layer_key(name: str) -> str | None:
    """The layer a tensor belongs to: its name up to the first numbered part (``encoder.block.3`` of
    ``encoder.block.3.layer.0.SelfAttention.q.weight``), the element of the outermost ``nn.ModuleList``; ``None``
    for tensors outside the layers (embeddings, final norms, projections)."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def units_from_tensors(
    tensors: tuple[TensorInfo, ...] | list[TensorInfo], split_names: set[str] | None = None
) -> tuple[Unit, ...]:
    """FSDP units as ``fsdp.module_units`` cuts a module, from tensor names: the root (every tensor outside the
    layers), then one unit per layer, in order of first appearance. ``split_names``: the parameter names of the token
    table a sharded encoder splits by rows (``fsdp.vocab_tables`` of the module built from its config); ``None``:
    tables recognized by their names."""
    root: list[TensorInfo] = []
    layers: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        key = layer_key(t.name)
        (root if key is None else layers.setdefault(key, [])).append(t)

    def unit(kind: str, index: int, infos: list[TensorInfo]) -> Unit:
        # rows streaming computes Linears; an embedding table (by its name) or a kernel of 3+ dims is gathered whole,
        # but the token table, split by rows
        whole = tuple(len(t.shape) >= 3 or bool(_EMBEDDING.search(t.name)) for t in infos)
        split = tuple(_is_split(t.name, split_names) for t in infos)
        return Unit(kind, index, tuple(t.shape for t in infos), whole=whole, split=split)

    units = [unit("block", i, infos) for i, infos in enumerate(layers.values())]
    return (unit("root", -1, root), *units)


def _is_split(name: str, split_names: set[str] | None) -> bool:
    if split_names is None:
        return bool(_TOKEN_TABLE.search(name))
    return any(name == n or name.endswith("." + n) or n.endswith("." + name) for n in split_names)


def units_from_names(names: tuple[str, ...] | list[str], numel: int) -> tuple[Unit, ...]:
    """Units for a count known only as a total (an index without its shards): ``numel`` shared among the root and
    the layers in proportion to their tensor names (an approximation; every unit a flat parameter)."""
    counts: dict[str | None, int] = {}
    for name in names:
        key = layer_key(name)
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    if not total:
        return (Unit("root", -1, ((numel,),)),)
    shares = {k: numel * c // total for k, c in counts.items()}
    shares[next(iter(shares))] += numel - sum(shares.values())
    root = shares.pop(None, 0)
    units = [Unit("block", i, ((n,),)) for i, n in enumerate(shares.values())]
    return (Unit("root", -1, ((root,),) if root else ()), *units)


def stored_element(config: dict) -> int:
    """Bytes per stored element for a count from ``total_size``: the config's ``torch_dtype``, else 2 (weights are
    mostly distributed in bfloat16 or float16)."""
    return STORED_DTYPE_BYTES.get(str(config.get("torch_dtype", "")).removeprefix("torch."), 2)
