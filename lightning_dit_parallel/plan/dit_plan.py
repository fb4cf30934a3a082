"""Plans: the data that says how one DiT class is parallelized.

A plan is the only model-specific thing in the package. It names module paths and forward arguments;
it contains no code. Plans are found by class in ``registry.py``: a ``dit_plan`` class attribute, a call to
``register_plan(cls, plan)``, or one of the plans that ship for diffusers families (``families/``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Split:
    """A token sequence in one tensor: which named sequence it is and which dim holds the tokens.

    Args:
        sequence: name of the token sequence, e.g. ``"image"`` or ``"text"``. Tensors that carry the same
            sequence (hidden states and their rotary angles) are cut the same way.
        dim: the tensor dim that holds the tokens (negative values count from the end).
        ndim: when set, only a tensor with this many dims carries the sequence; one with another number of dims is
            left whole. For values that come per token or per sample, e.g. a ``(B, S)`` per-token timestep
            (cut) where most pipelines pass a ``(B,)`` one (left alone).
        folded: the dim holds the sequence once per group, ``G * S`` entries with the tokens inner (a per-token copy
            of per-sample values made by ``repeat_interleave(S, dim=0)``, e.g. the timestep embedding that Latte gives
            its temporal blocks as ``(B * S, C)``, one row per spatial position). Each group is cut like the
            sequence: ``(G * S, ...) -> (G * ceil(S/N), ...)``. The sequence must have been cut earlier in the same
            forward (its length gives ``G``); a folded split cannot be gathered.
    """

    sequence: str = "image"
    dim: int = 1
    ndim: int | None = None
    folded: bool = False

    def __post_init__(self) -> None:
        if self.ndim is not None and not -self.ndim <= self.dim < self.ndim:
            raise ValueError(
                f"Split({self.sequence!r}, dim={self.dim}, ndim={self.ndim}): a tensor of {self.ndim} dims has no dim"
                f" {self.dim}."
            )


@dataclass(frozen=True)
class Concat:
    """Several token sequences one after another along one dim of a tensor, e.g. a mask over ``[text, image]``
    tokens or position ids of ``[image, text]``, that a DiT receives or builds as one tensor.

    Every named part is a whole sequence, cut like that sequence; the parts' shards are concatenated in the same
    order: (..., T + S, ...) -> (..., T/N + S/N, ...). The parts' lengths are those of the sequences, so each named
    sequence must have been cut earlier in the same forward (earlier in ``split_inputs``, or at a module that ran
    before).

    Args:
        sequences: the parts in the order the tensor holds them. At most one part may be ``None``: tokens left as
            they are (e.g. the part of a stream the forward built from tensors that were cut already); it is what
            remains of the dim.
        dim: the tensor dim that holds the tokens (negative values count from the end).
    """

    sequences: tuple[str | None, ...]
    dim: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", tuple(self.sequences))
        names = [s for s in self.sequences if s is not None]
        if not names or len(self.sequences) - len(names) > 1:
            raise ValueError(
                f"Concat{self.sequences} needs at least one sequence name and at most one None (tokens left alone)."
            )

    @property
    def splits(self) -> tuple[Split, ...]:
        """The named parts as ``Split``s along ``dim``."""
        return tuple(Split(s, self.dim) for s in self.sequences if s is not None)


@dataclass(frozen=True)
class TokenGrid:
    """A module that runs on a sharded token sequence laid out as a grid and mixes neighbouring tokens, e.g. the
    convolutional feed-forward of Sana (3x3 over ``(height, width)``) or Sana-Video (also 3 over frames).

    The module's caller (its parent module) reshapes the tokens with grid sizes it receives as arguments. Under
    sequence parallelism the caller receives ``(1, ..., 1, local tokens)`` instead, so its reshape gives this rank's
    tokens as a strip; the module then runs on a window of whole outermost slices (its tokens plus ``halo`` slices on
    each side, fetched point-to-point from the ranks holding them) and keeps the outputs of its own tokens. Exact
    when every output depends only on inputs within ``halo`` outermost slices and the module keeps the grid shape.

    Args:
        sequence: the sharded sequence the grid holds, e.g. ``"image"``.
        sizes: arguments of the caller that give the grid sizes, outermost first, e.g. ``("height", "width")``; the
            caller uses them only to lay out these tokens.
        dim: the first grid dim of the module's input (its first argument) and output; the grid dims follow it.
        halo: how many outermost slices on each side an output depends on (1 for a 3x3 convolution).
    """

    sequence: str = "image"
    sizes: tuple[str, ...] = ("height", "width")
    dim: int = 1
    halo: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.sizes or self.halo < 0:
            raise ValueError(f"TokenGrid needs at least one size argument and halo >= 0; got {self}.")


@dataclass(frozen=True)
class PrefixCount:
    """An integer argument that counts the leading tokens of a sequence, e.g. HunyuanVideo's first-frame token count
    (its I2V blocks modulate ``x[:, :n]`` and ``x[:, n:]`` differently). A rank's (or patch's) tokens are a run of
    the sequence, so the counted tokens it holds are the leading ones of its part: the count is cut to their number,
    ``n -> min(max(n - start, 0), local)``. The sequence must have been cut earlier in the same forward.

    Args:
        sequence: the sequence whose leading tokens the argument counts, e.g. ``"video"``.
    """

    sequence: str = "image"


@dataclass(frozen=True)
class Each:
    """A list or tuple of any length whose tensors all carry one sequence, each cut with ``split`` (``None`` entries
    are left alone): e.g. ControlNet residuals, one ``(B, S, D)`` tensor per controlled block, which the DiT adds to
    its hidden states ``[B, S, D]`` inside the block loop.

    Args:
        split: the split of every element.
    """

    split: Split

    def __post_init__(self) -> None:
        if not isinstance(self.split, Split):
            raise TypeError(f"Each(split) needs a Split; got {self.split!r}.")


@dataclass(frozen=True)
class HeadProjections:
    """An attention module whose processor needs the whole sequence at once: it slices queries and keys by global
    token positions or builds a mask over them (e.g. Qwen-Image 2.1's block-causal prefill, one attention call per
    prefix segment). Under Ulysses the all-to-all is made at its projections instead of around
    ``F.scaled_dot_product_attention``: the outputs of the query, key and value projections go from all heads of this
    rank's tokens to this rank's heads of every token, (B, S/U, H*D) -> (B, S, H/U*D), the processor runs unchanged
    on the whole sequence (any mask, slice or KV cache is then exact), and the input of the output projection goes
    back, (B, S, H/U*D) -> (B, S/U, H*D). Ring attention never holds the whole sequence: a plan with these modules
    needs ``ring_degree=1`` (sequence/head_parallel.py).

    Args:
        sequence: the sharded sequence the module's token dim (dim 1) holds.
        inputs: the query, key and value projections (paths inside the module), each called once per forward on
            the module's tokens with heads laid out ``(H, D)`` in the last dim.
        output: the output projection (a path inside the module), called once on the attention's (B, S, H*D).
    """

    sequence: str = "image"
    inputs: tuple[str, ...] = ("to_q", "to_k", "to_v")
    output: str = "to_out.0"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs or not self.output:
            raise ValueError(f"HeadProjections needs input projections and an output projection; got {self}.")


#: A tensor's split (one sequence, or a ``Concat`` of several), a count of leading tokens (``PrefixCount``), a
#: list of any length split alike (``Each``), or a tuple's element-wise splits (``None`` leaves an element alone).
SplitSpec = Split | Concat | PrefixCount | Each | tuple[Split | Concat | PrefixCount | None, ...]

#: How tensor parallelism shards one module inside a block (``DiTPlan.tensor_parallel``):
#:
#: * ``"colwise"``: an ``nn.Linear`` whose output features are split over the tp ranks (an attention projection:
#:   each rank computes its own heads); its output stays split.
#: * ``"rowwise"``: an ``nn.Linear`` whose input features arrive split (the attention output projection, the MLP's
#:   down projection); the partial outputs are all-reduced, so every rank holds the whole output.
#: * ``"colwise_gather"``: output features split, then all-gathered (an ``nn.Linear``, or an ``nn.Embedding`` split
#:   over its embedding dim): for per-sample modulation (adaLN) linears whose output the block indexes over the
#:   whole hidden size; (B, k * hidden) moves, not (B, tokens, hidden).
#: * ``"sharded_norm"``: a normalisation over the whole split feature dim (a q/k ``RMSNorm`` across heads, as in
#:   Wan): its weight is split like the features and its statistics are all-reduced over the tp ranks.
TensorParallelStyle = Literal["colwise", "rowwise", "colwise_gather", "sharded_norm"]

TENSOR_PARALLEL_STYLES: tuple[str, ...] = ("colwise", "rowwise", "colwise_gather", "sharded_norm")


@dataclass(frozen=True)
class Packed:
    """A fused ``nn.Linear`` whose output (``"colwise"``) or input (``"rowwise"``) features are several parts one
    after another, each split over the tp ranks on its own: e.g. a fused ``to_qkv`` (``Packed("colwise", (1, 1, 1))``)
    or Flux's single-stream ``proj_out`` over ``cat([attention, mlp])`` (``Packed("rowwise", (3072, 12288))``).

    Args:
        style: ``"colwise"`` or ``"rowwise"``.
        blocks: the parts' sizes, proportional (they must divide the feature count); ``None``: read from the
            Linear's ``_tp_packed_col_blocks`` / ``_tp_packed_row_blocks`` attribute (diffusers sets them).
    """

    style: Literal["colwise", "rowwise"]
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.style not in ("colwise", "rowwise"):
            raise ValueError(f"Packed style must be 'colwise' or 'rowwise'; got {self.style!r}.")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
            if not self.blocks or any(not isinstance(b, int) or b < 1 for b in self.blocks):
                raise ValueError(f"Packed blocks must be positive integers; got {self.blocks!r}.")


@dataclass(frozen=True)
class HeadFeatures:
    """A tensor one dim of which holds values for every head of the attention modules that tensor parallelism splits,
    heads outermost, e.g. rotary (cos, sin) computed over all heads at once: LTX-Video's ``(B, S, heads * head_dim)``
    (``dim=-1``), LTX-2's "split" rotary ``(B, heads, S, head_dim / 2)`` (``dim=1``). Tensor parallelism gives each
    rank the heads ``[r * heads/N, (r+1) * heads/N)``, so it keeps the same slice of this dim: it is cut into N equal
    contiguous parts and rank r keeps part r, ``(..., F, ...) -> (..., F/N, ...)``.

    Args:
        dim: the tensor dim that holds the heads' values (negative values count from the end).
        by_ndim: other dims for tensors of other numbers of dims, ``{ndim: dim}``, e.g. ``{4: 1}`` for a module that
            returns ``(B, S, H*D)`` or ``(B, H, S, D/2)`` tables depending on its configuration.
    """

    dim: int = -1
    by_ndim: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_ndim", MappingProxyType(dict(self.by_ndim)))
        bad = {n: d for n, d in self.by_ndim.items() if not -n <= d < n}
        if bad:
            raise ValueError(f"HeadFeatures(by_ndim={dict(self.by_ndim)}): no such dim in a tensor of that many dims.")

    def dim_of(self, ndim: int) -> int:
        """The dim to cut in a tensor of ``ndim`` dims."""
        return self.by_ndim.get(ndim, self.dim)


#: A module output whose dims hold per-head values (``HeadFeatures``), or a tuple's element-wise specs (``None``
#: leaves an element alone).
HeadFeaturesSpec = HeadFeatures | tuple[HeadFeatures | None, ...]


@dataclass(frozen=True)
class DiTPlan:
    """How a DiT class is parallelized. Module paths are relative to the DiT; patterns use ``fnmatch``.

    Args:
        split_inputs: forward arguments of the DiT that carry a token sequence, cut across sequence-parallel
            ranks before the forward runs, e.g. ``{"hidden_states": Split("image", 1)}``. A tuple argument (e.g.
            rotary ``(cos, sin)``) is cut element-wise with a tuple of splits (``None`` leaves an element alone).
            A tensor holding several sequences one after another (e.g. a ``[text, image]`` mask) is cut with a
            ``Concat``; entries are cut in order, so list the sequences it names before it.
        split_module_inputs: forward arguments of submodules, cut before the submodule runs, by module path,
            e.g. ``{"blocks.0": {"hidden_states": Split("video", 1)}}``, for a sequence that only exists as one
            tensor between modules (after a reshape or slice inside the DiT's forward). Tuples as in
            ``split_inputs``. The submodule must run once per forward. When the path is a block of a ``blocks``
            list (e.g. ``"blocks.0"``), the cut happens at the first block of that list, from that index on, that
            runs on the rank: the same block without a pipeline, a pipeline stage's first block with one.
        split_outputs: submodules whose output carries a token sequence, cut right after they run, e.g.
            ``{"pos_embed": Split("image", 1)}``. A tuple output is cut element-wise with a tuple of splits
            (``None`` leaves an element alone).
        gather_outputs: submodules whose output is gathered back into the whole sequence (padding removed),
            e.g. ``{"proj_out": Split("image", 1)}``; typically the last layer before unpatchify. Here and in
            ``split_outputs`` a path may count from the end of a block list (``"noise_refiner.-1"``: the output of
            its last block, whatever the number of blocks) or be a pattern naming the outermost matching modules
            (``"final_layers.*"``: every final layer, not their submodules); see ``module_paths``.
        blocks: paths of the ``nn.ModuleList``s holding the transformer blocks, in execution order
            (pipeline stages and FSDP units are cut from these).
        self_attention: patterns of attention modules whose ``F.scaled_dot_product_attention`` call attends
            over the sharded sequence, mapped to the order of the named sequences inside that call, e.g.
            ``{"transformer_blocks.*.attn1": ("image",)}`` or, for joint attention over text and image
            tokens concatenated text first, ``{"transformer_blocks.*.attn": ("text", "image")}``.
        linear_attention: patterns of linear-attention modules (outputs depend on the keys and values only through
            sums over key tokens, e.g. Sana's ``phi(k) v^T`` and ``phi(k)``) over the sharded sequence, mapped to the
            order of the named sequences in their token dim, e.g. ``{"transformer_blocks.*.attn1": ("image",)}``. The
            sums are all-reduced over the sequence-parallel ranks (``sequence/linear_attention.py``); no token moves.
        token_grids: patterns of modules that mix neighbouring tokens of a sharded sequence laid out as a grid
            (convolutions), e.g. ``{"transformer_blocks.*.ff": TokenGrid("image", ("height", "width"), dim=2)}``;
            see ``TokenGrid``.
        cross_attention: patterns of attention modules whose keys and values are replicated context (text);
            their queries stay sharded and they need no communication. Listed so the plan is complete; sequence
            parallelism checks that every pattern matches a module and none is also self-attention.
        shared_modules: submodules inside blocks that the DiT also calls outside its block loop, e.g. DiT's
            final layer reuses ``transformer_blocks.0.norm1.emb``; a pipeline stage that does not own the
            block keeps these (and only these) parts of it.
        split_module_inputs_each_call: forward arguments of submodules, by pattern, cut at every call of every
            matching module, for a per-token tensor (or a count of leading tokens, ``PrefixCount``) that the DiT's
            forward passes whole to each block, e.g. Cosmos' per-frame timestep embedding expanded to ``(B, S, C)``:
            ``{"transformer_blocks.*": {"temb": Split("video", 1, ndim=3)}}``. Every matching module must
            take the named arguments (one that takes ``*args`` instead, a variant of the block that ignores an
            argument, leaves it alone). A pattern names the outermost matching modules (``"transformer_blocks.*"``:
            every block, not the blocks' submodules; see ``module_paths``), here and in ``gather_module_inputs``.
        gather_module_inputs: forward arguments of submodules, by pattern, gathered back into the whole sequence
            (padding removed) at every call of every matching module, e.g. the keys and values of an attention from
            one cut sequence to another (LTX-2's audio-to-video attention:
            ``{"transformer_blocks.*.audio_to_video_attn": {"encoder_hidden_states": Split("audio", 1)}}``); the
            module then attends as cross-attention (list it in ``cross_attention``). Tuples as in ``split_inputs``.
        replicated_tail_attention: patterns of attention modules whose ``F.scaled_dot_product_attention`` call
            attends over the named cut sequences followed by a tail of tokens that every rank holds whole and whose
            number is only known at the call, mapped to the order of the cut sequences, e.g. Mochi's joint attention
            over its video tokens and the text tokens that each sample's mask keeps (the plan leaves the text whole):
            ``{"transformer_blocks.*.attn1": ("video",)}``. The tail is cut per call and its output rows gathered
            back (``sequence/replicated_tail.py``).
        pipeline_unsupported: why the DiT's blocks cannot be cut into pipeline stages, for a forward that does not
            run its block lists one after another with everything a block needs in its arguments (e.g. Latte zips
            its spatial and temporal lists; Wan VACE adds hints from a list by the block's index); pipeline
            parallelism then raises a ``ValueError`` with this reason. Empty: stages can be cut. FSDP units are cut
            from ``blocks`` either way.
        block_indexed_inputs: forward arguments that the block loop reads by the block's position, e.g. ControlNet
            residuals (``controlnet_block_samples[index_block // interval]``). Documentation: a pipeline stage's loop
            counts its blocks from their position in the whole list when the forward uses ``enumerate`` (see
            ``pipeline/positions.py``), so every stage reads the entries of its own blocks. Sequence parallelism cuts
            them like any argument (``Each`` in ``split_inputs``).
        sequence_unsupported_inputs: forward arguments that sequence parallelism (and PipeFusion, DistriFusion) does
            not cut, mapped to why, e.g. ControlNet residuals of a layout the plan does not describe: a call that
            passes one (not ``None``) raises a ``ValueError`` with the reason on every rank (``input_limits.py``).
        tensor_parallel: how tensor parallelism shards the modules of the blocks: patterns (``fnmatch``, relative to
            the DiT, naming modules inside the ``blocks`` lists) mapped to a ``TensorParallelStyle`` or ``Packed``,
            e.g. ``{"blocks.*.attn.to_q": "colwise", "blocks.*.attn.to_out.0": "rowwise"}`` (the format of diffusers'
            ``_tp_plan``); used as declared. Empty (the default): the class's diffusers ``_tp_plan`` where it has one
            (plus the per-sample adaLN modulation and embedders it leaves whole), else a layout derived from the
            diffusers ``Attention`` / ``FeedForward`` / adaLN modules inside the blocks (see ``tensor/default.py``).
            Either way, attention modules whose projections are split get their local head count while tensor
            parallelism is applied, and their q/k normalisations over all heads become ``"sharded_norm"``.
        tensor_parallel_outputs: submodules (anywhere in the DiT, e.g. a rotary embedding computed once before the
            blocks) whose output holds values for all heads of the split attention modules, e.g. LTX-Video's rotary
            ``(cos, sin)`` over ``heads * head_dim`` features that its processor applies before splitting heads:
            ``{"rope": (HeadFeatures(-1), HeadFeatures(-1))}``. Under tensor parallelism each rank keeps its heads'
            part of the output (``HeadFeatures``); a tuple output is cut element-wise. Patterns as in
            ``split_outputs``.
        tensor_parallel_unsupported: patterns of modules that tensor parallelism cannot split exactly, mapped to
            why, e.g. an attention whose processor returns a head-split output that no projection gathers: a model
            with a matching module is refused at setup (a ``ValueError`` with the reason, on every rank, before any
            collective). ``"*"`` refuses every model of the class; ``"pattern!name"`` counts only the matching modules
            that have no submodule ``name`` (e.g. EasyAnimate's attentions without their own text projections,
            ``"transformer_blocks.*.attn1!add_k_proj"``).
        head_parallel_attention: patterns of attention modules whose processor needs the whole sequence (masks or
            slices by global token positions), mapped to their ``HeadProjections``, e.g. Qwen-Image 2.1's
            ``{"transformer_blocks.*.attn": HeadProjections("joint")}``. Exact under Ulysses (the all-to-all is made at
            the projections); a layout with ``ring_degree > 1`` is refused at setup.
        optional_modules: module paths or patterns that some configs of the class leave out, e.g. Cosmos'
            ``"learnable_pos_embed"`` (``extra_pos_embed_type=None``) or Sana's ``"transformer_blocks.*.attn2"``
            (``cross_attention_dim=None``). When one matches no module of a model, every entry of the plan keyed by
            it or by a path inside it is dropped for that model (``plan_optional.without_absent``, which
            ``plan_for`` applies to a module); a path not listed here must exist.
    """

    split_inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    split_module_inputs: Mapping[str, Mapping[str, SplitSpec]] = field(default_factory=dict)
    split_outputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    gather_outputs: Mapping[str, Split] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()
    self_attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    linear_attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    token_grids: Mapping[str, TokenGrid] = field(default_factory=dict)
    cross_attention: tuple[str, ...] = ()
    shared_modules: tuple[str, ...] = ()
    split_module_inputs_each_call: Mapping[str, Mapping[str, SplitSpec]] = field(default_factory=dict)
    gather_module_inputs: Mapping[str, Mapping[str, SplitSpec]] = field(default_factory=dict)
    replicated_tail_attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pipeline_unsupported: str = ""
    block_indexed_inputs: tuple[str, ...] = ()
    sequence_unsupported_inputs: Mapping[str, str] = field(default_factory=dict)
    tensor_parallel: Mapping[str, TensorParallelStyle | Packed] = field(default_factory=dict)
    tensor_parallel_outputs: Mapping[str, HeadFeaturesSpec] = field(default_factory=dict)
    tensor_parallel_unsupported: Mapping[str, str] = field(default_factory=dict)
    head_parallel_attention: Mapping[str, HeadProjections] = field(default_factory=dict)
    optional_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "split_inputs",
            "split_outputs",
            "gather_outputs",
            "self_attention",
            "linear_attention",
            "token_grids",
        ):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        module_inputs = {path: MappingProxyType(dict(args)) for path, args in self.split_module_inputs.items()}
        object.__setattr__(self, "split_module_inputs", MappingProxyType(module_inputs))
        for name in ("split_module_inputs_each_call", "gather_module_inputs"):
            frozen = {path: MappingProxyType(dict(args)) for path, args in getattr(self, name).items()}
            object.__setattr__(self, name, MappingProxyType(frozen))
        object.__setattr__(self, "replicated_tail_attention", MappingProxyType(dict(self.replicated_tail_attention)))
        object.__setattr__(
            self, "sequence_unsupported_inputs", MappingProxyType(dict(self.sequence_unsupported_inputs))
        )
        object.__setattr__(self, "block_indexed_inputs", tuple(self.block_indexed_inputs))
        object.__setattr__(self, "tensor_parallel", MappingProxyType(dict(self.tensor_parallel)))
        object.__setattr__(self, "tensor_parallel_outputs", MappingProxyType(dict(self.tensor_parallel_outputs)))
        object.__setattr__(
            self, "tensor_parallel_unsupported", MappingProxyType(dict(self.tensor_parallel_unsupported))
        )
        bad_outputs = {p: s for p, s in self.tensor_parallel_outputs.items() if not _head_features_spec(s)}
        if bad_outputs:
            raise ValueError(
                f"tensor_parallel_outputs must map to a HeadFeatures or a tuple of them; got {bad_outputs}."
            )
        bad = {
            p: s
            for p, s in self.tensor_parallel.items()
            if not isinstance(s, Packed) and s not in TENSOR_PARALLEL_STYLES
        }
        if bad:
            raise ValueError(
                f"tensor_parallel styles must be one of {list(TENSOR_PARALLEL_STYLES)} or a Packed(...); got {bad}."
            )
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "cross_attention", tuple(self.cross_attention))
        object.__setattr__(self, "shared_modules", tuple(self.shared_modules))
        object.__setattr__(self, "optional_modules", tuple(self.optional_modules))
        object.__setattr__(self, "head_parallel_attention", MappingProxyType(dict(self.head_parallel_attention)))
        if "" in self.split_module_inputs:
            raise ValueError(
                "split_module_inputs names submodules; put the DiT's own forward arguments in split_inputs."
            )
        if not (
            self.split_inputs or self.split_outputs or self.split_module_inputs or self.split_module_inputs_each_call
        ):
            raise ValueError(
                "A DiTPlan needs at least one split point (split_inputs, split_module_inputs, split_outputs or"
                " split_module_inputs_each_call)."
            )
        if not self.gather_outputs:
            raise ValueError("A DiTPlan needs at least one gather point (gather_outputs).")
        folded = [path for path, split in self.gather_outputs.items() if getattr(split, "folded", False)]
        if folded:
            raise ValueError(f"gather_outputs {folded} are folded splits, which cut per group and cannot be gathered.")
        if not (
            self.self_attention
            or self.linear_attention
            or self.replicated_tail_attention
            or self.head_parallel_attention
        ):
            raise ValueError(
                "A DiTPlan needs at least one self_attention (or linear_attention, replicated_tail_attention,"
                " head_parallel_attention) pattern."
            )
        split_sequences = {s.sequence for s in self._all_splits()}
        for kind in ("self_attention", "linear_attention", "replicated_tail_attention"):
            for pattern, order in getattr(self, kind).items():
                if not order or set(order) - split_sequences:
                    raise ValueError(
                        f"{kind}[{pattern!r}] = {order} must name sequences that are split; split sequences:"
                        f" {sorted(split_sequences)}."
                    )
        for pattern, heads in self.head_parallel_attention.items():
            if not isinstance(heads, HeadProjections) or heads.sequence not in split_sequences:
                raise ValueError(
                    f"head_parallel_attention[{pattern!r}] = {heads!r} must be a HeadProjections of a sequence that is"
                    f" split; split sequences: {sorted(split_sequences)}."
                )
        counts = [spec for spec in self._all_specs() if isinstance(spec, PrefixCount)]
        uncut = sorted({c.sequence for c in counts} - split_sequences)
        if uncut:
            raise ValueError(
                f"PrefixCount of {uncut} must count tokens of sequences that are split; split sequences:"
                f" {sorted(split_sequences)}."
            )
        for pattern, grid in self.token_grids.items():
            if not isinstance(grid, TokenGrid) or grid.sequence not in split_sequences:
                raise ValueError(
                    f"token_grids[{pattern!r}] = {grid!r} must be a TokenGrid of a sequence that is split; split"
                    f" sequences: {sorted(split_sequences)}."
                )

    @property
    def sequences(self) -> tuple[str, ...]:
        """Names of all token sequences the plan splits, in first-seen order."""
        seen: dict[str, None] = {}
        for split in self._all_splits():
            seen.setdefault(split.sequence)
        return tuple(seen)

    def _all_specs(self) -> Iterator[object]:
        """Every split spec of the plan's cut points, (nested) tuples flattened."""
        module_inputs = [
            spec
            for inputs in (self.split_module_inputs, self.split_module_inputs_each_call)
            for args in inputs.values()
            for spec in args.values()
        ]
        for spec in (*self.split_inputs.values(), *module_inputs, *self.split_outputs.values()):
            yield from _leaves(spec)

    def _all_splits(self) -> Iterator[Split]:
        for spec in self._all_specs():
            if isinstance(spec, Split):
                yield spec
            elif isinstance(spec, Concat):
                yield from spec.splits

    def self_attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[str, ...]]]:
        """Yield ``(path, module, sequence order)`` for every submodule matching a self-attention pattern."""
        for path, module in model.named_modules():
            for pattern, order in self.self_attention.items():
                if fnmatch.fnmatchcase(path, pattern):
                    yield path, module, order
                    break

    def replicated_tail_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[str, ...]]]:
        """Yield ``(path, module, sequence order)`` for every submodule matching a replicated-tail attention pattern."""
        for path, module in model.named_modules():
            for pattern, order in self.replicated_tail_attention.items():
                if fnmatch.fnmatchcase(path, pattern):
                    yield path, module, order
                    break

    def linear_attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[str, ...]]]:
        """Yield ``(path, module, sequence order)`` for every submodule matching a linear-attention pattern."""
        return _matching(model, self.linear_attention)

    def token_grid_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, TokenGrid]]:
        """Yield ``(path, module, grid)`` for every submodule matching a token-grid pattern."""
        return _matching(model, self.token_grids)

    def cross_attention_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(path, module)`` for every submodule matching a cross-attention pattern."""
        for path, module in model.named_modules():
            if any(fnmatch.fnmatchcase(path, p) for p in self.cross_attention):
                yield path, module

    def block_position(self, path: str) -> tuple[str, int] | None:
        """``(block list path, index)`` when ``path`` is a block of one of the plan's block lists, else ``None``."""
        for list_path in self.blocks:
            head, _, index = path.rpartition(".")
            if head == list_path and index.isdigit():
                return list_path, int(index)
        return None

    def block_lists(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """The block ``ModuleList``s named by the plan, checked to exist."""
        lists = []
        for path in self.blocks:
            module = model.get_submodule(path)
            if not isinstance(module, nn.ModuleList):
                raise TypeError(f"Plan block path {path!r} is a {type(module).__name__}, not an nn.ModuleList.")
            lists.append((path, module))
        return lists


def _matching(model: nn.Module, patterns: Mapping[str, object]) -> Iterator[tuple[str, nn.Module, object]]:
    for path, module in model.named_modules():
        for pattern, value in patterns.items():
            if fnmatch.fnmatchcase(path, pattern):
                yield path, module, value
                break


def _head_features_spec(spec: object) -> bool:
    """A ``HeadFeatures``, or a tuple of ``HeadFeatures`` and ``None`` with at least one ``HeadFeatures``."""
    if isinstance(spec, tuple):
        return all(isinstance(s, HeadFeatures) or s is None for s in spec) and any(s is not None for s in spec)
    return isinstance(spec, HeadFeatures)


def _leaves(spec: object) -> Iterator[object]:
    if isinstance(spec, tuple):
        for item in spec:
            yield from _leaves(item)
    elif isinstance(spec, Each):
        yield spec.split
    else:
        yield spec


def is_within(path: str, outer: str) -> bool:
    """Whether the module at ``path`` is the one at ``outer`` or inside it (``""``, the root, contains every path)."""
    return outer == "" or path == outer or path.startswith(outer + ".")


def module_paths(modules: Mapping[str, nn.Module], path: str) -> list[str]:
    """The paths of the modules that a plan's module path names, given ``dict(model.named_modules())``.

    A plain path names its module. A path segment that is a negative index counts from the end of the
    ``nn.ModuleList`` (or ``nn.Sequential``) before it: ``"noise_refiner.-1"`` is the last block, for any number of
    blocks. A path with ``fnmatch`` wildcards names the outermost matching modules: ``"all_final_layer.*"`` is every
    entry of that ``ModuleDict``, not the entries' own submodules. Returns ``[]`` when nothing matches.
    """
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.startswith("-") and part[1:].isdigit():
            container = modules.get(".".join(parts[:i]))
            if not isinstance(container, (nn.ModuleList, nn.Sequential)) or not 0 <= len(container) + int(part):
                return []
            parts[i] = str(len(container) + int(part))
    path = ".".join(parts)
    if not any(c in path for c in "*?["):
        return [path] if path in modules else []
    found: list[str] = []
    for name in modules:
        if name and fnmatch.fnmatchcase(name, path) and not any(is_within(name, outer) for outer in found):
            found.append(name)  # named_modules() lists a module before its submodules
    return found
