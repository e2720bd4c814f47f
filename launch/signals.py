"""Preemption signals: SIGUSR1 (e.g. Slurm's ``--signal=USR1@<s>``) asks the trainer to write a
resume checkpoint at the next step boundary and exit cleanly."""
from __future__ import annotations

import signal

_requested = False


def _handler(signum, frame) -> None:
    global _requested
    _requested = True


def install(signals=(signal.SIGUSR1,)) -> None:
    for s in signals:
        signal.signal(s, _handler)


def stop_requested() -> bool:
    return _requested
