"""Shared fixtures: paths to the real data slices and small generated data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XDREC_SHARED_DATA", REPO.parent / "shared" / "data"))


def abxi_slice(dst: Path, dataset: str = "amazon-food-kitchen", n_lines: int = 200) -> Path:
    """Copy the first ``n_lines`` users of a real ABXI dataset (and its item map) into ``dst``."""
    src = SHARED_DATA / dataset
    assert src.is_dir(), f"real data not found at {src} (set XDREC_SHARED_DATA)"
    dst.mkdir(parents=True, exist_ok=True)
    seq = next(src.glob("*_preprocessed.txt"))
    with seq.open() as f, (dst / seq.name).open("w") as g:
        for k, line in enumerate(f):
            if k >= n_lines:
                break
            g.write(line)
    mp = next(src.glob("map_item_*.txt"))
    shutil.copy(mp, dst / mp.name)
    return dst


@pytest.fixture
def fk_slice(tmp_path) -> Path:
    return abxi_slice(tmp_path / "afk")
