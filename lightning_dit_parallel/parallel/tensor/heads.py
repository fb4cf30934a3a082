"""Attention modules whose heads tensor parallelism splits: their local sizes, and the check on head counts.

diffusers' attention processors reshape the projected features with the module's head count
(``query.view(B, -1, attn.heads, head_dim)`` with ``head_dim = features // attn.heads``, or
``unflatten(2, (attn.heads, -1))``). After a column-wise split a rank holds ``heads / tp`` heads, so while tensor
parallelism is applied these attributes hold the local sizes and are restored when it is removed. Ulysses then
splits each rank's heads further: it needs ``heads % (tp * ulysses) == 0``.
"""

from __future__ import annotations

from torch import nn

#: Integer attributes of an attention module that count heads or head-split features (diffusers' ``heads``,
#: ``kv_heads``, ``inner_dim``, ``inner_kv_dim``; timm-style ``num_heads``), and ``mlp_hidden_dim``, the MLP width of
#: an attention that also computes its block's MLP (Flux.2's parallel self-attention: its fused projection is packed,
#: each part split, and its processor divides the output in the ratio ``3 * inner_dim : mlp_hidden_dim * factor``).
HEAD_ATTRIBUTES = ("heads", "num_heads", "kv_heads", "inner_dim", "inner_kv_dim", "mlp_hidden_dim")


def head_count(module: nn.Module) -> int | None:
    """The module's number of (query) heads, or ``None`` when it has no such attribute."""
    for name in ("heads", "num_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def local_head_attributes(module: nn.Module, tp: int) -> dict[str, tuple[int, int]]:
    """``name -> (whole, local)`` for every ``HEAD_ATTRIBUTES`` entry the module has (local = whole / tp)."""
    found = {}
    for name in HEAD_ATTRIBUTES:
        value = module.__dict__.get(name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % tp == 0:
            found[name] = (value, value // tp)
    return found


def suggest_split(heads: int, tp: int, ulysses: int, ring: int) -> tuple[int, int, int]:
    """A ``(tp, ulysses, ring)`` with the same product whose ``tp * ulysses`` divides ``heads``: the largest tp
    degree up to the requested one, then the largest Ulysses degree; ring attention takes the rest (it has no
    constraint on heads)."""
    total = tp * ulysses * ring
    splits = [
        (t, u, total // (t * u))
        for t in range(1, total + 1)
        for u in range(1, total + 1)
        if total % (t * u) == 0 and heads % (t * u) == 0
    ]
    return max(splits, key=lambda s: (s[0] <= tp, s[0], s[1]))


def check_heads(heads: int, tp: int, ulysses: int, ring: int, where: str) -> None:
    """Raise a ``ValueError`` naming a working layout when ``tp * ulysses`` does not divide ``heads``.

    Pure computation: every rank raises the same error before any collective.

    Args:
        heads: the module's head count.
        tp: tensor-parallel degree (splits heads first).
        ulysses: Ulysses degree over this module (1 for an attention Ulysses does not run, e.g. cross-attention).
        ring: ring degree (no constraint on heads; the place offered for the rest).
        where: the module's path, for the message.
    """
    if heads % (tp * ulysses) == 0:
        return
    t, u, r = suggest_split(heads, tp, ulysses, ring)
    asked = f"tp_degree={tp}" + (f" x ulysses_degree={ulysses}" if ulysses > 1 else "")
    working = f"tp_degree={t}" + (f", ulysses_degree={u}" if u > 1 or ulysses > 1 else "")
    instead = (
        (
            f"{working}, ring_degree={r} (ring attention has no constraint on heads), or {working} with the factor"
            f" {r} moved to dp_degree"
        )
        if r > 1
        else working
    )
    raise ValueError(
        f"{where}: {heads} attention heads cannot be split over {asked} (tensor parallelism gives each rank"
        f" heads / tp_degree of them and Ulysses splits those further). Use {instead}."
    )
