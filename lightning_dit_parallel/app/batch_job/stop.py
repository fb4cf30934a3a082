"""Stop requests from signals: a handler records the signal; the ranks agree on stopping at a batch boundary.

During ``Trainer.predict`` the writer replaces the handlers of the stop signals (by default SIGTERM and SIGINT; add
SLURM's pre-termination signal, e.g. ``SIGUSR1`` with ``sbatch --signal=USR1@120``). Lightning's own SIGTERM handler
is replaced for that time: it would run a collective inside the handler, on one rank only, and let the prediction
loop carry on. A first signal only records the request: the current batch finishes, its samples are written and
every rank raises ``PredictionInterrupted`` after the same batch. A second signal of the same kind stops the process
at once (the current batch is abandoned; its peers fail within the strategy's timeout).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

#: Signals that request a stop unless configured otherwise.
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT")


class PredictionInterrupted(RuntimeError):
    """A stop signal ended ``Trainer.predict``; the samples of every finished batch are on disk.

    Attributes:
        signum: the signal that requested the stop.
        exit_code: ``128 + signum``, the shell's code for a process ended by that signal.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def parse_signals(names: Sequence[str | int]) -> tuple[signal.Signals, ...]:
    """``["SIGTERM", "USR1", 2]`` -> signals; ``ValueError`` naming the unknown ones (and SIGKILL/SIGSTOP)."""
    parsed, bad = [], []
    for name in names:
        try:
            if isinstance(name, int):
                parsed.append(signal.Signals(name))
            else:
                key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
                parsed.append(signal.Signals[key])
        except (KeyError, ValueError):
            bad.append(name)
    bad += [s.name for s in parsed if s in (signal.SIGKILL, signal.SIGSTOP)]
    if bad:
        raise ValueError(f"stop_signals: unknown or uncatchable signals {bad}; e.g. ['SIGTERM', 'SIGINT', 'SIGUSR1'].")
    return tuple(dict.fromkeys(parsed))


class StopSignals:
    """Installs handlers that record a stop request; ``restore`` puts the previous handlers back.

    Args:
        signals: the signals that request a stop.
    """

    def __init__(self, signals: Sequence[str | int] = DEFAULT_SIGNALS) -> None:
        self.signals = parse_signals(signals)
        self.received: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Take over the signals (only possible in the main thread; elsewhere nothing is installed). Already
        installed: a signal received since is kept, and ours are put back where someone replaced them since
        (Lightning installs its SIGTERM handler when ``Trainer.predict`` starts)."""
        if self.installed:
            for signum in self._previous:
                if signal.getsignal(signum) != self._handle:
                    signal.signal(signum, self._handle)
            return
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def hand_back_through(self, recorded: dict) -> None:
        """``recorded``: handlers someone saved while ours were installed, to put back later (Lightning's signal
        connector saves every handler when ``Trainer.predict`` starts and restores them at its teardown, after ours
        were restored); ours there are replaced by the handlers ours replaced, so that ours do not come back."""
        for signum, previous in self._previous.items():
            if recorded.get(signum) == self._handle:
                recorded[signum] = previous

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # the second one: stop now
            raise PredictionInterrupted(
                f"Stopped at once by a second {signal.Signals(signum).name}; the batch in progress is abandoned.",
                signum,
            )
        if self.received is None:
            self.received = signum


def stand_down_launcher_watchdog() -> None:
    """After a stop every rank agreed on: keep Lightning's script launcher from killing the job.

    In the launching process (local rank 0), Lightning's launcher runs a thread that kills every process of the job,
    itself included (SIGKILL), within 5 s of a child process exiting with a non-zero code. After an agreed stop every
    rank exits with 128 + signal on its own; a child that exits first would otherwise get the launching process
    killed while it still writes its last files and messages (exit code -9 instead of 128 + signal). Elsewhere (no
    such thread: torchrun, SLURM, another rank) nothing happens.
    """
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_terminate_all"):
            thread._run = lambda: True  # type: ignore[attr-defined]  # its next check ends the thread quietly
            thread._terminate_all = lambda: None  # type: ignore[attr-defined]
