"""Sharpening attention for exactness checks: scale every attention query and key so that attention is peaked.

With near-uniform attention (a freshly initialised model), a wrong merge of partial softmax results or a wrong
shard order changes the output by less than any tolerance; with logits scaled by ``factor**2`` it changes the output
far beyond it. ``check_plan`` and the tests sharpen the models they compare.
"""

from __future__ import annotations

import torch
from torch import nn

SHARPNESS = 6.0

#: Query/key projections (diffusers names) and the query/key normalisations that may follow them.
QK_PROJECTIONS = ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_q_t", "to_k_t", "to_query", "to_key")
QK_NORMS = (
    "norm_q",
    "norm_k",
    "norm_added_q",
    "norm_added_k",
    "q_rms_norm",
    "k_rms_norm",
    "q_rms_norm_t",
    "k_rms_norm_t",
    "query_norm",
    "key_norm",
)


def sharpen_attention(model: nn.Module, factor: float = SHARPNESS) -> nn.Module:
    """Multiply every attention query and key by ``factor`` (logits grow by factor**2), in place; returns ``model``.

    Scales the query and key projections, the query/key rows of fused ``qkv`` projections, and the affine
    weights of query/key normalisations (a normalisation would undo a scaled projection). A query/key
    normalisation without an affine weight (e.g. ``LayerNorm(elementwise_affine=False)``) gets a constant one of
    ``factor``.

    Raises:
        ValueError: for a query/key normalisation that has no weight and cannot be given one.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in QK_PROJECTIONS and isinstance(module, nn.Linear):
                module.weight.mul_(factor)
            elif leaf == "qkv" and isinstance(module, nn.Linear):
                module.weight[: 2 * module.out_features // 3].mul_(factor)  # rows of q and k; v is left alone
            elif leaf in QK_NORMS and not isinstance(module, nn.Identity):
                if getattr(module, "weight", None) is None:
                    shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
                    if not hasattr(module, "weight") or shape is None:
                        raise ValueError(f"{name} normalises queries/keys without an affine weight; cannot sharpen it.")
                    module.weight = nn.Parameter(torch.ones(shape))  # the norm's forward reads .weight when set
                module.weight.mul_(factor)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(factor)
    return model
