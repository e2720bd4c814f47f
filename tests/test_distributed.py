"""Multi-process runs on the CPU with gloo under torchrun (2 ranks): real process groups."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torchrun(args, tmp_path, timeout=900):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def test_joint_loss_is_the_global_mean_when_a_rank_has_no_target_rows(tmp_path):
    out = tmp_path / "parity.json"
    torchrun([str(REPO / "tests" / "dist_joint_loss.py"), str(out)], tmp_path)
    r = json.loads(out.read_text())
    assert r["local_counts"][1] == 0 and r["ref_counts"][1] > 0  # rank 0 really had no target rows
    assert r["value"] == pytest.approx(r["ref"], rel=1e-6)
    assert r["grad_max_diff"] < 1e-6


@pytest.mark.parametrize("zero_stage, extra", [(2, "train.offload_optimizer=true"),
                                               (3, "train.activation_checkpointing=true"),
                                               (1, "train.precision=bf16")],
                         ids=["zero2-offload", "zero3-activation-checkpointing", "zero1-bf16"])
def test_torchrun_two_ranks_source_then_joint(tmp_path, zero_stage, extra):
    p = torchrun(["-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path / 'runs'}",
                  f"data.out_dir={tmp_path / 'data'}", f"train.zero_stage={zero_stage}",
                  "train.micro_batch_size=32", extra], tmp_path)
    m = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert m["_meta"]["world_size"] == 2 and m["_meta"]["launcher"] == "torchrun"
    assert "world size 2" in p.stdout
    # distributed evaluation covers every test user exactly once (gathered, not averaged)
    n_users = sum(m[s]["test"][d]["full"]["n_users"] for s, d in (("joint", "A"), ("joint", "B")))
    assert n_users == 300
    assert m["joint"]["test"]["B"]["sampled999"]["ndcg@10"] > 0
    if zero_stage == 2:  # whole weights in the checkpoint: one process can score them as well
        again = ["-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path / 'runs'}",
                 f"data.out_dir={tmp_path / 'data'}", f"train.zero_stage={zero_stage}", "train.micro_batch_size=32",
                 extra, "eval.prior=1.0", "eval.transition=1.0", "--reevaluate"]
        torchrun(again, tmp_path)
        two = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
        p1 = subprocess.run([sys.executable, *again], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p1.returncode == 0, p1.stderr[-3000:]
        one = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
        # the prior's item counts and the transition pairs are summed over the ranks' shares of the
        # shards: 2 ranks rank as 1
        assert two["joint"]["test"] == one["joint"]["test"] != m["joint"]["test"]
        assert two["transfer"] == one["transfer"]


def test_accelerate_launch_two_processes(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    accelerate = Path(sys.executable).parent / "accelerate"
    p = subprocess.run([str(accelerate), "launch", "--config_file", "configs/accelerate/one-node-zero2.yaml",
                        "--num_processes", "2", "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
                        f"data.out_dir={tmp_path / 'data'}", "train.zero_stage=2", "train.micro_batch_size=32"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    m = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert m["_meta"]["world_size"] == 2 and m["_meta"]["launcher"] == "accelerate"
    assert {"source", "joint", "target_only"} <= set(m)


def test_accelerate_flags_that_contradict_the_config_are_errors():
    from train.config import TrainConfig
    from train.engine import LaunchConflict, check_launcher_settings

    t = TrainConfig(zero_stage=2, precision="bf16", grad_accum=2)
    check_launcher_settings(t, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_MIXED_PRECISION": "no",
                                "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    with pytest.raises(LaunchConflict, match=r"--zero_stage 3 disagrees with train.zero_stage=2"):
        check_launcher_settings(t, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    with pytest.raises(LaunchConflict, match=r"--mixed_precision fp16 disagrees with train.precision=bf16"):
        check_launcher_settings(t, {"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(LaunchConflict, match=r"train.grad_accum=2"):
        check_launcher_settings(t, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(LaunchConflict, match=r"deepspeed_config_file"):
        check_launcher_settings(t, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"})


def _step_losses(run_dir: Path, stage: str) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[f"{stage}/loss"] for r in lines if f"{stage}/loss" in r]


@pytest.mark.parametrize("stage, keys", [
    ("source", ["train.stages=[source]", "train.source.epochs=2"]),
    ("joint", ["train.target_only.epochs=1", "train.source.epochs=1", "train.joint.epochs=1", "train.joint.distill=0.5"]),
], ids=["source", "joint-distilled"])
def test_two_rank_zero3_loss_curve_matches_one_rank_with_the_same_global_batch(tmp_path, stage, keys):
    """Same global batch (1 x 64 vs 2 x 32 rows), no dropout, no sample shuffle: the per-step
    global loss of ZeRO-3 on 2 ranks equals the 1-rank run within 1e-4 (float reduction order);
    also for a joint stage taught by the target-only model (a ZeRO-3 engine of its own, called on
    every rank every step)."""
    common = ["-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"data.out_dir={tmp_path / 'data'}",
              "train.zero_stage=3", "model.dropout=0.0", "model.emb_dropout=0.0", "model.max_len=64",
              "train.shuffle_buffer=1", "train.log_every=1", "tracking.wandb=true", *keys]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          *common, f"runs_dir={tmp_path / 'one'}", "train.micro_batch_size=64"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*common, f"runs_dir={tmp_path / 'two'}", "train.micro_batch_size=32"], tmp_path)
    if stage == "joint":
        assert "[joint] distilling from target_only's best weights" in two.stdout
    a, b = _step_losses(tmp_path / "one" / "tiny", stage), _step_losses(tmp_path / "two" / "tiny", stage)
    assert len(a) == len(b) >= 8
    assert a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))


def test_zero_partitions_measured_per_rank(tmp_path):
    """ZeRO-3 leaves each of 2 ranks about half of every parameter; ZeRO-1 keeps the optimizer
    state of half the parameters; ZeRO-0 replicates everything. Measured by tools.memory on real
    engines, each stage in processes of its own."""
    out = tmp_path / "mem.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "tools.memory", "configs/experiment/tiny.yaml", "--zero", "0,1,3",
                        "--nproc", "2", "--out", str(out), f"data.out_dir={tmp_path / 'data'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {(r["zero_stage"], r["rank"]): r for r in json.loads(out.read_text())}
    assert sorted(rows) == [(z, r) for z in (0, 1, 3) for r in (0, 1)]
    total = rows[(0, 0)]["model_elements"]
    for rank in (0, 1):
        assert rows[(0, rank)]["param_elements_held"] == total
        held = rows[(3, rank)]["param_elements_held"]
        assert total / 2 <= held <= total / 2 + 64  # each parameter padded to an even split
        # AdamW's two fp32 moments of every parameter on each rank without ZeRO; with ZeRO-1 the
        # moments and the fp32 master copy of this rank's half only
        assert rows[(0, rank)]["optimizer_bytes"] == 2 * 4 * total
        assert 3 * 4 * total / 2 <= rows[(1, rank)]["optimizer_bytes"] <= 3 * 4 * (total / 2 + 64)
    assert rows[(3, 0)]["live_tensor_bytes"] < 64 * 2 ** 20  # buckets sized from the (small) model


def test_zero3_builds_the_model_partitioned_from_the_start(tmp_path):
    """Under ZeRO-3 the model is constructed inside deepspeed.zero.Init: right after construction
    each of 2 ranks holds half of every parameter and nothing gathered (its live tensors are half
    the model's fp32 bytes), and the halves are the weights a plain build draws."""
    out = tmp_path / "init.json"
    torchrun([str(REPO / "tests" / "dist_zero_init.py"), str(out)], tmp_path)
    for r in json.loads(out.read_text()):
        assert r["partitioned"] and r["gathered"] == 0 and r["same_as_plain_build"]
        assert r["total"] / 2 <= r["held"] <= r["total"] / 2 + 1024
        assert 2 * r["total"] <= r["live_bytes"] < 2.1 * r["total"], r  # half of 4 bytes a parameter


def test_two_torchrun_agents_as_two_nodes_on_localhost(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
                               f"data.out_dir={tmp_path / 'data'}", "train.zero_stage=3",
                               "train.micro_batch_size=32", "train.source.epochs=1", "train.joint.epochs=1",
                               "train.target_only.epochs=1"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    m = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert m["_meta"]["world_size"] == 2
    assert set(m) >= {"source", "joint", "target_only"}


def test_bf16_autocast_trains_in_bf16_with_fp32_weights_and_scores_in_fp32(tmp_path):
    """train.autocast=bf16 (ZeRO-2, 2 ranks): the training forward's linear layers give bfloat16,
    the loss, weights and scores stay fp32, and the engine's scores are the bare module's."""
    out = tmp_path / "autocast.json"
    torchrun([str(REPO / "tests" / "dist_autocast.py"), str(out)], tmp_path)
    for r in json.loads(out.read_text()):
        assert r["train_linear"] == ["torch.bfloat16"] and r["loss"] == "torch.float32", r
        assert r["weights"] == ["torch.float32"], r
        assert r["score_linear"] == ["torch.float32"] and r["scores"] == "torch.float32", r
        assert r["scores_as_module"], r
