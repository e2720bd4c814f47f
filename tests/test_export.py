"""Export round trip: the consolidated safetensors model, loaded without DeepSpeed, ranks every
test user exactly as the engine did (same metrics to 1e-9), from ZeRO-0 and from 2-rank ZeRO-3."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.export import ExportError, evaluate_exported, export, load_exported

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path, n_procs, zero):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    pre = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                              if n_procs == 2 else [])
    p = subprocess.run([*pre, "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
                        f"data.out_dir={tmp_path / 'data'}", f"train.zero_stage={zero}", "train.micro_batch_size=32",
                        "train.stages=[source, joint]", "tracking.wandb=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp_path / "tiny"


@pytest.mark.parametrize("n_procs, zero", [(1, 0), (2, 3)], ids=["zero0", "2ranks-zero3"])
def test_exported_model_reproduces_engine_metrics(tmp_path, n_procs, zero):
    run = _train(tmp_path, n_procs, zero)
    out = export(run, tmp_path / "export", stage="joint")
    engine_metrics = json.loads((run / "metrics.json").read_text())["joint"]["test"]
    ours = evaluate_exported(out, splits=("test",))["test"]
    assert sorted(ours) == sorted(engine_metrics) == ["A", "B"]
    for dom in ours:
        for proto in ("full", "sampled999"):
            for k, v in engine_metrics[dom][proto].items():
                assert ours[dom][proto][k] == pytest.approx(v, abs=1e-9), (dom, proto, k)
    model, info = load_exported(out)
    top, _ = model.recommend(torch.tensor([[0, 0, 1, 2, 90, 91]]), domain=1, k=5)
    lo, hi = model.ranges[1]
    assert ((top >= lo) & (top < hi)).all()


def test_export_of_a_missing_stage_names_the_folder(tmp_path):
    run = _train(tmp_path, 1, 0)
    with pytest.raises(ExportError, match=r"target_only/checkpoints/best: no checkpoint"):
        export(run, tmp_path / "x", stage="target_only")
    (tmp_path / "broken").mkdir()
    with pytest.raises(ExportError, match=r"model.safetensors is missing"):
        load_exported(tmp_path / "broken")


@pytest.mark.parametrize("sequence", ["mixed", "per_domain", "dual"])
def test_every_stage_exported_repeats_its_metrics_json(tmp_path, sequence):
    """The stage's input policy travels with its export: `xdrec evaluate` of each stage's export
    gives that stage's metrics.json (its domains, valid and test), for each model.sequence; a
    target-only export recommends only its domain, from the history's items of that domain."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    extra = ["model.view_layers=1"] if sequence == "dual" else []
    p = subprocess.run([sys.executable, "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
                        f"data.out_dir={tmp_path / 'data'}", f"model.sequence={sequence}", *extra,
                        "train.source.epochs=1", "train.joint.epochs=1", "train.target_only.epochs=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "tiny"
    recorded = json.loads((run / "metrics.json").read_text())
    for stage in ("source", "joint", "target_only"):
        out = export(run, tmp_path / f"export-{stage}", stage=stage)
        ours = evaluate_exported(out)
        for split in ("valid", "test"):
            want = recorded[stage][split]
            assert sorted(ours[split]) == sorted(want), (stage, split)
            for dom in want:
                for proto in ("full", "sampled999"):
                    for k in ("hr@10", "ndcg@10", "mrr"):
                        assert ours[split][dom][proto][k] == pytest.approx(want[dom][proto][k], abs=1e-9), \
                            (stage, split, dom, proto, k)
    # --without: a target-only model reads B's events only, so taking the other domains out changes
    # nothing; taking the latest event out of the joint model's input moves its ranks
    alone = evaluate_exported(tmp_path / "export-target_only", splits=("test",), without="other-domains")["test"]["B"]
    assert all(alone[p][k] == pytest.approx(recorded["target_only"]["test"]["B"][p][k], abs=1e-9)
               for p in ("full", "sampled999") for k in ("hr@10", "ndcg@10", "mrr"))
    cut = evaluate_exported(tmp_path / "export-joint", splits=("test",), without="last-event")["test"]["B"]
    assert any(cut[p]["mrr"] != pytest.approx(recorded["joint"]["test"]["B"][p]["mrr"], abs=1e-9)
               for p in ("full", "sampled999"))
    if sequence == "mixed":  # the command line names the change and prints the same numbers
        cli = subprocess.run([sys.executable, "-m", "train.cli", "evaluate", str(tmp_path / "export-joint"), "--without",
                              "last-event", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert json.loads(cli.stdout)["test"]["B"]["full"]["mrr"] == pytest.approx(cut["full"]["mrr"], abs=1e-12)
    from train.export import recommendations
    with pytest.raises(ExportError, match=r"--domain 'A': this export \(stage target_only\) scores \['B'\]"):
        recommendations(tmp_path / "export-target_only", "A", ["1"], internal=True)
    a_items = recommendations(tmp_path / "export-target_only", "B", ["1", "2", "85"], internal=True)
    b_only = recommendations(tmp_path / "export-target_only", "B", ["85"], internal=True)
    assert a_items == b_only  # source items in the history are not the target-only model's input
