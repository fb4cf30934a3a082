"""The streaming writer at scale: peak memory of global rank 0 against the number of samples, and the writer's share
of the prediction loop.

Runs ``ldp-predict`` (embedded digits DiT, 2 CPU processes, one thread each) for each sample count, data parallel
(``strategy.ulysses_degree=1``: dp=2, so both ranks write) or with the default Ulysses 2 (``--layout ulysses``). Every
rank process records at exit (this file is also its entry point, chosen by ``$LDP_BENCH_WRITER_OUT``, which the ranks
Lightning starts inherit): ``VmHWM`` (peak resident bytes over the whole run), the prediction loop's wall time, the
time the writer's thread spent writing files and manifest lines (``thread s``, overlapping the next batch), the time
the loop spent in the writer (``loop-side s``: checks, copies, waiting for the thread; the writer's share of the run),
the time in the per-batch agreement round (which includes waiting for the other data-parallel group), and rank 0's
time collecting ``predictions.pt`` and ``grid.png`` at the end.

    python bench/writer.py                        # 100 and 1000 samples, 25 steps; about 3 minutes on 2 cores
    python bench/writer.py --samples 100 300 --steps 5
    python bench/writer.py --collect false        # no ordered predictions.pt / grid.png at the end
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT_VARIABLE = "LDP_BENCH_WRITER_OUT"


def _rank_entry() -> None:
    """Inside ``ldp-predict`` (every rank): time the writer's hooks and record the figures at exit."""
    from lightning_dit_parallel.app import cli
    from lightning_dit_parallel.app.batch_job import StreamingPredictionWriter
    from lightning_dit_parallel.utils.memory import peak_rss

    figures: dict = {}
    start, end, finish = (
        StreamingPredictionWriter.on_predict_start,
        StreamingPredictionWriter.on_predict_end,
        StreamingPredictionWriter.finish,
    )

    def timed_start(self, trainer, pl_module):
        start(self, trainer, pl_module)
        figures["t0"] = time.perf_counter()

    def timed_end(self, trainer, pl_module):
        figures.update(
            loop_s=time.perf_counter() - figures["t0"],
            write_s=self.write_seconds,
            hook_s=self.hook_seconds,
            round_s=self.round_seconds,
            written=self.written,
        )
        end(self, trainer, pl_module)

    def timed_finish(self):
        t0 = time.perf_counter()
        files = finish(self)
        figures["finish_s"] = time.perf_counter() - t0
        return files

    StreamingPredictionWriter.on_predict_start = timed_start
    StreamingPredictionWriter.on_predict_end = timed_end
    StreamingPredictionWriter.finish = timed_finish

    def record() -> None:
        rank = int(os.environ.get("LOCAL_RANK", 0))
        figures.pop("t0", None)
        path = Path(os.environ[OUT_VARIABLE]) / f"rank{rank}.json"
        path.write_text(json.dumps({"rank": rank, "peak": peak_rss(), **figures}))

    atexit.register(record)
    cli.main()


def run(samples: int, steps: int, layout: str, collect: str, foreground: bool, work: Path) -> list[dict]:
    out = work / f"figures-{samples}"
    out.mkdir()
    overrides = [
        f"data.dataset.num_samples={samples}",
        f"model.num_inference_steps={steps}",
        "data.batch_size=10",
        f"writer.collect={collect}",
        f"output_dir={work / f'run-{samples}'}",
        "writer.progress=false",
    ]
    if layout == "dp":
        overrides.append("strategy.ulysses_degree=1")
    if foreground:
        overrides.append("writer.background=false")
    env = dict(os.environ, OMP_NUM_THREADS="1", **{OUT_VARIABLE: str(out)})
    result = subprocess.run([sys.executable, __file__, *overrides], cwd=work, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--layout", choices=["dp", "ulysses"], default="dp")
    parser.add_argument("--collect", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--foreground", action="store_true", help="write in the loop (writer.background=false)")
    args = parser.parse_args()
    print(
        f"digits DiT, 2 processes x 1 thread, layout {args.layout}, {args.steps} steps, batch 10, "
        f"collect={args.collect}, {'foreground' if args.foreground else 'background'} writes"
    )
    print(
        f"{'samples':>8} {'rank':>4} {'peak MiB':>9} {'loop s':>8} {'thread s':>8} {'loop-side s':>11} "
        f"{'share':>7} {'round s':>8} {'round %':>8} {'collect s':>9}"
    )
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for samples in args.samples:
            for r in run(samples, args.steps, args.layout, args.collect, args.foreground, Path(tmp)):
                loop = r.get("loop_s", float("nan"))
                print(
                    f"{samples:>8} {r['rank']:>4} {r['peak'] / 2**20:>9.1f} {loop:>8.2f} {r.get('write_s', 0):>8.3f} "
                    f"{r.get('hook_s', 0):>11.3f} {100 * r.get('hook_s', 0) / loop:>6.2f}% {r.get('round_s', 0):>8.3f} "
                    f"{100 * r.get('round_s', 0) / loop:>7.2f}% {r.get('finish_s', float('nan')):>9.3f}"
                )
                if r["rank"] == 0:
                    peaks[samples] = r["peak"]
    first, last = min(peaks), max(peaks)
    print(
        f"rank 0 peak: {peaks[last] / 2**20:.1f} MiB for {last} samples vs {peaks[first] / 2**20:.1f} MiB for "
        f"{first} ({(peaks[last] - peaks[first]) / 2**20:+.1f} MiB)"
    )


if __name__ == "__main__":
    if os.environ.get(OUT_VARIABLE):
        _rank_entry()
    else:
        main()
