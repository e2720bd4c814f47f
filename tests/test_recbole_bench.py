"""bench/recbole_sasrec.py's split: RecBole's pre-split files hold exactly what xdrec's
target-only stage trains on and ranks (RecBole itself runs in its own venv, bench/recbole.sh)."""
import importlib.util
from pathlib import Path

import numpy as np

from conftest import prepared_synthetic
from train.data.stream import eval_batches, train_batches

REPO = Path(__file__).resolve().parents[1]


def test_recbole_files_are_the_target_only_split(tmp_path):
    spec = importlib.util.spec_from_file_location("recbole_sasrec", REPO / "bench" / "recbole_sasrec.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m, folder = prepared_synthetic(tmp_path / "data", n_users=60, shard_samples=25)
    counts = bench.write_benchmark(folder, "B", tmp_path / "rb" / "x", max_len=8)
    rows = lambda split: [ln.split("\t") for ln in (tmp_path / "rb" / "x" / f"x.{split}.inter").read_text().splitlines()[1:]]
    # every training target of xdrec's target-only stream is one RecBole row (its history up to max_len)
    targets = sum(int((b["targets"] > 0).sum()) for b in train_batches(m, folder, "B", batch_size=16, max_len=8, seed=0,
                                                                       epoch=0, buffer=0, only_domain=True))
    assert counts["train"] == len(rows("train")) == targets
    lo = m["domains"][1]["offset"]
    assert all(int(t) > lo and all(int(i) > lo for i in h.split()) for _, h, t in rows("train"))
    for split in ("valid", "test"):
        want = {int(u): (list(i[i > 0]), int(t)) for b in eval_batches(m, folder, "B", split, batch_size=16, max_len=8,
                                                                       only_domain=True)
                for u, i, t in zip(b["user"].tolist(), b["items"].numpy(), b["target"].tolist())}
        got = {int(u): ([int(x) for x in h.split()], int(t)) for u, h, t in rows(split)}
        assert got == {u: v for u, v in want.items() if v[0]} and np.mean([len(h) for h, _ in got.values()]) > 1
