"""Files that must survive a crash: atomic writes, disk-full errors that name the path, and the
fault points the fault tests stop a process at.

- :func:`write_atomic` writes a temporary file beside the target, fsyncs it and renames it over
  the target: a reader sees the old file or the new one, never a torn one.
- A write that fails for want of space (ENOSPC, EDQUOT) raises :class:`DiskFullError`, one line
  naming the path and the free space left; the target is left as it was.
- :func:`fault_point` is a no-op unless ``XDREC_FAULT`` names the point: then the process kills
  itself there (``kill:<point>[@n]``, the n-th time it is reached), the write fails with
  ENOSPC (``enospc:<point>[@n]``), or the point returns True (``nan:<point>[@n]``: the training
  loss of that batch becomes NaN at ``train.loss``, its gradient infinite at ``train.grad``). ``XDREC_FAULT_RANK`` (default: every rank) limits it to one
  rank. Points are named ``<what>.<phase>``, e.g. ``ckpt.rng``, ``metrics.json``, ``train.loss``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_reached: dict[str, int] = {}


class DiskFullError(OSError):
    """No space (or quota) left while writing ``path``; the message names it and the free space."""

    def __init__(self, path: str | Path, detail: str = ""):
        self.path = Path(path)
        super().__init__(errno.ENOSPC, f"no space left on device writing {self.path} "
                                       f"({free_space(self.path)} free there){detail}")

    def __str__(self) -> str:
        return self.args[1]


def free_space(path: str | Path) -> str:
    """Free space of the file system holding ``path`` (its nearest existing parent), e.g. '12.0 MiB'."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return human_bytes(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def disk_is_full(folder: str | Path, probe_bytes: int = 1 << 20) -> bool:
    """True when ``probe_bytes`` more cannot be written in ``folder`` (for writers, such as
    torch.save, whose errors carry no errno)."""
    probe = Path(folder) / f".xdrec-space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return is_disk_full(e)
    finally:
        probe.unlink(missing_ok=True)


def fault_point(name: str) -> bool:
    """Fail here as ``XDREC_FAULT`` asks (see the module docstring); otherwise nothing (False)."""
    spec = os.environ.get("XDREC_FAULT")
    if not spec:
        return False
    want_rank = os.environ.get("XDREC_FAULT_RANK")
    if want_rank is not None and want_rank != os.environ.get("RANK", "0"):
        return False
    action, _, where = spec.partition(":")
    point, _, nth = where.partition("@")
    if point != name:
        return False
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return False
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return action == "nan"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, point: str | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename. ``point``: the
    fault point reached after the temporary file is complete, before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if point:
            fault_point(point)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(path, f"; {path.name} was left as it was") from None
        raise
    fsync_dir(path.parent)


def _nonfinite_path(obj, where: str = "") -> str | None:
    """The key path of the first NaN or infinite float in ``obj`` (None if there is none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<top>"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _nonfinite_path(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


class NonFiniteValue(ValueError):
    """A record to be written holds NaN or an infinity; the message names the key."""


def finite_json(obj, *, what: str, indent: int | None = 1) -> str:
    """``json.dumps`` that refuses NaN and infinities (strict JSON), naming the first such key."""
    bad = _nonfinite_path(obj)
    if bad:
        raise NonFiniteValue(f"{what}: {bad} is not a finite number; not written")
    return json.dumps(obj, indent=indent, allow_nan=False)
