"""xdrec plan: the memory per rank it predicts, checked against a hand computation (and, in make
bench, against tools.memory's measure)."""
import subprocess
import sys
from pathlib import Path

import pytest

from train.engine import ModelSize, zero_settings
from tools.plan import estimate, parse_bytes, recommend

REPO = Path(__file__).resolve().parents[1]
SIZE = ModelSize(params=100_000_000, largest_param=3_000_000, largest_block=12_000_000)


@pytest.mark.parametrize("zero, precision, params, optimizer, grads", [
    # bytes per rank of 100M parameters on 4 ranks (25M each), by hand from DeepSpeed's layout:
    (0, "fp32", 4 * 100e6, 8 * 100e6, 4 * 100e6),        # replicated weights, AdamW moments, gradients
    (1, "fp32", 4 * 100e6, 12 * 25e6, 4 * 25e6),         # weights replicated; fp32 master + moments of a quarter
    (2, "fp32", 4 * 100e6, 12 * 25e6, 4 * 25e6),
    (3, "fp32", 4 * 25e6, 12 * 25e6, 4 * 25e6),          # everything partitioned, a kept gradient partition
    (0, "bf16", 2 * 100e6, 12 * 100e6, 2 * 100e6),       # bf16 weights; fp32 master and moments replicated
    (3, "bf16", 2 * 25e6, 12 * 25e6, 2 * 25e6),
])
def test_estimate_by_hand(zero, precision, params, optimizer, grads):
    e = estimate(SIZE, zero=zero, precision=precision, world=4, offload=False)
    assert (e.params, e.optimizer, e.grads) == (params, optimizer, grads)
    w = 4 if precision == "fp32" else 2
    zs = zero_settings(SIZE, stage=zero, world_size=4, cuda=False)
    if zero == 0:
        buffers = 0
    elif zero in (1, 2):  # the reduce and the allgather bucket
        buffers = 2 * zs["reduce_bucket_size"] * w
    else:  # the reduce bucket and the gathered blocks ZeRO-3 allows
        buffers = (zs["reduce_bucket_size"] + zs["stage3_max_live_parameters"]) * w
    assert e.buffers == buffers
    # what tools.memory sees after a step: the states (ZeRO-3 with its gradient partition) and kept buckets
    kept = zs["reduce_bucket_size"] * w if zero == 3 else 0  # measured: ZeRO-1/2 free their buckets after a step
    assert e.states == params + optimizer + (grads if zero == 3 else 0) + kept


def test_offload_moves_master_and_moments_to_the_host_and_the_recommendation_follows_memory():
    e = estimate(SIZE, zero=3, precision="bf16", world=4, offload=True)
    assert e.optimizer == 0 and e.host == 12 * 25e6
    rows = [estimate(SIZE, zero=z, precision="bf16", world=4, offload=o) for o in (False, True) for z in range(4)
            if not (o and z == 0)]
    gpu = recommend(rows, parse_bytes("80GiB"), cpu=False)
    assert (gpu.zero, gpu.offload) == (0, False)  # 1.6 GB: the least communication wins
    tight = recommend(rows, int(rows[3].device / 0.9) + 1, cpu=False)  # ZeRO-3 just fits
    assert (tight.zero, tight.offload) == (3, False)
    assert recommend(rows, 10 ** 6, cpu=False) is None
    # on CPU ranks the host is the device: offload frees nothing
    assert recommend([r for r in rows if r.offload], int(rows[-1].device / 0.9) + 1, cpu=True) is None
    assert parse_bytes("1.5GiB") == 3 * 2 ** 29 and parse_bytes("24G") == 24 * 2 ** 30 and parse_bytes("1e9") == 10 ** 9


def test_xdrec_plan_on_the_xl_preset_says_zero0_cannot_fit_two_ranks_of_11_gib():
    p = subprocess.run([sys.executable, "-m", "train.cli", "plan", "configs/experiment/xl.yaml", "--world-size", "2",
                        "--memory-per-rank", "11GiB"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "parameters (item table " in p.stdout and "encoder 1,007,169,536" in p.stdout
    bf16 = p.stdout.split("bf16")[1]
    zero0 = next(line for line in bf16.splitlines() if line.startswith("ZeRO-0 "))
    assert float(zero0.split()[-4]) > 11  # GiB per rank
    assert "recommended for 11.00 GiB per rank: ZeRO-1 (" in bf16


def test_activation_estimate_counts_the_residual_tables_second_set_of_logits():
    """model.transition_residual scores every target twice (two CEs whose logits live until backward):
    the estimate grows by exactly one set of logits, their softmax and its gradient."""
    from tools.plan import activation_bytes
    from train.config import load_config
    tiny = REPO / "configs" / "experiment" / "tiny.yaml"
    plain = load_config(tiny, ["model.transition_table=true"])
    residual = load_config(tiny, ["model.transition_table=true", "model.transition_residual=true"])
    tokens, items = plain.train.micro_batch_size * plain.model.max_len, 500
    assert activation_bytes(residual, items) - activation_bytes(plain, items) == 3 * tokens * items * 4


def test_activation_estimate_counts_the_distilling_teachers_logits_and_softmax():
    """train.joint.distill: the teacher's logits and their softmax live beside the student's (no gradient)."""
    from tools.plan import activation_bytes
    from train.config import load_config
    tiny = REPO / "configs" / "experiment" / "tiny.yaml"
    plain, kd = load_config(tiny, []), load_config(tiny, ["train.joint.distill=0.5"])
    tokens, items = plain.train.micro_batch_size * plain.model.max_len, 500
    assert activation_bytes(kd, items) - activation_bytes(plain, items) == 2 * tokens * items * 4
