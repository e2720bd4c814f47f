import json

import pytest

from train.config import ConfigError, TrainConfig
from train.engine import ModelSize, deepspeed_config, warmup_cosine

SMALL = ModelSize(params=10_000, largest_param=4_000, largest_block=3_000)


def test_generated_config_is_the_one_source_of_batch_sizes():
    t = TrainConfig(micro_batch_size=16, grad_accum=4, zero_stage=3, precision="bf16")
    c = deepspeed_config(t, world_size=8, size=SMALL)
    assert c["train_batch_size"] == 16 * 4 * 8 == t.global_batch_size(8)
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["reduce_bucket_size"] == 999_424  # the floor 1e6 for a small model, a multiple of 4096
    assert "offload_optimizer" not in c["zero_optimization"]
    t.offload_optimizer = True
    assert deepspeed_config(t, world_size=1, size=SMALL)["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_zero_buffers_are_sized_from_the_partition_and_the_blocks_not_the_model():
    """A 156M-parameter model (12 blocks of 12.6M) on 2 ranks: buckets of a tenth of the 78M
    partition; ZeRO-3 keeps at most two blocks gathered, one across forward and backward, and
    steps the optimizer a quarter of the partition at a time; on 8 ranks the buckets shrink."""
    from train.engine import zero_settings
    big = ModelSize(params=156_309_504, largest_param=4_194_304, largest_block=12_596_224)
    two = zero_settings(big, stage=3, world_size=2, cuda=False)
    assert two["reduce_bucket_size"] == two["allgather_bucket_size"] == 156_309_504 // 2 // 10 // 4096 * 4096
    assert two["stage3_max_live_parameters"] == 2 * 12_596_224 and two["stage3_max_reuse_distance"] == 12_596_224
    assert two["sub_group_size"] == 156_309_504 // 2 // 4 and two["stage3_model_persistence_threshold"] == 781_547
    assert two["overlap_comm"] is False and two["stage3_prefetch_bucket_size"] == 0  # gloo: no overlap, no prefetch
    gpu = zero_settings(big, stage=3, world_size=8, cuda=True)
    assert gpu["reduce_bucket_size"] == 156_309_504 // 8 // 10 // 4096 * 4096 and gpu["overlap_comm"] is True
    assert gpu["stage3_prefetch_bucket_size"] == 2 * 12_596_224
    assert "stage3_max_live_parameters" not in zero_settings(big, stage=2, world_size=2, cuda=False)
    huge = ModelSize(params=10 ** 11, largest_param=10 ** 9, largest_block=10 ** 9)
    assert zero_settings(huge, stage=2, world_size=2, cuda=True)["reduce_bucket_size"] == 499_998_720  # DeepSpeed's cap


def test_user_json_adds_tuning_but_cannot_contradict(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {
        "stage": 2, "contiguous_gradients": False}, "gradient_clipping": 1.0}))
    t = TrainConfig(zero_stage=2, deepspeed_config=str(good))
    c = deepspeed_config(t, world_size=2, size=SMALL)
    assert c["zero_optimization"]["contiguous_gradients"] is False
    assert c["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"bad.json: 'zero_optimization.stage' is 3 but train.zero_stage gives 2"):
        deepspeed_config(TrainConfig(zero_stage=2, deepspeed_config=str(bad)), world_size=2, size=SMALL)
    with pytest.raises(ConfigError, match=r"does not exist"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "none.json")), world_size=1, size=SMALL)


def test_warmup_then_cosine_to_a_tenth():
    assert warmup_cosine(0, warmup=10, total=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(55, warmup=10, total=100) == pytest.approx(0.55)
    assert warmup_cosine(100, warmup=10, total=100) == pytest.approx(0.1)


def test_the_gpu_benchmark_script_dry_runs_on_the_cpu(tmp_path):
    """bench/gpu.sh --dry-run: the same path as on a CUDA machine (models built, ZeRO-2 and ZeRO-3
    engines stepped under torchrun, FLOPs counted), tiny sizes on the CPU; one row per case."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(["bash", str(repo / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path),
                        "--data", str(tmp_path / "data")], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu-latest.json").read_text())["gpu"]
    assert sorted(res["cases"]) == [f"{m} zero{z}" for m in ("base", "large", "xl") for z in (2, 3)]
    for case in res["cases"].values():
        assert case["step_s"] > 0 and case["tokens_per_s"] > 0 and 0 < case["mfu"] < 1
    assert "base zero3: MFU (recorded)" in p.stdout


def test_weight_decay_reaches_linear_weights_only():
    """train.weight_decay decays the linear layers' weight matrices, never biases, norms, the
    embedding tables or the item bias (every parameter in exactly one group)."""
    from model import ModelConfig, Vocabulary, build_recommender
    from train.engine import parameter_groups

    m = build_recommender(ModelConfig(d_model=16, n_layers=2, n_heads=2, item_bias=True, sequence="dual",
                                      view_layers=1), Vocabulary(("A", "B"), (30, 40)))
    decay, plain = parameter_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(plain["params"]) == len(list(m.parameters()))
    assert "encoder.blocks.0.qkv.weight" in decayed and "encoder.blocks.0.ff.0.weight" in decayed
    assert not any(n.endswith("bias") or ".ln" in n or n.startswith("embedding.") for n in decayed)
    assert {"embedding.item.weight", "embedding.position.weight", "item_bias"} <= {names[id(p)] for p in plain["params"]}


def test_the_engine_asks_the_model_for_its_blocks_and_checkpointing_instead_of_inspecting_it():
    """ModelSize's largest block and activation checkpointing come from the recommender's own
    blocks()/set_activation_checkpointing(); its external parameters are the tied item table."""
    from model import ModelConfig, Vocabulary, build_recommender
    from train.engine import ModelSize

    m = build_recommender(ModelConfig(d_model=16, n_layers=2, n_heads=2, sequence="dual", view_layers=1),
                          Vocabulary(("A", "B"), (30, 40)))
    assert len(m.blocks()) == 2 + 2 * 1  # the shared encoder's two, one per domain's view encoder
    block = sum(p.numel() for p in m.blocks()[0].parameters())
    assert ModelSize.of(m).largest_block == block
    m.set_activation_checkpointing(True)
    assert all(enc.checkpoint_blocks for enc in m.encoders()) and len(m.encoders()) == 3
    assert m.external_parameters() == [m.embedding.item.weight]
