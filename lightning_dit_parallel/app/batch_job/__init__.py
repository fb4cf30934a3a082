"""Batch generation that streams to disk, resumes after an interruption and stops cleanly on a signal.

- ``writer.StreamingPredictionWriter``: writes every sample as its batch finishes (one rank per data-parallel group,
  each file atomically), records finished samples in a JSON-lines manifest per writing rank, agrees on stop
  requests at batch boundaries and reports progress on rank 0.
- ``manifest``: the output folder's ``run.json`` (configuration fingerprint) and manifests, read without unpickling.
- ``resume``: the samples still to do, as a ``DataLoader`` over the remaining global indices.
- ``stop``: SIGTERM / SIGINT (and SLURM's pre-termination signal) handlers that request a stop instead of exiting.
"""

from lightning_dit_parallel.app.batch_job.manifest import RunConfigMismatch
from lightning_dit_parallel.app.batch_job.stop import PredictionInterrupted
from lightning_dit_parallel.app.batch_job.writer import StreamingPredictionWriter

__all__ = ["PredictionInterrupted", "RunConfigMismatch", "StreamingPredictionWriter"]
