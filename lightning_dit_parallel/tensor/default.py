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

A block module that would leave heads split with nothing to gather them (an attention without an output
projection, like Flux's single-stream blocks) is an error that asks for the layout in the plan.
"""

from __future__ import annotations

from torch import nn

from lightning_dit_parallel.plan import Packed
from lightning_dit_parallel.tensor.styles import Spec

#: Projections to head-split features, and fused ones with their number of equal parts.
_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_FUSED_QKV = {"to_qkv": 3, "to_kv": 2, "to_added_qkv": 3, "to_added_kv": 2}
#: diffusers activations of ``FeedForward.net[0]``: plain ones, and gated ones whose ``proj`` gives two halves.
_PLAIN_ACTIVATIONS = ("GELU", "ApproximateGELU", "LinearActivation")
_GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")
#: diffusers adaLN modules whose ``linear`` maps the conditioning embedding to the modulation.
_MODULATIONS = (
    "AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous", "SD35AdaLayerNormZeroX",
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
    for path, module in block.named_modules():
        full = f"{prefix}.{path}" if path else prefix
        if isinstance(module, attention):
            layout.update(_attention_layout(module, full))
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
        if kind in _MODULATIONS and isinstance(getattr(module, "linear", None), nn.Linear):
            layout[f"{full}.linear"] = "colwise_gather"  # (B, k*hidden/N) -> all-gather -> (B, k*hidden)
        elif kind == "TimestepEmbedding" and all(isinstance(getattr(module, n, None), nn.Linear)
                                                 for n in ("linear_1", "linear_2")):
            layout[f"{full}.linear_1"] = "colwise"
            layout[f"{full}.linear_2"] = "rowwise"  # (B, hidden) all-reduced
        elif kind == "LabelEmbedding" and isinstance(getattr(module, "embedding_table", None), nn.Embedding):
            layout[f"{full}.embedding_table"] = "colwise_gather"  # (B, hidden/N) -> all-gather -> (B, hidden)
    return layout


def _attention_layout(attn: nn.Module, path: str) -> dict[str, Spec]:
    layout: dict[str, Spec] = {}
    for name in _QKV:
        if isinstance(getattr(attn, name, None), nn.Linear):
            layout[f"{path}.{name}"] = "colwise"
    for name, parts in _FUSED_QKV.items():
        if isinstance(getattr(attn, name, None), nn.Linear):
            layout[f"{path}.{name}"] = Packed("colwise", (1,) * parts)
    if not layout:
        return layout
    out = getattr(attn, "to_out", None)
    if isinstance(out, (nn.ModuleList, nn.Sequential)) and len(out) and isinstance(out[0], nn.Linear):
        layout[f"{path}.to_out.0"] = "rowwise"
    elif isinstance(out, nn.Linear):
        layout[f"{path}.to_out"] = "rowwise"
    else:
        raise ValueError(
            f"{path} ({type(attn).__name__}) has no output projection (to_out): the default layout cannot tell which"
            f" module receives its head-split output. {HOW_TO_DECLARE}"
        )
    separate_query = any(isinstance(getattr(attn, n, None), nn.Linear) for n in ("add_q_proj", "to_added_qkv"))
    if separate_query and not getattr(attn, "context_pre_only", False):
        if not isinstance(getattr(attn, "to_add_out", None), nn.Linear):
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
    if not known or not isinstance(getattr(activation, "proj", None), nn.Linear):
        raise ValueError(f"{path}: FeedForward with activation {kind} has no known up projection. {HOW_TO_DECLARE}")
    downs = [i for i, m in enumerate(ff.net) if isinstance(m, nn.Linear)]
    if not downs:
        raise ValueError(f"{path}: FeedForward without a Linear after its activation. {HOW_TO_DECLARE}")
    up: Spec = Packed("colwise", (1, 1)) if kind in _GATED_ACTIVATIONS else "colwise"
    return {f"{path}.net.0.proj": up, f"{path}.net.{downs[-1]}": "rowwise"}
