"""Domains are data: any number of domains, several sources, a target list or every domain a target
(`data.target: all`), each target scored against its own target-only baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_cli import REPO, one_error_line, xdrec

THREE = ["data.name=syn3", "data.domains=[A,B,C]", "data.synthetic.items_per_domain=[80,80,80]",
         "data.synthetic.events_per_domain=[16,6,10]", "train.source.epochs=1", "train.joint.epochs=1",
         "train.target_only.epochs=1"]


def three(tmp, *extra, name="t3"):
    return ["train", "configs/experiment/tiny.yaml", f"runs_dir={tmp / 'runs'}", f"data.out_dir={tmp / 'data'}",
            f"name={name}", *THREE, *extra]


@pytest.fixture(scope="module")
def sources_a_c(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d3")
    p = xdrec(*three(tmp, "data.source=[A,C]", "data.target=B"))
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, p


def test_two_sources_one_target_trains_scores_every_domain_and_reports_the_target_transfer(sources_a_c):
    tmp, p = sources_a_c
    run = tmp / "runs" / "t3"
    m = json.loads((run / "metrics.json").read_text())
    assert sorted(m["source"]["test"]) == ["A", "C"] and sorted(m["joint"]["test"]) == ["A", "B", "C"]
    assert sorted(m["target_only"]["test"]) == ["B"]
    assert m["transfer"]["domain"] == "B" and {"full", "sampled999"} <= set(m["transfer"])
    assert "source A, C -> target B" in p.stdout and "B NDCG@10, full: source-then-joint" in p.stdout
    assert "[source] 2 A, C train shards" in p.stdout  # the source stage pretrains on both sources
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seen = {k.split("ce_")[1] for r in log for k in r if k.startswith("joint/ce_")}
    assert seen == {"A", "B", "C"}  # the joint loss has a term per domain


def test_an_export_of_a_three_domain_run_recommends_for_a_source_and_repeats_its_metrics(sources_a_c):
    from train.export import evaluate_exported, recommendations

    tmp, _ = sources_a_c
    run = tmp / "runs" / "t3"
    assert xdrec("export", str(run), "--stage", "joint").returncode == 0
    ours = evaluate_exported(run / "export-joint", splits=("test",))["test"]
    want = json.loads((run / "metrics.json").read_text())["joint"]["test"]
    assert sorted(ours) == ["A", "B", "C"]
    for d in ours:
        assert ours[d]["full"]["ndcg@10"] == pytest.approx(want[d]["full"]["ndcg@10"], abs=1e-9)
    top = recommendations(run / "export-joint", "C", ["d0-i1", "d2-i3", "d1-i5"], k=5)
    assert len(top) == 5 and all(item.startswith("d2-") for item, _ in top)  # C's items, the data's own ids


def test_every_domain_a_target_trains_one_joint_model_and_a_baseline_and_transfer_per_domain(tmp_path):
    p = xdrec(*three(tmp_path, "data.source=[A,C]", "data.target=all"))
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "t3"
    m = json.loads((run / "metrics.json").read_text())
    assert {"target_only-A", "target_only-B", "target_only-C", "source", "joint"} <= set(m)
    assert all(sorted(m[f"target_only-{d}"]["test"]) == [d] for d in "ABC")
    assert sorted(m["transfer"]) == ["A", "B", "C"] and m["transfer"]["C"]["domain"] == "C"
    assert (run / "target_only-B" / "checkpoints" / "best").is_dir()
    assert "[joint] 3 A, B, C train shards" in p.stdout  # one stream of every domain, no separate source rows
    for d in "ABC":
        assert (run / "plots" / f"transfer-{d}.png").is_file()
    report = xdrec("report", str(run))
    assert report.returncode == 0 and all(f"transfer {d} full ndcg@10" in report.stdout for d in "ABC")
    line = one_error_line(xdrec("export", str(run), "--stage", "target_only"))
    assert "has a baseline per target domain ['A', 'B', 'C']; name one with --domain" in line
    assert xdrec("export", str(run), "--stage", "target_only", "--domain", "C").returncode == 0
    info = json.loads((run / "export-target_only-C" / "domains.json").read_text())
    assert info["unit"] == "target_only-C" and info["evaluated"] == ["C"] and info["input"] == "own_domain"
    again = xdrec(*three(tmp_path, "data.source=[A,C]", "data.target=all"), "--resume", "auto")
    assert again.returncode == 0 and again.stdout.count("finished in the run being resumed") == 5


@pytest.mark.parametrize("override, expected", [
    (["data.source=[A,B]", "data.target=B"], "data.source and data.target are both 'B'"),
    (["data.source=[A,Z]", "data.target=B"], "data.source='Z' is not one of data.domains"),
    (["data.source=[]", "data.target=B"], "data.source names no domain"),
    (["data.source=A", "data.target=[B,C]", "data.target_fraction=0.5"], "target_fraction=0.5 shrinks one target"),
    (["data.source=A", "data.target=B", "train.joint.domain_weights={Q: 2}"], "domain_weights: 'Q' is not one of"),
])
def test_domain_roles_are_checked_before_any_work(tmp_path, override, expected):
    assert expected in one_error_line(xdrec(*three(tmp_path, *override)))
    assert not (tmp_path / "data").exists()


def test_the_joint_weights_are_per_domain_and_a_stream_of_several_domains_labels_rows_by_their_shard(tmp_path):
    from train.config import load_config
    from train.data.prepare import load_manifest, prepare
    from train.data.stream import train_batches, vocabulary
    from train.stages import StageData

    cfg = load_config(REPO / "configs/experiment/tiny.yaml",
                      [f"data.out_dir={tmp_path}", *THREE, "data.source=[A,C]", "data.target=B",
                       "train.joint.source_weight=0.5", "train.joint.domain_weights={C: 0.25}"])
    prepare(cfg.data, log=lambda *_: None)
    m, folder = load_manifest(cfg.data.prepared_dir()), cfg.data.prepared_dir()
    assert StageData("joint", cfg, m, folder, 1).weights() == [0.5, 1.0, 0.25]
    assert StageData("source", cfg, m, folder, 1).weights() == [1.0, 0.0, 1.0]  # train.source's own weights
    assert StageData("target_only", cfg, m, folder, 1).weights() == [0.0, 1.0, 0.0]
    vocab = vocabulary(m)
    batches = list(train_batches(m, folder, ["A", "C"], batch_size=32, max_len=12, seed=0, epoch=0, buffer=50))
    users = sorted(u for b in batches for u in b["user"].tolist())
    assert len(users) == m["counts"]["A"]["train"]["samples"] + m["counts"]["C"]["train"]["samples"]
    for b in batches:
        for row in b["targets"]:
            doms = set(vocab.of_ids(row[row > 0].numpy()).tolist())
            assert len(doms) <= 1 and doms <= {0, 2}  # each row's targets are its own shard's domain, A or C
    assert {0, 2} <= {int(vocab.of_ids(np.array([int(r[r > 0][0])]))[0]) for b in batches for r in b["targets"]
                      if (r > 0).any()}
