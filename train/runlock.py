"""One run, one writer: ``runs/<name>/.lock``, held by rank 0 for the run's whole life.

The lock is an ``flock`` on the file (released by the kernel when the holder dies, on the same
host) plus the holder's identity written in it (host, pid, Slurm job, start time) and a heartbeat
(its mtime, touched every :data:`HEARTBEAT_S`). A second run of the same name is refused, naming
the holder. A lock left by a dead process is taken over with a message: on this host the free
``flock`` proves the holder gone; a lock written on another host (whose ``flock`` a shared file
system may not carry) is stale once its heartbeat is older than :data:`STALE_S`, or at once when
it is this Slurm job's own (a requeued job is the same run).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunLocked(RuntimeError):
    """Another live process holds the run's lock; the message names it."""


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _who(info: dict) -> str:
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')}{job}, started {info.get('started', '?')}"


def open_lock_file(path: Path) -> int:
    """The lock file's descriptor, created if absent; never through a symbolic link (a link planted
    there would make xdrec truncate whatever it points to): RunLocked naming it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunLocked(f"{path} is a symbolic link; xdrec does not follow links for its locks: remove it") from None
        raise


class RunLock:
    """``acquire()`` or :class:`RunLocked`; ``release()`` at the end (also on errors)."""

    def __init__(self, run_dir: Path, log=print):
        self.path = Path(run_dir) / ".lock"
        self.log = log
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _holder(self._read(fd))
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another run ({_who(info)}); wait for it to "
                            "finish, or give this run another name") from None
        try:
            self._check_foreign(fd)
        except RunLocked:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="xdrec-run-lock", daemon=True)
        self._beat.start()

    def _check_foreign(self, fd: int) -> None:
        """We hold the flock: what the file still names is a dead holder, or a live one on another
        host whose flock this file system did not carry (then its heartbeat is fresh)."""
        text = self._read(fd)
        if not text.strip():
            return
        info = _holder(text)
        age = time.time() - os.fstat(fd).st_mtime
        here = info.get("host") == socket.gethostname()
        same_job = info.get("slurm_job") and info.get("slurm_job") == os.environ.get("SLURM_JOB_ID")
        if not here and not same_job and age < STALE_S:
            raise RunLocked(f"{self.path.parent} is in use by another run ({_who(info)}; its lock was renewed "
                            f"{age:.0f} s ago); wait for it to finish, or give this run another name")
        why = ("no longer running" if here else "this Slurm job's earlier start" if same_job
               else f"no heartbeat for {age:.0f} s")
        self.log(f"taking over the stale lock {self.path} of {_who(info)} ({why})")

    @staticmethod
    def _read(fd: int) -> str:
        return os.pread(fd, 4096, 0).decode(errors="replace")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds the run
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class DataLock:
    """A prepared data folder's lock, ``<out_dir>/.<name>.lock`` (beside the folder, which prepare
    replaces): every run reading the folder holds it shared for its life, ``prepare`` exclusively.
    So a run never trains on shards another experiment of the same ``data.name`` is rewriting."""

    def __init__(self, folder: Path, log=print):
        folder = Path(folder)
        self.folder, self.path, self.log = folder, folder.with_name(f".{folder.name}.lock"), log
        self._fd: int | None = None

    def shared(self) -> "DataLock":
        """Hold the folder for reading (waiting, with a message, while another process prepares it)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            self.log(f"waiting for {self.folder}: another xdrec process is preparing it ({_who(_holder(RunLock._read(fd)))})")
            fcntl.flock(fd, fcntl.LOCK_SH)
        return self

    def exclusive(self) -> "DataLock":
        """Hold the folder for writing, or RunLocked when another process reads or prepares it."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunLocked(f"{self.folder} is in use by another xdrec process (a run training on it, or a prepare) "
                            "and this data config would prepare it again: give this experiment another data.name, "
                            "or wait for that process to finish") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return self

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = open_lock_file(self.path)
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
