"""Faults as an operator meets them, driven by real processes: SIGKILL at each save phase (through
the ``XDREC_FAULT`` hook the code calls there), a truncated or corrupt newest checkpoint, two runs
of one name, a diverging run, a full disk (a small tmpfs where mounting is allowed, else an
injected ENOSPC), a stale DeepSpeed op-build lock and a shard truncated mid-run.

Each kill test resumes the killed run and checks it ends as the uninterrupted run does: every
step's loss and the test metrics."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# 2 source epochs of 5 steps (batch 64), a resume checkpoint every 2 steps: saves at steps 2, 4,
# 5 (epoch end), 6, 8, 10 (epoch end), and "best" after each improving epoch
SOURCE = ["train.stages=[source]", "train.log_every=1", "train.checkpoint_every=2", "tracking.wandb=false"]


def xdrec(tmp_path: Path, *args: str, fault: str = "", n_procs: int = 1, timeout: int = 600,
          data: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XDREC_FAULT", None)
    if fault:
        env["XDREC_FAULT"] = fault
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_procs)] \
        if n_procs > 1 else [sys.executable]
    cmd = [*pre, "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
           f"data.out_dir={data or tmp_path / 'data'}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.startswith("xdrec: error:")]


def step_losses(run: Path) -> dict:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "source/loss" in r:
            out[r["source/stage_step"]] = r["source/loss"]
    return out


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    """Prepared once for the module (every run reads it; none writes it)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data) -> Path:
    work = tmp_path_factory.mktemp("full")
    ok(xdrec(work, *SOURCE, data=shared_data))
    return work / "tiny"


def assert_same_run(run: Path, reference: Path) -> None:
    a, b = step_losses(reference), step_losses(run)
    assert sorted(a) == sorted(b) and len(a) == 10
    assert max(abs(a[k] - b[k]) for k in a) < 1e-6
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (reference, run))
    assert ma["source"]["test"] == mb["source"]["test"]
    assert mb["_meta"]["source"]["done"]


# phase @ n: the n-th time the phase is reached (saves 1-3 are steps 2, 4 and the epoch end at 5)
KILLS = ["ckpt.model@2", "ckpt.rng@2", "ckpt.loop@2", "ckpt.manifest@2", "ckpt.publish@2", "ckpt.latest@3",
         "ckpt.best@2", "metrics.json@1"]


@pytest.mark.parametrize("phase", KILLS)
def test_a_kill_in_any_save_phase_resumes_to_the_uninterrupted_result(tmp_path, phase, uninterrupted, shared_data):
    killed = xdrec(tmp_path, *SOURCE, fault=f"kill:{phase}", data=shared_data)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = tmp_path / "tiny" / "source" / "checkpoints"
    if (ckpt / "latest").exists():  # latest always names a complete checkpoint
        from train.checkpoint import problem
        assert problem(ckpt / (ckpt / "latest").read_text(), me=0) is None
    resumed = ok(xdrec(tmp_path, *SOURCE, "--resume", "auto", data=shared_data))
    assert "taking over the stale lock" in resumed.stdout and "(no longer running)" in resumed.stdout
    assert_same_run(tmp_path / "tiny", uninterrupted)


def test_a_truncated_or_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted, shared_data):
    ok(xdrec(tmp_path, *SOURCE, "train.stop_after_steps=4", "train.keep_checkpoints=3", data=shared_data))
    ckpt = tmp_path / "tiny" / "source" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004" and (ckpt / "step00000002").is_dir()
    states = ckpt / "step00000004" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as f:
        f.truncate(size // 2)
    resumed = ok(xdrec(tmp_path, *SOURCE, "train.keep_checkpoints=3", "--resume", "auto", data=shared_data))
    assert (f"resuming from {ckpt / 'step00000002'}, the newest complete checkpoint; skipped step00000004 "
            f"(mp_rank_00_model_states.pt has {size // 2} bytes, its manifest {size} (truncated?))") in resumed.stdout
    assert (ckpt / ".bad-step00000004").is_dir()
    assert_same_run(tmp_path / "tiny", uninterrupted)

    # a flipped byte (same size) fails the checksum; with no complete checkpoint left: one error line
    for tag in ("step00000008", "step00000010", "step00000010-1"):
        if (ckpt / tag).is_dir():
            f = ckpt / tag / "mp_rank_00_model_states.pt"
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    meta["_meta"]["source"]["done"] = False  # as if the stage had not finished
    (tmp_path / "tiny" / "metrics.json").write_text(json.dumps(meta))
    broken = xdrec(tmp_path, *SOURCE, "--resume", "auto", data=shared_data)
    assert broken.returncode == 2
    (line,) = error_lines(broken)
    assert f"{ckpt}: no complete checkpoint to resume from: " in line and "does not match its sha256" in line


def test_a_non_finite_loss_stops_naming_stage_step_domain_and_batch(tmp_path, shared_data):
    """The issue's diverging run (float settings written 1e6), and an injected NaN batch."""
    lr = [f"train.{s}.lr=1e6" for s in ("target_only", "source", "joint")]
    p = xdrec(tmp_path, "name=nan1", *lr, data=shared_data)
    assert p.returncode == 2, p.stderr[-2000:]
    (line,) = error_lines(p)
    assert line.startswith("xdrec: error: stage target_only, step ") and "non-finite loss" in line and "B nan" in line
    text = (tmp_path / "nan1" / "metrics.json").read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert "target_only" not in m and m["_meta"]["stopped"]["stage"] == "target_only"

    p = xdrec(tmp_path, "name=nan2", *SOURCE, fault="nan:train.loss@3", data=shared_data)
    assert p.returncode == 2
    assert error_lines(p) == [
        "xdrec: error: stage source, step 3 (epoch 1, batch 3): non-finite loss (mean CE per domain of the batch: "
        "A nan); training stopped (train.on_nonfinite), nothing saved after the last checkpoint: lower the learning "
        "rate, or set train.on_nonfinite=skip"]


@pytest.mark.parametrize("point, zero", [("train.loss", 0), ("train.grad", 0), ("train.grad", 3)])
def test_on_nonfinite_skip_counts_the_skipped_batch_and_trains_on(tmp_path, point, zero, shared_data):
    n = 2 if zero == 3 else 1
    p = ok(xdrec(tmp_path, *SOURCE, "train.on_nonfinite=skip", f"train.zero_stage={zero}",
                 fault=f"nan:{point}@3", n_procs=n, data=shared_data))
    what = "loss" if point == "train.loss" else "gradient norm"
    assert f"[source] skipped: stage source, step 3 (epoch 1, batch 3): non-finite {what}" in p.stdout
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["_meta"]["source"]
    assert meta["nonfinite_skipped"] == 1 and all(math.isfinite(x) for x in meta["epoch_losses"])
    if n == 1:  # 2 epochs of 5 batches; a batch skipped for its loss takes no step
        assert meta["steps"] == (9 if point == "train.loss" else 10)
    bounded = xdrec(tmp_path, "name=bound", *SOURCE, "train.on_nonfinite=skip", "train.max_nonfinite_skips=0",
                    fault=f"nan:{point}@3", data=shared_data)
    assert bounded.returncode == 2 and "train.max_nonfinite_skips=0" in error_lines(bounded)[0]


def test_two_runs_of_one_name_the_second_is_refused_and_a_dead_holder_is_taken_over(tmp_path, shared_data):
    slow = ["train.stages=[source]", "train.micro_batch_size=4", "train.source.epochs=5", "tracking.wandb=false"]
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    a = subprocess.Popen([sys.executable, "-m", "train.cli", "train", "configs/experiment/tiny.yaml",
                          f"runs_dir={tmp_path}", f"data.out_dir={shared_data}", *slow], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "tiny" / ".lock"
        end = time.time() + 300
        while not (lock.is_file() and lock.read_text().strip()):
            assert a.poll() is None and time.time() < end, a.communicate()[1][-2000:]
            time.sleep(0.2)
        b = xdrec(tmp_path, *slow, "seed=1", data=shared_data)
        assert b.returncode == 2
        (line,) = error_lines(b)
        assert f"{tmp_path / 'tiny'} is in use by another run (host " in line and f" pid {a.pid}," in line
        resumed = xdrec(tmp_path, *slow, "--resume", "auto", data=shared_data)  # a resume is refused as well
        assert resumed.returncode == 2 and f" pid {a.pid}," in error_lines(resumed)[0]
        assert a.poll() is None  # the holder ran on, untouched
    finally:
        a.kill()
        a.wait()
    taken = xdrec(tmp_path, *slow, "train.stop_after_steps=2", "--resume", "auto", data=shared_data)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"taking over the stale lock {tmp_path / 'tiny' / '.lock'} of host " in taken.stdout
    assert f"pid {a.pid}" in taken.stdout and "(no longer running)" in taken.stdout


def test_a_fresh_start_on_an_earlier_run_is_refused_or_moved_aside(tmp_path, shared_data):
    args = ["train.stages=[source]", "train.source.epochs=1", "tracking.wandb=false"]
    ok(xdrec(tmp_path, *args, data=shared_data))
    before = (tmp_path / "tiny" / "metrics.json").read_text()
    again = xdrec(tmp_path, *args, data=shared_data)
    assert again.returncode == 2
    assert error_lines(again) == [f"xdrec: error: {tmp_path / 'tiny'} already holds a run (metrics.json, config.yaml, "
                                  "metrics.jsonl, source); continue it with --resume auto, or start afresh with "
                                  "--overwrite (moves it aside)"]
    assert (tmp_path / "tiny" / "metrics.json").read_text() == before and (tmp_path / "tiny" / "source").is_dir()
    moved = ok(xdrec(tmp_path, *args, "--overwrite", data=shared_data))
    (aside,) = tmp_path.glob("tiny.old-*")
    assert f"--overwrite: moved the earlier run {tmp_path / 'tiny'} to {aside}" in moved.stdout
    assert (aside / "metrics.json").read_text() == before
    assert (aside / "source" / "checkpoints" / "best").is_dir()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_names_the_path_and_free_space_and_keeps_the_last_checkpoint(tmp_path, shared_data):
    """On a 200 KiB tmpfs the first resume checkpoint (about 110 KiB) fits and the second does not;
    where mount is not allowed the second save's RNG write fails with an injected ENOSPC."""
    runs = tmp_path / "small"
    mounted = _mount_tmpfs(runs, "200k")
    try:
        p = xdrec(runs, *SOURCE, fault="" if mounted else "enospc:ckpt.rng@2", data=shared_data)
        assert p.returncode == 2, p.stderr[-2000:]
        (line,) = error_lines(p)
        ckpt = runs / "tiny" / "source" / "checkpoints"
        assert line.startswith(f"xdrec: error: saving {ckpt}/.tmp-step") or line.startswith(
            f"xdrec: error: saving {ckpt}/.tmp-best"), line
        assert ": no space left on device (" in line and " free there); the checkpoints before it are intact" in line
        assert not list(ckpt.glob(".tmp-*"))  # the partial save was removed
        from train.checkpoint import problem
        latest = (ckpt / "latest").read_text()
        assert latest == "step00000002" and problem(ckpt / latest, me=0) is None
    finally:
        if mounted:
            subprocess.run(["umount", str(runs)], check=False)


def test_a_stale_op_build_lock_is_cleared_and_a_live_build_is_waited_for(tmp_path):
    """A copy of the built op with torch's build lock left behind: engine construction goes on
    after removing it (without the fix it waits forever: the subprocess's timeout fails the test)."""
    from train.ops import cache_root, clear_stale_build_locks, use_venv_cache

    use_venv_cache()
    src = cache_root()
    ops = [p.parent for p in src.glob("*/build.ninja")]
    assert ops, f"no built DeepSpeed op under {src} (make setup warms it)"
    cache = tmp_path / "cache"
    shutil.copytree(src, cache)
    for op in cache.iterdir():
        (op / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "train.engine"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"removed a stale DeepSpeed op build lock {cache / ops[0].name / 'lock'}" in p.stdout

    # a live build (a process working in the op's folder) is waited for, with a message, then timed out
    op = cache / ops[0].name
    (op / "lock").touch()
    builder = subprocess.Popen(["sleep", "60"], cwd=op)
    said = []
    try:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache)
        with pytest.raises(TimeoutError, match=f"{op / 'lock'}: the op build of pids \\[{builder.pid}\\]"):
            clear_stale_build_locks(said.append, timeout=1.0)
    finally:
        os.environ.pop("TORCH_EXTENSIONS_DIR")
        builder.kill()
        builder.wait()
    assert said == [f"waiting for a DeepSpeed op build in progress in {op} (pids [{builder.pid}]); up to 1 s"]
    assert (op / "lock").exists()  # a live build's lock is never removed


def test_a_shard_truncated_mid_run_is_one_error_line_naming_it(tmp_path):
    args = ["train.stages=[source]", "train.micro_batch_size=4", "train.source.epochs=4", "tracking.wandb=false"]
    ok(xdrec(tmp_path / "prep", *args, "train.source.epochs=1", "train.stop_after_steps=1", data=tmp_path / "data"))
    shard = tmp_path / "data" / "synthetic-tiny" / "A" / "train-000000.tar"
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    p = subprocess.Popen([sys.executable, "-m", "train.cli", "train", "configs/experiment/tiny.yaml",
                          f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", *args, "train.log_every=1"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "tiny" / "metrics.jsonl"
    end = time.time() + 300
    while not (jsonl.is_file() and '"source/stage_step": 2' in jsonl.read_text()):
        assert p.poll() is None and time.time() < end, p.communicate()[1][-2000:]
        time.sleep(0.05)
    with open(shard, "r+b") as f:  # cut mid-member: the epoch after this one reads a broken tar
        f.truncate(shard.stat().st_size // 2 + 100)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-2000:]
    lines = [x for x in err.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
    assert len(lines) == 1 and lines[0].startswith(f"xdrec: error: {shard}"), err[-2000:]
    assert "Traceback" not in err


def test_a_torn_last_line_of_metrics_jsonl_is_cut_before_appending(tmp_path):
    from train.config import load_config
    from train.tracking import Tracker
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"time": 1, "step": 4, "source/loss": 5.0}\n{"time": 2, "step": 5, "sou')
    cfg = load_config(REPO / "configs/experiment/tiny.yaml", ["tracking.wandb=false"])
    t = Tracker(cfg, run, is_main=True, resume=True)
    assert t.step == 4
    t.log({"source": {"loss": 4.0}}, step=5)
    t.finish()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5] and rows[1]["source/loss"] == 4.0


def test_atomic_writes_leave_the_old_file_on_a_failure(tmp_path, monkeypatch):
    from train.files import DiskFullError, write_atomic
    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setenv("XDREC_FAULT", "enospc:metrics.json")
    with pytest.raises(DiskFullError, match=f"no space left on device writing {target} .* free there\\); "
                                            "metrics.json was left as it was"):
        write_atomic(target, "new", point="metrics.json")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    monkeypatch.delenv("XDREC_FAULT")
    write_atomic(target, "new", point="metrics.json")
    assert target.read_text() == "new"
