"""DeepSpeed's JIT-built ops: where their cache lives and the build lock left by a killed build.

torch builds an op under ``$TORCH_EXTENSIONS_DIR/<op>/`` and guards the build with a ``lock``
file that it creates and removes (``torch.utils.file_baton``); it records no owner, so a
process killed while building leaves the file behind and every later build of that op waits on
it forever, silently. :func:`clear_stale_build_locks` runs before DeepSpeed loads its ops:
a lock whose build directory no live process works in (the compiler and ninja run there) for
:data:`QUIET_S` seconds is stale and removed, with a message; a live build is waited for, with
a message, for at most ``timeout`` seconds.

The cache defaults to ``<sys.prefix>/torch_extensions`` (inside the virtual environment): two
checkouts with two environments never rebuild the op against each other.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

QUIET_S = 10.0


def default_cache() -> Path:
    return Path(sys.prefix) / "torch_extensions"


def use_venv_cache() -> None:
    """Point torch's extension cache into this environment unless the user chose one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_cache()))


def cache_root() -> Path:
    """The folder whose subfolders hold one op each (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _build_dirs(root: Path) -> list[Path]:
    """Op build folders: ``<root>/<op>`` or, for torch's default root, ``<root>/<py>_<dev>/<op>``."""
    return sorted({p.parent for p in list(root.glob("*/lock")) + list(root.glob("*/*/lock"))})


def builders(folder: Path) -> list[int]:
    """Pids of live processes (other than this one) whose working directory is ``folder``: ninja
    and the compiler run there while an op builds. Empty where /proc cannot be read."""
    found = []
    target = folder.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if int(proc.name) != os.getpid() and (cwd == target or target in cwd.parents):
            found.append(int(proc.name))
    return found


def lock_state(folder: Path) -> tuple[str, list[int]]:
    """("none" | "building" | "idle", builder pids) of one op folder's lock, as seen right now."""
    if not (folder / "lock").exists():
        return "none", []
    pids = builders(folder)
    return ("building" if pids else "idle"), pids


def clear_stale_build_locks(log=print, *, timeout: float = 1200.0, quiet: float = QUIET_S) -> list[Path]:
    """Remove build locks no live process works behind; wait (with a message) for live builds.
    Returns the removed lock files. TimeoutError naming the lock when a build outlasts ``timeout``."""
    removed: list[Path] = []
    root = cache_root()
    if not root.is_dir():
        return removed
    for folder in _build_dirs(root):
        lock = folder / "lock"
        start = last_busy = time.time()
        said = False
        while lock.exists():
            state, pids = lock_state(folder)
            now = time.time()
            if state == "building":
                last_busy = now
                if not said:
                    log(f"waiting for a DeepSpeed op build in progress in {folder} (pids {pids}); "
                        f"up to {timeout:.0f} s")
                    said = True
                if now - start > timeout:
                    raise TimeoutError(f"{lock}: the op build of pids {pids} has run {now - start:.0f} s; "
                                       "stop it or remove the lock")
            elif now - last_busy >= quiet:
                try:
                    age = now - lock.stat().st_mtime
                    lock.unlink()
                except FileNotFoundError:
                    break
                log(f"removed a stale DeepSpeed op build lock {lock} ({age:.0f} s old, no process building "
                    "there: a build was killed); the op is built again if it is incomplete")
                removed.append(lock)
                break
            time.sleep(0.5)
    return removed


def built_ops() -> set[str]:
    """Names of the ops whose library is in the cache (built once per environment)."""
    root = cache_root()
    return {p.parent.name for p in root.glob("*/*.so")} | {p.parent.name for p in root.glob("*/*/*.so")}


@contextlib.contextmanager
def op_build_message(log=print):
    """Around DeepSpeed's op loading: its "built successfully" line, printed on every load by
    every rank, is dropped; one line says so when an op was really built (rank 0's log)."""
    before = built_ops()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield
    for line in out.getvalue().splitlines():
        if "built successfully" not in line:
            print(line)
    new = sorted(built_ops() - before)
    if new:
        log(f"built DeepSpeed op(s) {', '.join(new)} into {cache_root()} (once for this environment)")
