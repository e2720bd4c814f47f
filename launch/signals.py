"""Stop signals. SIGUSR1 (e.g. Slurm's ``--signal=USR1@<s>``: a preemption), and during training
SIGINT (Ctrl-C) and SIGTERM, ask the trainer to write a resume checkpoint at the next optimizer
step and exit cleanly. The same SIGINT or SIGTERM again exits at once, without a checkpoint (a
SIGTERM after a SIGINT does not: torchrun forwards a Ctrl-C to its workers as SIGTERM)."""
from __future__ import annotations

import os
import signal
import sys

_requested: int | None = None  # the first stop signal received


def _handler(signum, frame) -> None:
    global _requested
    if signum == _requested and signum in (signal.SIGINT, signal.SIGTERM):
        print(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    if _requested is None and signum != signal.SIGUSR1 and os.environ.get("RANK", "0") == "0":
        print(f"\n{signal.Signals(signum).name}: stopping at the next optimizer step with a checkpoint "
              "(again to exit at once)", file=sys.stderr, flush=True)
    _requested = signum if _requested is None else _requested


def install(signals=(signal.SIGUSR1,)) -> None:
    for s in signals:
        signal.signal(s, _handler)


def install_interrupts() -> None:
    """Ctrl-C and SIGTERM stop training like a preemption (call once training is what runs)."""
    install((signal.SIGINT, signal.SIGTERM))


def stop_requested() -> bool:
    return _requested is not None


def requested() -> int:
    """The signal number that asked to stop (0: none)."""
    return int(_requested or 0)
