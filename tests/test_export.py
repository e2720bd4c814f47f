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
