"""Run a function on N CPU ranks (gloo; or NCCL, one GPU per rank) with the fork start method from a test or a
benchmark, and always clean up.

Each rank's process group is initialised over TCP on a fresh port (no environment variables are set),
every process is joined or killed before returning, and a failure on any rank fails the test with that
rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' and port-0 listeners' ports from (Linux; else IANA's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A free TCP port for a process group's store, outside the ephemeral range.

    A port the kernel handed out (binding port 0) is closed again before the store binds it, and meanwhile any
    connection of any process (gloo opens many) may take it as its own port: the store then fails to bind. Ports
    below the ephemeral range are never handed out that way, so only another explicit choice can take them.
    """
    low, high = _ephemeral_ports()
    candidates = range(25000, low) if low > 26000 else range(high + 1, 65536)
    chooser = random.Random()  # not the seeded global generator: forked test processes would pick alike
    for _ in range(200):
        port = chooser.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: tuple,
    results,
    timeout_s: float,
    threads: int,
    backend: str,
    meet_at_end: bool,
) -> None:
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            # init_process_group returns on a rank once its own connections stand, not everyone's: a rank whose
            # ``fn`` starts by destroying the group (tests that run strategies with groups of their own) would close
            # its end while a peer still connects to it ("Connection closed by peer" there). Meet first.
            dist.barrier()
            value = fn(rank, world_size, *args)
            if meet_at_end:
                # Rank 0 serves the group's store: a rank that returned first must not close it while a peer still
                # uses it (e.g. creating a group of its own, which waits on the store too).
                dist.barrier()
            # Plain pickle copies tensors into the message. The queue's own pickler (torch's reductions) would share
            # a tensor's storage through a file descriptor that the parent fetches from this process later, after it
            # may have exited (ConnectionResetError in the parent).
            results.put((rank, True, pickle.dumps(value)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including failed asserts, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(
    world_size: int,
    fn: Callable,
    *args: Any,
    timeout_s: float = 180.0,
    reporting: list[int] | None = None,
    threads: int = 1,
    backend: str = "gloo",
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the results of the ``reporting`` ranks (default:
    all) in rank order.

    ``fn`` must be a module-level function. Its return value must be picklable (prefer plain Python values).
    ``timeout_s`` is also the process group's collective timeout; ``threads`` is each rank's torch thread count
    (a rank stands for one device, so benchmarks compare ranks and one process at equal threads). ``backend``:
    ``"gloo"`` (CPU), or ``"nccl"`` with rank ``i`` on CUDA device ``i``. When every rank reports, the ranks meet in a
    barrier after ``fn`` before closing the group; with fewer ``reporting`` ranks (a test whose other ranks die or
    hang) they do not.
    """
    reporting = list(range(world_size)) if reporting is None else reporting
    meet_at_end = set(reporting) == set(range(world_size))  # a test with a rank that dies or hangs reports fewer
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, results, timeout_s, threads, backend, meet_at_end),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[bool, Any]] = {}
    try:
        while not set(reporting) <= set(collected):
            rank, ok, value = results.get(timeout=timeout_s + 30)
            collected[rank] = (ok, pickle.loads(value) if ok else value)
    except Exception as exc:  # a rank died without reporting, or everything hung
        reported = "".join(f"\n--- rank {r} ---\n{v}" for r, (ok, v) in sorted(collected.items()) if not ok)
        missing = sorted(set(reporting) - set(collected))
        raise AssertionError(f"ranks {missing} did not report: {exc!r}{reported}") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(collected.items()) if not ok and r in reporting]
    if failures:
        raise AssertionError("\n".join(failures))
    return [collected[r][1] for r in reporting]
