"""The Ray Data engine of ``xdrec prepare`` (train/data/ray_prepare.py) against the in-process one:
the same samples (samples_sha256 per domain and split), reports and id maps on real Amazon slices
of both pairs and on a generated table that turns every filter on with a temporal split and a
target fraction; bad input as one line; a worker killed mid-prepare leaves nothing half-written.
One local Ray (2 CPUs) serves the module."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import abxi_slice
from train.config import DataConfig, FilterConfig, TableConfig
from train.data.formats import DataFormatError
from train.data.inspect import verify
from train.data.prepare import load_manifest, prepare
from train.data.ray_prepare import KILL_ENV

SAME = ("counts", "read", "filtered", "split", "target_fraction", "n_users", "n_events", "domains")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _both(cfg: DataConfig, tmp: Path) -> tuple[dict, dict, Path, Path]:
    """Prepare ``cfg`` with each engine into its own folder: (local manifest, ray manifest, folders)."""
    out = {}
    for engine in ("local", "ray"):
        c = replace(cfg, engine=engine, out_dir=str(tmp / engine))
        prepare(c, log=lambda *_: None)
        out[engine] = c.prepared_dir()
    return load_manifest(out["local"]), load_manifest(out["ray"]), out["local"], out["ray"]


def _assert_same(a: dict, b: dict, fa: Path, fb: Path) -> None:
    for key in SAME:
        assert a.get(key) == b.get(key), key
    assert (a["engine"], b["engine"]) == ("local", "ray")
    for name in ("item_map.json", "user_map.json"):
        assert (fa / name).read_bytes() == (fb / name).read_bytes(), name
    verify(fb)  # every shard's sha256 and count, every split's samples_sha256 recomputed from the shards


@pytest.mark.parametrize("pair", ["amazon-food-kitchen", "amazon-beauty-electronics"])
def test_both_engines_give_the_same_samples_on_real_slices(ray_local, pair, tmp_path):
    names = ["food", "kitchen"] if pair == "amazon-food-kitchen" else ["beauty", "electronics"]
    cfg = DataConfig(name="pair", format="abxi", path=str(abxi_slice(tmp_path / "raw", pair, n_lines=300)),
                     domains=names, source=names[0], target=names[1], shard_samples=64)
    a, b, fa, fb = _both(cfg, tmp_path)
    _assert_same(a, b, fa, fb)
    assert a["counts"][names[1]]["test"]["samples"] > 0


def _table(path: Path, seed: int = 0, n: int = 3000) -> None:
    """Events with ties in time, repeats, low ratings, numeric and other ids, two domains."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 400, n)
    doms = rng.integers(0, 2, n)
    items = rng.integers(0, 200, n)
    rows = ["user,item,ts,dom,stars"]
    for u, d, i, t, r in zip(users, doms, items, rng.integers(0, 400, n), rng.integers(0, 6, n)):
        user = str(u) if u % 3 else f"u{u}"
        rows.append(f"{user},{'ab'[d]}{i},{t},{'ab'[d].upper()},{r}")
    path.write_text("\n".join(rows) + "\n")


def test_both_engines_agree_with_every_filter_a_temporal_split_and_a_target_fraction(ray_local, tmp_path):
    _table(tmp_path / "events.csv")
    cfg = DataConfig(name="t", format="table", path=str(tmp_path / "events.csv"), domains=["A", "B"],
                     source="A", target="B", shard_samples=20, split="temporal", split_quantiles=[0.7, 0.85],
                     target_fraction=0.5, target_fraction_seed=3,
                     table=TableConfig(user="user", item="item", timestamp="ts", domain="dom", rating="stars"),
                     filter=FilterConfig(min_rating=2, duplicates="last", user_core=2, item_core=3, last_n=6,
                                         min_events=4, tie_break="item"))
    a, b, fa, fb = _both(cfg, tmp_path)
    _assert_same(a, b, fa, fb)
    assert [r["events_removed"] > 0 for r in a["filtered"]] == [True] * 5  # every filter did something
    assert a["target_fraction"]["users_dropped"] > 0 and a["split"]["users_with_test"] > 0


def test_bad_input_is_one_line_with_the_ray_engine(ray_local, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,dom\n1,a1,A\n")
    cfg = DataConfig(name="bad", format="table", path=str(bad), domains=["A", "B"], source="A", target="B",
                     engine="ray", out_dir=str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match=rf"^{bad}:2: no field 'timestamp' \(data.table.timestamp\)"):
        prepare(cfg, log=lambda *_: None)
    _table(tmp_path / "ok.csv", n=200)
    cfg = replace(cfg, path=str(tmp_path / "ok.csv"), table=TableConfig(timestamp="ts", domain="dom"),
                  filter=FilterConfig(min_events=10_000))
    with pytest.raises(DataFormatError, match=r"the filters removed every event \(users with < 10000 events: -"):
        prepare(cfg, log=lambda *_: None)
    assert not cfg.prepared_dir().exists()


def test_a_worker_killed_mid_prepare_leaves_no_half_written_dataset(ray_local, tmp_path, monkeypatch):
    cfg = DataConfig(name="pair", format="abxi", path=str(abxi_slice(tmp_path / "raw", n_lines=300)),
                     domains=["food", "kitchen"], source="food", target="kitchen", shard_samples=16)
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    a, b, fa, fb = _both(cfg, tmp_path)
    assert marker.exists()  # a shard writer did die, with a closed shard of its own on disk
    _assert_same(a, b, fa, fb)  # its task ran again; the dataset is whole
    listed = {sh["path"] for splits in b["shards"].values() for shards in splits.values() for sh in shards}
    on_disk = {str(p.relative_to(fb)) for p in fb.rglob("*.tar")}
    assert on_disk == listed  # the dead writer's shard did not stay
    assert not (fb / "_parts").exists() and not fb.with_name(fb.name + ".tmp").exists()
    assert json.loads((fb / "manifest.json").read_text())["engine"] == "ray"


def test_the_command_line_prepares_on_ray_and_says_so(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "train.cli", "prepare", "configs/experiment/demo.yaml",
                          f"data.out_dir={tmp_path}", "data.synthetic.n_users=150", "--engine", "ray"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "prepared synthetic (ray engine): read " in out.stdout + out.stderr
    assert load_manifest(tmp_path / "synthetic")["engine"] == "ray"


def test_the_ray_engine_without_ray_installed_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"engine='ray' needs Ray Data, which is not installed: pip install"):
        DataConfig(engine="ray").check()
