"""Where the mesh axes fall on the machines (nodes) of a multi-node run.

Ranks are numbered node by node (global rank = node rank * ranks per node + local rank: what torchrun, SLURM's
default block distribution and Lightning's launcher do) and the mesh lays them out row-major over its axes, the
innermost axis varying fastest. So the innermost axes (``ulysses``, and ``tp`` where the mesh has it) are groups
of neighbouring ranks on one node whenever their groups fit evenly into a node. Their collectives run in every
layer (Ulysses' all-to-alls, tensor parallel's all-reduces) and need a node's bandwidth; outer axes (ring's
overlapped point-to-point, pipeline stages, data parallel) cross nodes cheaply.

Everything here is pure computation: every rank reaches the same verdict before any collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

#: Axes whose groups should stay inside a node, with the collective that crossing nodes would slow down.
NODE_LOCAL_AXES: dict[str, str] = {"ulysses": "Ulysses all-to-all", "tp": "tensor-parallel all-reduce"}

#: What a strategy does when a node-local axis crosses nodes: ``"warn"`` (and run) or ``"error"`` (refuse).
CrossNodePolicy = Literal["warn", "error"]


class CrossNodeWarning(UserWarning):
    """A bandwidth-hungry mesh axis (Ulysses, tensor parallel) has groups spanning several nodes."""


def _check_ranks_per_node(world_size: int, ranks_per_node: int) -> None:
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(
            f"ranks_per_node must be a positive integer; got {ranks_per_node!r} (world size {world_size})."
        )
    if world_size % ranks_per_node:
        raise ValueError(
            f"ranks_per_node={ranks_per_node} does not divide the world size {world_size}: every node must run as"
            " many ranks."
        )


def axes_across_nodes(degrees: Mapping[str, int], ranks_per_node: int) -> tuple[str, ...]:
    """The mesh axes (outermost first) with at least one group whose ranks lie on more than one node.

    Args:
        degrees: resolved degrees by mesh axis, outermost first (``ParallelLayout.degrees()``).
        ranks_per_node: processes (devices) per node; must divide the product of the degrees.

    Raises:
        ValueError: when ``ranks_per_node`` is not a positive integer dividing the world size.
    """
    sizes = [int(d) for d in degrees.values()]
    world = math.prod(sizes)
    _check_ranks_per_node(world, ranks_per_node)
    # the node of every rank, (world,) -> one dim per mesh axis, e.g. (dp, cfg, pp, ring, ulysses, tp)
    nodes = torch.div(torch.arange(world), ranks_per_node, rounding_mode="floor").reshape(sizes)
    return tuple(
        axis
        for dim, (axis, size) in enumerate(zip(degrees, sizes))
        if size > 1 and bool((nodes.amax(dim=dim) != nodes.amin(dim=dim)).any())
    )


def group_span(degrees: Mapping[str, int], axis: str) -> int:
    """How many consecutive ranks one group of ``axis`` spans: its degree times the degrees of the axes inside it."""
    names = list(degrees)
    return math.prod(int(degrees[a]) for a in names[names.index(axis) :])


def describe_nodes(degrees: Mapping[str, int], ranks_per_node: int) -> str:
    """E.g. ``2 nodes x 4 ranks, across nodes: dp, ring`` (``across nodes: none`` when every group is node-local)."""
    world = math.prod(int(d) for d in degrees.values())
    across = axes_across_nodes(degrees, ranks_per_node)
    count = world // ranks_per_node
    return (
        f"{count} node{'s' if count != 1 else ''} x {ranks_per_node} rank{'s' if ranks_per_node != 1 else ''},"
        " across nodes: "
        f"{', '.join(across) if across else 'none'}"
    )


def cross_node_problems(degrees: Mapping[str, int], ranks_per_node: int) -> list[str]:
    """One sentence per node-local axis (``NODE_LOCAL_AXES``) whose groups cross nodes; empty when none does."""
    across = axes_across_nodes(degrees, ranks_per_node)
    problems = []
    for axis, collective in NODE_LOCAL_AXES.items():
        if axis not in across:
            continue
        inner = list(degrees)[list(degrees).index(axis) :]
        span = group_span(degrees, axis)
        problems.append(
            f"the {collective} crosses nodes: one {axis} group spans {span} consecutive ranks"
            f" ({' * '.join(f'{a}={degrees[a]}' for a in inner if int(degrees[a]) > 1)}), which do not fit evenly into"
            f" nodes of {ranks_per_node} ranks"
        )
    return problems


def check_node_placement(
    degrees: Mapping[str, int], ranks_per_node: int, policy: CrossNodePolicy, describe: str = ""
) -> str | None:
    """Refuse (``policy="error"``) node-local axes that cross nodes, or return the warning to give (``"warn"``).

    Args:
        degrees: resolved degrees by mesh axis, outermost first.
        ranks_per_node: processes per node.
        policy: ``"warn"`` or ``"error"``.
        describe: the layout's description, for the message.

    Returns:
        ``None`` when every node-local axis stays inside a node, else the warning (the caller decides who gives it,
        e.g. rank 0 only).

    Raises:
        ValueError: with ``policy="error"`` when a node-local axis crosses nodes (on every rank: the verdict depends
            only on the degrees and ``ranks_per_node``); for an unknown policy or a bad ``ranks_per_node``.
    """
    if policy not in ("warn", "error"):
        raise ValueError(f"cross_node must be 'warn' or 'error'; got {policy!r}.")
    problems = cross_node_problems(degrees, ranks_per_node)
    if not problems:
        return None
    message = (
        f"{'; '.join(problems)} ({describe}). Keep the Ulysses (and tensor-parallel) degrees within a node, their"
        f" product dividing the {ranks_per_node} ranks per node, and let ring, pp, cfg or dp cross nodes"
        f" (e.g. {_fitting_degrees(degrees, ranks_per_node)} with ring_degree or dp_degree for the rest)."
    )
    if policy == "error":
        raise ValueError(f"Refusing the layout (cross_node='error'): {message}")
    return message + " Pass cross_node='error' to refuse such layouts."


def _fitting_degrees(degrees: Mapping[str, int], ranks_per_node: int) -> str:
    """The largest degrees of the node-local axes, innermost first, that divide the requested ones and fit in a node,
    e.g. ``ulysses_degree=2``."""
    room, fitted = ranks_per_node, {}
    for axis in reversed([a for a in degrees if a in NODE_LOCAL_AXES]):
        fitted[axis] = math.gcd(room, int(degrees[axis]))
        room //= fitted[axis]
    return " ".join(f"{axis}_degree={fitted[axis]}" for axis in degrees if axis in fitted and int(degrees[axis]) > 1)


def is_numbered_by_node(global_rank: int, node_rank: int, local_rank: int, ranks_per_node: int) -> bool:
    """Whether this rank's global rank is ``node_rank * ranks_per_node + local_rank`` (what the placement assumes)."""
    return global_rank == node_rank * ranks_per_node + local_rank


__all__ = [
    "NODE_LOCAL_AXES",
    "CrossNodePolicy",
    "CrossNodeWarning",
    "axes_across_nodes",
    "check_node_placement",
    "cross_node_problems",
    "describe_nodes",
    "group_span",
    "is_numbered_by_node",
]
