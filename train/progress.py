"""Progress bars on rank 0 at a terminal (tqdm); None elsewhere, where the logs keep their plain
lines. ``XDREC_PROGRESS=0`` turns them off."""
from __future__ import annotations

import os
import sys


def bar(desc: str, total: int | None, unit: str, initial: int = 0):
    """A tqdm bar, or None off rank 0, when stderr is not a terminal, or with XDREC_PROGRESS=0."""
    from train.engine import rank

    if rank() != 0 or not sys.stderr.isatty() or os.environ.get("XDREC_PROGRESS") == "0":
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
