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


def prepared_synthetic(out: Path, *, n_users: int, shard_samples: int):
    """A small synthetic dataset (2 domains, 40/50 items) prepared under ``out``: (manifest, folder)."""
    from train.config import DataConfig, SyntheticConfig
    from train.data.prepare import load_manifest, prepare

    cfg = DataConfig(out_dir=str(out), shard_samples=shard_samples,
                     synthetic=SyntheticConfig(n_users=n_users, items_per_domain=[40, 50], events_per_domain=[10, 5]))
    prepare(cfg, log=lambda *_: None)
    return load_manifest(cfg.prepared_dir()), cfg.prepared_dir()
