"""The default tensor-parallel layout of a block, derived from the diffusers modules inside it.

For a plan without ``tensor_parallel`` and a class without diffusers' ``_tp_plan``:

* attention (diffusers ``Attention`` and the ``AttentionModuleMixin`` classes): the query, key and value
  projections column-wise (``to_q``, ``to_k``, ``to_v``, ``add_*_proj``; fused ``to_qkv`` / ``to_kv`` /
  ``to_added_qkv`` / ``to_added_kv`` packed), so each rank computes its own heads; the output projections
  (``to_out.0``, ``to_add_out``) row-wise, so one all-reduce gives every rank the whole output;
* ``FeedForward``: the up projection of its activation (``net.0.proj``) column-wise (packed for the gated GEGLU /
  SwiGLU), the down projection (its last Linear) row-wise;
* per-sample modules (``per_sample_layout``): adaLN modulation (the ``linear`` of diffusers' ``AdaLayerNorm*``
  modules) column-wise with the output all-gathered, and conditioning embedders inside blocks (diffusers' DiT
  gives every block its own ``TimestepEmbedding``, ``linear_1`` column-wise and ``linear_2`` row-wise, and
  ``LabelEmbedding``, its table split over the embedding dim and gathered). Their inputs are one embedding per
  sample, so they move ``B * k * hidden`` values per block, not ``B * tokens * hidden``, and split ``k * hidden**2``
  weights (6 of the 18 ``hidden**2`` of a DiT block). diffusers' own ``_tp_plan``s keep the modulation whole; it is
  added to them too.

* single-stream blocks that project attention and MLP together (Flux, Chroma, HunyuanVideo, HunyuanImage: an
  attention ``attn`` without output projection, an MLP up projection ``proj_mlp`` and ``proj_out`` over
  ``cat([attention output, MLP hidden])``, recognised by ``proj_out``'s input features being exactly the two widths):
  ``proj_mlp`` column-wise and ``proj_out`` packed row-wise (each part split on its own), so one all-reduce gives
  every rank the whole output.

Any other block module that would leave heads split with nothing to gather them (an attention without an output
projection) is an error that asks for the layout in the plan.
"""

from __future__ import annotations

from torch import nn

from lightning_dit_parallel.parallel.tensor.lora import is_linear
from lightning_dit_parallel.parallel.tensor.styles import Spec
from lightning_dit_parallel.plan import Packed

#: Projections to head-split features, and fused ones with their number of equal parts (``*_t``: HiDream's text stream).
_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_q_t", "to_k_t", "to_v_t")
_FUSED_QKV = {"to_qkv": 3, "to_kv": 2, "to_added_qkv": 3, "to_added_kv": 2}
#: Projections to one value per head (LTX-2's gated attention: ``to_gate_logits``, (B, S, heads) gates that scale each
#: head's output), split column-wise with the heads.
_PER_HEAD = ("to_gate_logits",)
#: diffusers activations of ``FeedForward.net[0]``: plain ones, and gated ones whose ``proj`` gives two halves.
_PLAIN_ACTIVATIONS = ("GELU", "ApproximateGELU", "LinearActivation")
_GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")
#: diffusers adaLN modules whose ``linear`` maps the conditioning embedding to the modulation.
_MODULATIONS = (
    "AdaLayerNorm",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "AdaLayerNormContinuous",
    "SD35AdaLayerNormZeroX",
)

HOW_TO_DECLARE = (
    "Declare the block's layout in the plan's tensor_parallel, e.g. DiTPlan(..., tensor_parallel={"
    "'blocks.*.attn.to_q': 'colwise', ..., 'blocks.*.proj_out': Packed('rowwise', (hidden, mlp))})."
)


def _attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return (Attention, AttentionModuleMixin)


def default_block_layout(block: nn.Module, prefix: str) -> dict[str, Spec]:
    """Styles for the modules of one block, by path relative to the DiT (``prefix`` is the block's path).

    Raises:
        ValueError: for a diffusers attention without output projection or a ``FeedForward`` activation whose
            output layout is unknown; the message says how to declare the layout instead.
    """
    layout: dict[str, Spec] = {}
    attention = _attention_classes()
    single_stream = _single_stream_layout(block, prefix)
    layout.update(single_stream)
    for path, module in block.named_modules():
        full = f"{prefix}.{path}" if path else prefix
        if isinstance(module, attention):
            layout.update(_attention_layout(module, full, projected_by_block=bool(single_stream) and path == "attn"))
        elif type(module).__name__ == "FeedForward" and isinstance(getattr(module, "net", None), nn.ModuleList):
            layout.update(_feed_forward_layout(module, full))
    layout.update(per_sample_layout(block, prefix))
    return layout


def per_sample_layout(block: nn.Module, prefix: str) -> dict[str, Spec]:
    """Styles for the modules of a block that map one embedding per sample: adaLN modulation linears and
    timestep / label embedders (diffusers classes), by path relative to the DiT."""
    layout: dict[str, Spec] = {}
    for path, module in block.named_modules():
        full = f"{prefix}.{path}" if path else prefix
        kind = type(module).__name__
        if kind in _MODULATIONS and is_linear(getattr(module, "linear", None)):
            layout[f"{full}.linear"] = "colwise_gather"  # (B, k*hidden/N) -> all-gather -> (B, k*hidden)
        elif kind == "TimestepEmbedding" and all(is_linear(getattr(module, n, None)) for n in ("linear_1", "linear_2")):
            layout[f"{full}.linear_1"] = "colwise"
            layout[f"{full}.linear_2"] = "rowwise"  # (B, hidden) all-reduced
        elif kind == "LabelEmbedding" and isinstance(getattr(module, "embedding_table", None), nn.Embedding):
            layout[f"{full}.embedding_table"] = "colwise_gather"  # (B, hidden/N) -> all-gather -> (B, hidden)
    return layout


def _single_stream_layout(block: nn.Module, prefix: str) -> dict[str, Spec]:
    """``proj_mlp`` column-wise and ``proj_out`` packed row-wise for a block whose ``proj_out`` projects
    ``cat([attn output, proj_mlp output])`` (its input features are exactly the two widths); ``{}`` for other blocks.

    (B, S, hidden) -> attn heads (B, S, inner/N) and proj_mlp (B, S, mlp/N) -> cat (B, S, (inner + mlp)/N)
    -> proj_out, all-reduced -> (B, S, hidden).
    """
    attn, mlp, out = (getattr(block, n, None) for n in ("attn", "proj_mlp", "proj_out"))
    query = getattr(attn, "to_q", None)
    if not (isinstance(attn, _attention_classes()) and all(is_linear(m) for m in (mlp, out, query))):
        return {}
    if getattr(attn, "to_out", None) is not None or out.in_features != query.out_features + mlp.out_features:
        return {}
    return {
        f"{prefix}.proj_mlp": "colwise",
        f"{prefix}.proj_out": Packed("rowwise", (query.out_features, mlp.out_features)),
    }


def _attention_layout(attn: nn.Module, path: str, projected_by_block: bool = False) -> dict[str, Spec]:
    """Styles of an attention's projections; ``projected_by_block``: its head-split output goes to a projection of
    its block (``_single_stream_layout``), so it needs no ``to_out``."""
    layout: dict[str, Spec] = {}
    for name in _QKV:
        if is_linear(getattr(attn, name, None)):
            layout[f"{path}.{name}"] = "colwise"
    for name, parts in _FUSED_QKV.items():
        if is_linear(getattr(attn, name, None)):
            layout[f"{path}.{name}"] = Packed("colwise", (1,) * parts)
    if not layout:
        return layout
    for name in _PER_HEAD:
        if is_linear(getattr(attn, name, None)):
            layout[f"{path}.{name}"] = "colwise"
    out = getattr(attn, "to_out", None)
    if isinstance(out, (nn.ModuleList, nn.Sequential)) and len(out) and is_linear(out[0]):
        layout[f"{path}.to_out.0"] = "rowwise"
    elif is_linear(out):
        layout[f"{path}.to_out"] = "rowwise"
    elif not projected_by_block:  # (a single-stream block's proj_out gathers the heads: _single_stream_layout)
        raise ValueError(
            f"{path} ({type(attn).__name__}) has no output projection (to_out): the default layout cannot tell which"
            f" module receives its head-split output. {HOW_TO_DECLARE}"
        )
    if is_linear(getattr(attn, "to_q_t", None)):  # HiDream's text stream has its own output projection
        if not is_linear(getattr(attn, "to_out_t", None)):
            raise ValueError(f"{path} ({type(attn).__name__}) has to_q_t but no to_out_t to gather its heads.")
        layout[f"{path}.to_out_t"] = "rowwise"
    separate_query = any(is_linear(getattr(attn, n, None)) for n in ("add_q_proj", "to_added_qkv"))
    if separate_query and not getattr(attn, "context_pre_only", False):
        if not is_linear(getattr(attn, "to_add_out", None)):
            raise ValueError(
                f"{path} ({type(attn).__name__}) projects a second (context) stream but has no to_add_out to gather"
                f" its heads. {HOW_TO_DECLARE}"
            )
        layout[f"{path}.to_add_out"] = "rowwise"
    return layout


def _feed_forward_layout(ff: nn.Module, path: str) -> dict[str, Spec]:
    activation = ff.net[0]
    kind = type(activation).__name__
    known = kind in (*_PLAIN_ACTIVATIONS, *_GATED_ACTIVATIONS)
    if not known or not is_linear(getattr(activation, "proj", None)):
        raise ValueError(f"{path}: FeedForward with activation {kind} has no known up projection. {HOW_TO_DECLARE}")
    downs = [i for i, m in enumerate(ff.net) if is_linear(m)]
    if not downs:
        raise ValueError(f"{path}: FeedForward without a Linear after its activation. {HOW_TO_DECLARE}")
    up: Spec = Packed("colwise", (1, 1)) if kind in _GATED_ACTIVATIONS else "colwise"
    return {f"{path}.net.0.proj": up, f"{path}.net.{downs[-1]}": "rowwise"}
