"""slurm/*.sbatch on a real one-node Slurm (tests/slurm_cluster.sh starts and stops it), on the CPU.

Needs root and Debian's slurmctld, slurmd, munge and slurm-client (``.ci/run`` installs them).
Without them these tests skip, unless XDREC_REQUIRE_SLURM=1 (set by ``.ci/run``) makes that a failure.
"""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch.env import LaunchError, detect

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
# CPU variant of the same scripts: no GPUs, 2 ranks of one CPU each
CPU_FLAGS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20"]
# ~70 source + ~40 joint optimizer steps: long enough to be signalled mid-stage
TINY = ["configs/experiment/tiny.yaml", "train.stages=[source, joint]", "train.micro_batch_size=8",
        "train.source.epochs=2", "train.joint.epochs=1", "train.log_every=1", "tracking.wandb=true"]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(b) is None:
            return f"{b} is not installed (apt-get install slurmctld slurmd munge slurm-client)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("XDREC_REQUIRE_SLURM") == "1":
            pytest.fail(f"XDREC_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        up = subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", e.stderr or "")
    if up.returncode != 0:  # leave no half-started daemons behind
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)
        logs = "".join(p.read_text()[-1500:] for p in (state / "log").glob("*.log"))
        pytest.fail(f"the test cluster did not start:\n{up.stdout}{up.stderr}\n{logs}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "XDREC_DEVICE": "cpu", "WANDB_MODE": "offline",
           "XDREC_VENV": str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")))}
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


def submit(env, script: str, out: Path, args: list[str], flags=CPU_FLAGS) -> str:
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["sbatch", "--parsable", *flags, f"--output={out}/%x-%j.out", f"slurm/{script}", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(env, job: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def wait_done(env, job: str, timeout: float = 600) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(env, job)
        if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return info
        time.sleep(1)
    pytest.fail(f"job {job} still {info['JobState']} after {timeout} s")


def log_of(out: Path, job: str) -> str:
    return "\n".join(p.read_text() for p in out.glob(f"*-{job}.out"))


def stage_steps(run: Path) -> dict:
    """(stage, step) -> loss of every logged optimizer step, refusing a step logged twice."""
    seen: dict = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for stage in ("source", "joint"):
            if f"{stage}/stage_step" in r and f"{stage}/loss" in r:
                key = (stage, r[f"{stage}/stage_step"])
                assert key not in seen, f"step {key} logged twice"
                seen[key] = r[f"{stage}/loss"]
    return seen


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    base = tmp_path_factory.mktemp("plain")
    job = submit(slurm, "train.sbatch", base / "logs", [*TINY, f"runs_dir={base}", f"data.out_dir={base / 'data'}"])
    return job, wait_done(slurm, job), base


def test_train_sbatch_two_tasks_completes_with_checkpoint_and_metrics(uninterrupted):
    job, info, base = uninterrupted
    log = log_of(base / "logs", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "slurm: world size 2" in log, log[-3000:]
    meta = json.loads((base / "tiny" / "metrics.json").read_text())["_meta"]
    assert meta["world_size"] == 2 and meta["launcher"] == "slurm"
    assert meta["source"]["done"] and meta["joint"]["done"]
    for stage in ("source", "joint"):
        ckpt = base / "tiny" / stage / "checkpoints"
        assert (ckpt / "best").is_dir() and (ckpt / "latest").is_file()
        assert len(list((ckpt / (ckpt / "latest").read_text().strip()).glob("rng_rank*.pt"))) == 2


def test_preempted_job_checkpoints_requeues_and_resumes_without_repeating_a_step(slurm, uninterrupted, tmp_path):
    _, _, ref_base = uninterrupted
    ref = stage_steps(ref_base / "tiny")
    ref_meta = json.loads((ref_base / "tiny" / "metrics.json").read_text())["_meta"]
    job = submit(slurm, "train.sbatch", tmp_path / "logs", [*TINY, f"runs_dir={tmp_path}",
                                                             f"data.out_dir={tmp_path / 'data'}"])
    jsonl = tmp_path / "tiny" / "metrics.jsonl"
    end = time.time() + 300
    while not (jsonl.is_file() and '"source/stage_step": 10' in jsonl.read_text()):
        assert time.time() < end and job_info(slurm, job)["JobState"] in ("PENDING", "RUNNING"), \
            log_of(tmp_path / "logs", job)[-3000:]
        time.sleep(0.1)
    # what `#SBATCH --signal=B:USR1@300` does near the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    info = wait_done(slurm, job)
    log = log_of(tmp_path / "logs", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "stopped at step" in log and "on a preemption signal" in log and "requeueing job" in log, log[-4000:]
    assert "(restart 1)" in log and "resume auto" in log and "[source] resuming at epoch" in log, log[-4000:]
    stopped = int(re.search(r"stage source stopped at step (\d+)", log).group(1))
    assert 10 <= stopped < ref_meta["source"]["steps"]  # really mid-stage
    got = stage_steps(tmp_path / "tiny")
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["_meta"]
    # the same optimizer steps as the uninterrupted job: none repeated (stage_steps), none skipped
    assert sorted(got) == sorted(ref)
    assert {s: meta[s]["steps"] for s in ("source", "joint")} == {s: ref_meta[s]["steps"] for s in ("source", "joint")}
    for key, loss in ref.items():
        assert got[key] == pytest.approx(loss, abs=1e-5), key
    # the W&B run continues: one id, two offline segments of it
    run_id = (tmp_path / "tiny" / "wandb_run_id").read_text()
    segments = sorted((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(run_id) for s in segments)


def test_multinode_sbatch_runs_on_the_one_node_this_machine_has(slurm, tmp_path):
    job = submit(slurm, "multinode.sbatch", tmp_path / "logs",
                 ["configs/experiment/tiny.yaml", "train.stages=[source]", "train.source.epochs=1",
                  f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}"], flags=["--nodes=1", *CPU_FLAGS])
    info = wait_done(slurm, job)
    log = log_of(tmp_path / "logs", job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["JobName"] == "xdrec-multi" and "slurm: world size 2" in log
    assert re.search(rf"MASTER {re.escape(os.uname().nodename.split('.')[0])}:{20000 + int(job) % 20000}", log), log[:2000]
    assert (tmp_path / "tiny" / "metrics.json").is_file()


def test_job_environment_for_n_nodes(slurm):
    """slurm/job.sh's rendezvous for a 4-node allocation, and launch.env's rank mapping of its tasks."""
    script = f'source {REPO}/slurm/job.sh; xdrec_env && echo "$MASTER_ADDR $MASTER_PORT ${{DS_ACCELERATOR:-}}"'
    env = {**slurm, "SLURM_JOB_NODELIST": "gpu[007-009],gpu011", "SLURM_JOB_ID": "123456"}
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["gpu007", "23456", "cpu"]
    bad = subprocess.run(["bash", "-c", script], env={**env, "XDREC_DEVICE": "tpu"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "XDREC_DEVICE=tpu" in bad.stderr

    nodes, per_node = 4, 8
    seen = set()
    for node in range(nodes):
        for local in range(per_node):
            e = detect({"SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local),
                        "SLURM_NODEID": str(node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
                        "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
                        "MASTER_ADDR": "gpu007", "MASTER_PORT": "23456"})
            assert (e.local_rank, e.world_size, e.master_addr, e.launcher) == (local, 32, "gpu007", "slurm")
            seen.add(e.rank)
    assert seen == set(range(nodes * per_node))
    # a multi-node step that lacks the rendezvous address fails with a message, not a hang
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect({"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2"})
    # `python` run directly in the batch script (no srun step) is one process, not rank 0 of many
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "5"}).launcher == "single"
