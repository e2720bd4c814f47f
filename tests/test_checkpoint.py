"""Resume equivalence: N steps, stop, resume, N more equal 2N uninterrupted steps (data position,
optimizer, LR schedule and RNG included), single process and 2 ranks under ZeRO-2 and ZeRO-3;
and the checks on another run's source stage (train.init_from)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# dropout stays on: the restored RNG states must reproduce it
COMMON = ["-m", "train.cli", "train", "configs/experiment/tiny.yaml", "train.stages=[source, joint]",
          "train.log_every=1", "train.source.epochs=2", "train.joint.epochs=1", "train.micro_batch_size=32",
          "tracking.wandb=false"]


def launch(n_procs: int, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_procs)] \
        if n_procs > 1 else [sys.executable]
    p = subprocess.run([*pre, *COMMON, f"data.out_dir={tmp_path / 'data'}", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    return p


def step_losses(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for stage in ("source", "joint"):
            if f"{stage}/loss" in r:
                out[(stage, r[f"{stage}/stage_step"])] = r[f"{stage}/loss"]
    return out


@pytest.mark.parametrize("n_procs, zero_stage, accum", [(1, 0, 1), (1, 1, 2), (2, 2, 1), (2, 3, 1)],
                         ids=["1rank-zero0", "1rank-zero1-accum2", "2ranks-zero2", "2ranks-zero3"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, n_procs, zero_stage, accum):
    z = f"train.zero_stage={zero_stage} train.grad_accum={accum}".split()
    full = launch(n_procs, [f"runs_dir={tmp_path / 'full'}", *z], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    # stop mid-epoch 1 of the source stage (7 steps per epoch at 2 x 32 rows), then resume
    first = launch(n_procs, [f"runs_dir={tmp_path / 'cut'}", *z, "train.stop_after_steps=4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 4" in first.stdout
    meta = json.loads((tmp_path / "cut" / "tiny" / "metrics.json").read_text())["_meta"]
    assert meta["stopped"]["stage"] == "source" and meta["stopped"]["step"] == 4
    # the seconds the first process spent in the stage travel in the checkpoint's loop state; set
    # them to 1000 s (and seal the checkpoint again): the resumed stage's wall time must add its own to them
    from train.checkpoint import LOOP, LoopState, file_entries, write_manifest
    ckpt = Path(meta["stopped"]["checkpoint"])
    loop = LoopState.from_json((ckpt / LOOP).read_text())
    assert loop.train_s > 0
    loop.train_s = 1000.0
    (ckpt / LOOP).write_text(loop.to_json())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    write_manifest(ckpt, file_entries(ckpt, list(manifest.pop("files"))), **manifest)
    t0 = time.time()
    second = launch(n_procs, [f"runs_dir={tmp_path / 'cut'}", *z, "--resume", "auto"], tmp_path)
    took = time.time() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at epoch 1, batch 4, step 4 (1000 s trained before)" in second.stdout
    wall = json.loads((tmp_path / "cut" / "tiny" / "metrics.json").read_text())["_meta"]["source"]["wall_s"]
    assert 1000.0 < wall < 1000.0 + took
    a, b = step_losses(tmp_path / "full" / "tiny"), step_losses(tmp_path / "cut" / "tiny")
    assert sorted(a) == sorted(b) and len(a) >= 10  # no step repeated or skipped
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    fa = json.loads((tmp_path / "full" / "tiny" / "metrics.json").read_text())
    fb = json.loads((tmp_path / "cut" / "tiny" / "metrics.json").read_text())
    assert fa["joint"]["test"]["B"]["full"]["ndcg@10"] == pytest.approx(fb["joint"]["test"]["B"]["full"]["ndcg@10"],
                                                                        abs=1e-6)


def test_resume_with_another_world_size_is_a_clear_error(tmp_path):
    first = launch(2, [f"runs_dir={tmp_path / 'r'}", "train.zero_stage=2", "train.stop_after_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = launch(1, [f"runs_dir={tmp_path / 'r'}", "train.zero_stage=2", "--resume", "auto"], tmp_path)
    assert again.returncode == 2
    assert "written by 2 rank(s), this run has 1" in again.stderr


def _source_run(folder: Path, cfg, drop: str | None = None) -> Path:
    """A run folder with a finished source stage whose config.yaml lacks the key ``drop`` (as a
    run made before that key was added to the config tree)."""
    import yaml
    from train.config import to_dict
    (folder / "source" / "checkpoints" / "best").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"source": {"test": {}}, "_meta": {"source": {"done": True}}}))
    raw = to_dict(cfg)
    if drop:
        section, key = drop.split(".")
        del raw[section][key]
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_init_from_reads_a_key_missing_from_an_older_runs_config_as_its_default(tmp_path):
    from train.checkpoint import ResumeError, source_of
    from train.config import load_config
    cfg = load_config(REPO / "configs/experiment/tiny.yaml")
    old = _source_run(tmp_path / "old", cfg, drop="model.view_domains")
    ckpt, source = source_of(old, cfg)  # the default ([]) is what that run had
    assert ckpt == old / "source" / "checkpoints" and source.done
    views = load_config(REPO / "configs/experiment/tiny.yaml", ["model.sequence=dual", "model.view_domains=[B]"])
    dual = _source_run(tmp_path / "dual", views)
    with pytest.raises(ResumeError, match=r"old/config.yaml has model.sequence='mixed', this run 'dual'"):
        source_of(old, views)
    cfg_b = load_config(REPO / "configs/experiment/tiny.yaml", ["model.sequence=dual"])
    with pytest.raises(ResumeError, match=r"dual/config.yaml has model.view_domains=\['B'\], this run \[\]"):
        source_of(dual, cfg_b)


def test_init_from_refuses_a_source_stage_measured_under_another_sampled_protocol(tmp_path):
    from train.checkpoint import ResumeError, source_of
    from train.config import load_config
    cfg = load_config(REPO / "configs/experiment/tiny.yaml")
    run = _source_run(tmp_path / "n50", cfg)
    other = load_config(REPO / "configs/experiment/tiny.yaml", ["eval.num_negatives=99"])
    with pytest.raises(ResumeError, match=r"train.init_from: .*n50/config.yaml has eval.num_negatives=50, this run 99; "
                                          r"its metrics were measured under another evaluation protocol"):
        source_of(run, other)
    with pytest.raises(ResumeError, match=r"has eval.seed=2025, this run 1;"):
        source_of(run, load_config(REPO / "configs/experiment/tiny.yaml", ["eval.seed=1"]))
    with pytest.raises(ResumeError, match=r"has eval.prior=0.0, this run 0.5;"):  # the prior changes the metrics too
        source_of(run, load_config(REPO / "configs/experiment/tiny.yaml", ["eval.prior=0.5"]))
    source_of(run, load_config(REPO / "configs/experiment/tiny.yaml", ["eval.batch_size=64"]))  # not protocol
