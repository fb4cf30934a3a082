"""Bad input and dead peers end in errors, never in hangs."""

from __future__ import annotations

import os
import time

import torch

from lightning_dit_parallel.parallel.sequence.attention import sequence_parallel_attention
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from tests.distributed import run_on_ranks


def _attention_with_missing_peer(rank: int, world: int, peer_behaviour: str) -> tuple[str, float]:
    groups = SequenceGroups(ulysses=torch.distributed.group.WORLD)
    q = torch.randn(1, 2, 4, 8)
    if rank == 1:
        if peer_behaviour == "dies":
            os._exit(1)
        time.sleep(8)  # alive but stuck: the others must give up after the process group timeout
        return "stuck", 0.0
    start = time.monotonic()
    try:
        sequence_parallel_attention(q, q, q, groups, lambda shards, query_shards=None: None, None, "attn")
    except RuntimeError as err:  # gloo raises RuntimeError or a subclass (closed connection or timeout)
        return f"RuntimeError: {type(err).__name__}", time.monotonic() - start
    return "returned", time.monotonic() - start


def test_dead_peer_raises_instead_of_hanging():
    ((outcome, seconds),) = run_on_ranks(2, _attention_with_missing_peer, "dies", timeout_s=10, reporting=[0])
    assert outcome.startswith("RuntimeError") and seconds < 10 + 5, outcome


def test_stuck_peer_hits_the_configured_timeout():
    ((outcome, seconds),) = run_on_ranks(2, _attention_with_missing_peer, "stuck", timeout_s=3, reporting=[0])
    assert outcome.startswith("RuntimeError"), outcome
    assert 2 <= seconds < 15, seconds
