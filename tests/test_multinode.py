"""Several machines: torchrun, SLURM and Lightning's launcher with ``Trainer(num_nodes=2)`` on localhost (gloo).

Two "nodes" are two launcher invocations on this machine (``--node-rank 0`` and ``1``), or, for SLURM, processes
given the variables srun sets. Every case is compared with the one-process output of the same seeded model
(float32, relative 1e-5), and every process group must be gone after each ``trainer.predict``. Node placement
(which mesh axes cross nodes, the Ulysses warning and refusal) is checked without processes first.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from lightning.fabric.plugins.environments import TorchElasticEnvironment

from lightning_dit_parallel import ParallelLayout, SequenceParallelStrategy
from lightning_dit_parallel.app.cli import predict
from lightning_dit_parallel.parallel.nodes import axes_across_nodes, check_node_placement
from tests.distributed import free_port, run_on_ranks
from tests.models import requests
from tests.multinode_cases import CASES, FAMILIES, run_case
from tests.rank_outputs import assert_exact, load_rank_outputs, predict_single

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: ldp-predict, small: 4 digits in batches of 2, 3 denoising steps, no quality score (it trains a classifier).
FAST = ["data.dataset.num_samples=4", "data.batch_size=2", "model.num_inference_steps=3", "score=null"]
#: Variables of an outer launcher that must not reach the processes a test starts.
LAUNCHER_VARIABLES = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start_nodes(commands: list[list[str]], envs: list[dict[str, str]], logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs / f"node{i}.log", "w"), stderr=subprocess.STDOUT)
        for i, (cmd, env) in enumerate(zip(commands, envs))
    ]


def wait_nodes(procs: list[subprocess.Popen], logs: Path, timeout_s: float = 400) -> list[int]:
    """Every node's exit code; kills what is left after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- node {i} ---\n{log_tail(logs, i)}" for i in range(len(procs)))
        raise AssertionError(f"nodes did not finish within {timeout_s} s\n{tails}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def log_tail(logs: Path, node: int, chars: int = 4000) -> str:
    return (logs / f"node{node}.log").read_text(errors="replace")[-chars:]


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]], logs: Path) -> None:
    codes = wait_nodes(start_nodes(commands, envs, logs), logs)
    for node, code in enumerate(codes):
        assert code == 0, f"node {node} exited with {code}:\n{log_tail(logs, node)}"


def torchrun(node: int, nodes: int, per_node: int, port: int, *program: str) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(per_node),
        "--node-rank",
        str(node),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *program,
    ]


def reference(name: str) -> torch.Tensor:
    case = CASES[name]
    return predict_single(FAMILIES[case.family](), requests(case.samples, case.batch_size))


def records(out: Path, name: str, world: int) -> list[dict]:
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(world)]


def check_case(out: Path, name: str, world: int, environment: str, per_node: int) -> float:
    """Every rank's record and outputs for one case; returns the largest relative error."""
    ranks = records(out, name, world)
    assert all(r["torn_down"] for r in ranks), f"{name}: a process group outlived trainer.predict"
    assert [r["environment"] for r in ranks] == [environment] * world
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [
        (g, g // per_node, g % per_node) for g in range(world)
    ]
    case, expected = CASES[name], reference(name)
    if case.writer:  # data parallel: rank 0 holds every sample, ordered by global index
        gathered = torch.load(out / name / "writer.pt")
        assert gathered["index"].tolist() == list(range(case.samples))
        return assert_exact([gathered["prediction"]], expected, name)
    return assert_exact(load_rank_outputs(out / name, world), expected, name)


# -- node placement, no processes -------------------------------------------------------------------------------


def test_axes_across_nodes_follow_the_row_major_layout():
    def across(ranks_per_node: int, **degrees) -> tuple[str, ...]:
        layout = ParallelLayout(**degrees)
        return layout.resolve(layout.model_parallel_degree * int(layout.dp)).axes_across_nodes(ranks_per_node)

    assert across(2, ulysses=4) == ("ulysses",)
    assert across(2, ulysses=2, ring=2) == ("ring",)  # USP: Ulysses inside a node, Ring across
    assert across(2, pp=2, ulysses=2) == ("pp",)  # the two stages on different nodes
    assert across(2, dp=2, ulysses=2, fsdp=True) == ("dp",)
    assert across(8, dp=2, ulysses=4, tp=2) == ("dp",)
    assert across(4, ulysses=4, tp=2) == ("ulysses",)  # a Ulysses group spans 8 ranks; tp pairs stay inside
    assert across(2, tp=4) == ("tp",)
    assert across(4, ulysses=2, tp=2, ring=2) == ("ring",)
    assert across(6, dp=3, ulysses=4) == ("dp", "ulysses")  # groups of 4 do not tile nodes of 6
    assert across(4, ring=4) == ()  # one node
    layout = ParallelLayout(ring=2, ulysses=2).resolve(4)
    assert layout.describe(2) == (
        "dp=1 cfg=1 pp=1 ring=2 ulysses=2 tp=1 fsdp=False | 2 nodes x 2 ranks, across nodes: ring"
    )
    assert layout.describe() == "dp=1 cfg=1 pp=1 ring=2 ulysses=2 tp=1 fsdp=False"


def test_ulysses_or_tp_across_nodes_warns_or_is_refused_naming_the_values():
    fits = {"dp": 2, "cfg": 1, "pp": 1, "ring": 2, "ulysses": 2, "tp": 2}  # 16 ranks, nodes of 8
    assert check_node_placement(fits, 8, "warn") is None and check_node_placement(fits, 8, "error") is None
    crossing = {"dp": 1, "cfg": 1, "pp": 1, "ring": 1, "ulysses": 8, "tp": 2}
    message = check_node_placement(crossing, 8, "warn", "LAYOUT")
    assert "Ulysses all-to-all crosses nodes" in message and "tensor-parallel" not in message.split("(")[0]
    assert "ulysses=8 * tp=2" in message and "nodes of 8 ranks" in message and "LAYOUT" in message
    assert "ulysses_degree=4 tp_degree=2" in message  # a fitting suggestion
    with pytest.raises(ValueError, match=r"Refusing the layout \(cross_node='error'\).*16 consecutive ranks"):
        check_node_placement(crossing, 8, "error")
    tp_crossing = {"dp": 1, "cfg": 1, "pp": 1, "ring": 1, "ulysses": 1, "tp": 4}
    assert "tensor-parallel all-reduce crosses nodes" in check_node_placement(tp_crossing, 2, "warn")


def test_bad_node_arguments_are_value_errors():
    with pytest.raises(ValueError, match=r"ranks_per_node=3 does not divide the world size 4"):
        axes_across_nodes({"ring": 4}, 3)
    with pytest.raises(ValueError, match=r"ranks_per_node must be a positive integer; got 0"):
        axes_across_nodes({"ring": 4}, 0)
    with pytest.raises(ValueError, match=r"cross_node must be 'warn' or 'error'; got 'ignore'"):
        SequenceParallelStrategy(ulysses_degree=2, cross_node="ignore")


def test_a_process_starting_start_method_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    strategy = SequenceParallelStrategy(ulysses_degree=2, start_method="fork")
    strategy.cluster_environment = TorchElasticEnvironment()
    with pytest.raises(ValueError, match=r"start_method='fork' starts the ranks itself.*TorchElasticEnvironment"):
        strategy._configure_launcher()


# -- torchrun ---------------------------------------------------------------------------------------------------

TORCHRUN_CASES = ["ulysses", "ring", "usp", "pipeline", "fsdp", "data_parallel", "refused"]


def test_torchrun_two_nodes_every_layout_equals_one_process(tmp_path):
    """One launch of 2 nodes x 2 ranks runs every case in a row: Ulysses 4 and Ring 4 across both nodes, USP 2 x 2
    (Ulysses inside a node, Ring across), pp 2 x Ulysses 2 (one stage per node), FSDP with Ulysses 2 x dp 2 (the
    shard group spans both nodes), dp 2 x Ulysses 2 gathered in order on rank 0, and Ulysses 4 refused."""
    port, out = free_port(), tmp_path / "out"
    program = [
        "-m",
        "tests.multinode_cases",
        str(out),
        "--cases",
        ",".join(TORCHRUN_CASES),
        "--num-nodes",
        "2",
        "--devices",
        "2",
    ]
    run_nodes([torchrun(n, 2, 2, port, *program) for n in (0, 1)], [clean_env()] * 2, tmp_path / "logs")
    for name in TORCHRUN_CASES:
        if name == "refused":
            continue
        check_case(out, name, 4, "TorchElasticEnvironment", 2)
    across = {name: records(out, name, 4)[0]["across"] for name in TORCHRUN_CASES}
    assert across == {
        "ulysses": ["ulysses"],
        "ring": ["ring"],
        "usp": ["ring"],
        "pipeline": ["pp"],
        "fsdp": ["dp"],
        "data_parallel": ["dp"],
        "refused": ["ulysses"],
    }
    warned = [r["warnings"] for r in records(out, "ulysses", 4)]
    assert len(warned[0]) == 1 and "Ulysses all-to-all crosses nodes" in warned[0][0]
    assert warned[1:] == [[], [], []], "rank 0 alone warns"
    assert all(not r["warnings"] for name in ("usp", "pipeline", "fsdp") for r in records(out, name, 4))
    refused = records(out, "refused", 4)
    assert all("Refusing the layout" in r["error"] and r["torn_down"] for r in refused), "every rank refuses"


def test_torchrun_two_nodes_ldp_predict_equals_one_process(tmp_path, cli_reference):
    port, run_dir = free_port(), tmp_path / "run"
    program = [str(BIN / "ldp-predict"), "trainer.num_nodes=2", "trainer.devices=1", *FAST, f"hydra.run.dir={run_dir}"]
    run_nodes([torchrun(n, 2, 1, port, *program) for n in (0, 1)], [clean_env()] * 2, tmp_path / "logs")
    check_cli_run(run_dir, tmp_path / "logs", cli_reference)


def test_torchrun_a_dead_node_makes_the_other_node_fail_within_the_timeout(tmp_path):
    """Node 1's process exits at its second batch; node 0's rank, waiting in a Ulysses all-to-all, raises and its
    torchrun exits with an error within the strategy's timeout (20 s)."""
    port, out, died = free_port(), tmp_path / "out", tmp_path / "died"
    program = [
        "-m",
        "tests.multinode_cases",
        str(out),
        "--cases",
        "ulysses_2x1",
        "--num-nodes",
        "2",
        "--devices",
        "1",
        "--timeout",
        "20",
        "--die-node",
        "1",
        "--die-file",
        str(died),
    ]
    logs = tmp_path / "logs"
    procs = start_nodes([torchrun(n, 2, 1, port, *program) for n in (0, 1)], [clean_env()] * 2, logs)
    codes = wait_nodes(procs, logs, timeout_s=300)
    ended = time.time()
    assert died.exists(), f"node 1 never reached its second batch:\n{log_tail(logs, 1)}"
    assert codes[0] != 0 and codes[1] != 0, codes
    assert ended - float(died.read_text()) < 20 + 25, "node 0 outlived the timeout"
    assert "Error" in log_tail(logs, 0, 20000)


# -- SLURM (srun's variables, one process per task) -------------------------------------------------------------


def slurm_variables(task: int, tasks_per_node: int, nodes: int, job_id: str) -> dict[str, str]:
    """What srun sets for one task of ``srun --nodes N --ntasks-per-node T`` (block distribution)."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "ldp-multinode",
        "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_PROCID": str(task),
        "SLURM_NODEID": str(task // tasks_per_node),
        "SLURM_LOCALID": str(task % tasks_per_node),
    }


def slurm_job_id() -> str:
    """A job id whose port (Lightning: 15000 + its last 4 digits) is free here."""
    for _ in range(100):
        port = random.randint(15000, 24999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"7{port - 15000:04d}"
    raise RuntimeError("no free port in 15000-24999")


SLURM_CASES = ["usp", "data_parallel"]


def _as_slurm_task(rank: int, world: int, out: str, job_id: str, harness_port: int) -> None:
    """This forked rank becomes SLURM task ``rank`` of 2 nodes x 2 tasks and runs the cases."""
    dist.destroy_process_group()  # the strategies make their own
    saved = dict(os.environ)
    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(slurm_variables(rank, 2, 2, job_id))
    try:
        for name in SLURM_CASES:
            run_case(name, Path(out), num_nodes=2, devices=2)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{harness_port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )


def test_slurm_two_nodes_trainer_predict_equals_one_process(tmp_path):
    """Four tasks (2 nodes x 2) with only srun's variables: Lightning's SLURMEnvironment finds rank, node, address
    (SLURM_NODELIST) and port (SLURM_JOB_ID); USP 2 x 2 and dp 2 x Ulysses 2 run in a row."""
    run_on_ranks(4, _as_slurm_task, str(tmp_path), slurm_job_id(), free_port(), timeout_s=300)
    for name in SLURM_CASES:
        check_case(tmp_path, name, 4, "SLURMEnvironment", 2)


def test_slurm_two_nodes_ldp_predict_equals_one_process(tmp_path, cli_reference):
    run_dir, job_id = tmp_path / "run", slurm_job_id()
    command = [str(BIN / "ldp-predict"), "trainer.num_nodes=2", "trainer.devices=1", *FAST, f"hydra.run.dir={run_dir}"]
    envs = [clean_env(**slurm_variables(task, 1, 2, job_id)) for task in (0, 1)]
    run_nodes([command, command], envs, tmp_path / "logs")
    check_cli_run(run_dir, tmp_path / "logs", cli_reference)


# -- Lightning's launcher (NODE_RANK on every node; it starts the node's other ranks) ----------------------------


def lightning_node_env(node: int, port: int) -> dict[str, str]:
    return clean_env(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_lightning_launcher_two_nodes_trainer_predict_equals_one_process(tmp_path):
    """Each node's command starts the node's second rank itself (Lightning's script launcher): USP 2 x 2."""
    port, out = free_port(), tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tests.multinode_cases",
        str(out),
        "--cases",
        "usp",
        "--num-nodes",
        "2",
        "--devices",
        "2",
    ]
    run_nodes([command, command], [lightning_node_env(n, port) for n in (0, 1)], tmp_path / "logs")
    check_case(out, "usp", 4, "LightningEnvironment", 2)


def test_lightning_launcher_two_nodes_ldp_predict_equals_one_process(tmp_path, cli_reference):
    port, run_dir = free_port(), tmp_path / "run"
    command = [str(BIN / "ldp-predict"), "trainer.num_nodes=2", "trainer.devices=1", *FAST, f"hydra.run.dir={run_dir}"]
    run_nodes([command, command], [lightning_node_env(n, port) for n in (0, 1)], tmp_path / "logs")
    check_cli_run(run_dir, tmp_path / "logs", cli_reference)


# -- ldp-predict reference --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> dict:
    """``ldp-predict strategy=none`` (one process) with the same small settings."""
    out = tmp_path_factory.mktemp("single")
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["strategy=none", *FAST])
    predict(cfg, out)
    return torch.load(out / "predictions.pt")


def check_cli_run(run_dir: Path, logs: Path, single: dict) -> None:
    """Rank 0 alone wrote the outputs and the config copy; they equal the one-process run."""
    summary = log_tail(logs, 0, 20000)
    assert "ulysses=2" in summary and "2 nodes x 1 rank, across nodes: ulysses" in summary, summary[-2000:]
    assert "layout:" not in log_tail(logs, 1, 20000), "only global rank 0 prints the summary"
    parallel = torch.load(run_dir / "predictions.pt")
    assert parallel["index"].tolist() == single["index"].tolist() == [0, 1, 2, 3]
    assert_exact([parallel["prediction"]], single["prediction"], "ldp-predict on 2 nodes")
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".log") == ["cli.log"]


def test_torchrun_world_that_does_not_match_devices_times_nodes_is_refused_before_any_collective(monkeypatch):
    """torchrun started 4 ranks but the Trainer asks for 2 nodes x 1 device: a ValueError at setup, no rendezvous."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for key, value in {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy=SequenceParallelStrategy(ulysses_degree=2), logger=False
    )
    with pytest.raises(ValueError, match=r"`devices=1` and `num_nodes=2`.*does not match the world size \(4\)"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()
