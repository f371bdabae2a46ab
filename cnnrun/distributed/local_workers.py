"""Start N copies of a command as local worker processes and supervise them until every one has finished.

For engines whose framework joins processes it did not start itself (TensorFlow's ``TF_CONFIG`` workers): each
worker gets its own environment (its rank) and shares the launcher's stdout and stderr. Ctrl-C or SIGTERM on the
launcher is passed to every worker, which stops cleanly at its next sync point (state saved once, by rank 0). A
worker that fails makes the others pointless (their next collective would wait for it), so they get SIGTERM at
once. Workers still running ``SHUTDOWN_TIMEOUT_S`` seconds after being told to stop are killed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from cnnrun.distributed.launch import die_with_parent, left_interrupted
from cnnrun.errors import TrainingInterrupted

# Seconds workers have after SIGTERM (or a passed-on Ctrl-C) to reach a sync point, save once and end the
# MLflow run, before SIGKILL.
SHUTDOWN_TIMEOUT_S = 60
INTERRUPTED = TrainingInterrupted.exit_code


@dataclass
class Outcome:
    signal: Optional[str] = None  # the signal that stopped the launcher, if one did
    failures: Dict[int, int] = field(default_factory=dict)  # rank → exit code (negative: killed by that signal)

    @property
    def interrupted(self) -> bool:
        return left_interrupted(self.failures.values())

    def describe(self) -> str:
        parts = [f"rank {rank} was killed by {signal.Signals(-code).name}" if code < 0 else
                 f"rank {rank} exited with code {code}" for rank, code in sorted(self.failures.items())]
        return "training failed: " + "; ".join(parts) + " (its messages are above); the other ranks were stopped"


def run_workers(command: Sequence[str], environments: List[Dict[str, str]],
                timeout: float = SHUTDOWN_TIMEOUT_S) -> Outcome:
    """Run ``command`` once per environment (rank = position) and wait for all of them."""
    outcome = Outcome()
    # Each worker (or the mpiexec that starts the ranks) is told to stop when the launcher dies, even by SIGKILL.
    # Sessions of their own: a terminal's Ctrl-C reaches the launcher alone, which passes it on once.
    workers = [subprocess.Popen(list(command), env=env, preexec_fn=die_with_parent, start_new_session=True)
               for env in environments]
    stopping: Optional[float] = None  # when the workers were told to stop

    def stop(signum, frame):
        nonlocal stopping
        outcome.signal = outcome.signal or signal.Signals(signum).name
        stopping = stopping or time.monotonic()
        _signal_running(workers, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(worker.poll() is None for worker in workers):
            # An interrupted worker (130) is not a failure: the others stop after the same step by themselves.
            first_failure = stopping is None and any(w.returncode not in (None, 0, INTERRUPTED) for w in workers)
            if first_failure:
                stopping = time.monotonic()
                _signal_running(workers, signal.SIGTERM)
            if stopping is not None and time.monotonic() - stopping > timeout:
                _signal_running(workers, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_running(workers, signal.SIGKILL)  # no worker outlives the launcher, however it leaves
        for worker in workers:
            worker.wait()
    outcome.failures = {rank: w.returncode for rank, w in enumerate(workers) if w.returncode}
    return outcome


def _signal_running(workers: List[subprocess.Popen], sig: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(sig)
