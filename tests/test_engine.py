import json

import pytest

from train.config import ConfigError, TrainConfig
from train.engine import deepspeed_config, warmup_cosine


def test_generated_config_is_the_one_source_of_batch_sizes():
    t = TrainConfig(micro_batch_size=16, grad_accum=4, zero_stage=3, precision="bf16")
    c = deepspeed_config(t, world_size=8, n_params=10_000)
    assert c["train_batch_size"] == 16 * 4 * 8 == t.global_batch_size(8)
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["reduce_bucket_size"] == 1_000_000  # capped near the model size
    assert "offload_optimizer" not in c["zero_optimization"]
    t.offload_optimizer = True
    assert deepspeed_config(t, world_size=1)["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_user_json_adds_tuning_but_cannot_contradict(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {
        "stage": 2, "contiguous_gradients": False}, "gradient_clipping": 1.0}))
    t = TrainConfig(zero_stage=2, deepspeed_config=str(good))
    c = deepspeed_config(t, world_size=2)
    assert c["zero_optimization"]["contiguous_gradients"] is False
    assert c["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"bad.json: 'zero_optimization.stage' is 3 but train.zero_stage gives 2"):
        deepspeed_config(TrainConfig(zero_stage=2, deepspeed_config=str(bad)), world_size=2)
    with pytest.raises(ConfigError, match=r"does not exist"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "none.json")), world_size=1)


def test_warmup_then_cosine_to_a_tenth():
    assert warmup_cosine(0, warmup=10, total=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(55, warmup=10, total=100) == pytest.approx(0.55)
    assert warmup_cosine(100, warmup=10, total=100) == pytest.approx(0.1)
