from pathlib import Path

import pytest

from train.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text, name="exp.yaml"):
    d = tmp_path / "configs" / "experiment"
    d.mkdir(parents=True, exist_ok=True)
    (tmp_path / "configs" / "model").mkdir(exist_ok=True)
    (tmp_path / "configs" / "model" / "small.yaml").write_text("d_model: 32\nn_heads: 2\n")
    p = d / name
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.n_layer" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = _write(tmp_path, "train:\n  micro_batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'train.micro_batch_size' expects int"):
        load_config(p)


def test_bool_is_not_an_int(tmp_path):
    p = _write(tmp_path, "model:\n  n_layers: true\n")
    with pytest.raises(ConfigError, match="model.n_layers"):
        load_config(p)


def test_literal_choices_are_enforced(tmp_path):
    p = _write(tmp_path, "train:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"train.precision.*must be one of"):
        load_config(p)


def test_override_unknown_key_names_command_line(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'model.nope'"):
        load_config(p, ["model.nope=3"])


def test_override_wrong_type(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"command line: key 'model.dropout' expects float"):
        load_config(p, ["model.dropout=high"])


def test_preset_and_overrides_apply_in_order(tmp_path):
    p = _write(tmp_path, "model:\n  preset: small\n  n_layers: 3\n")
    cfg = load_config(p, ["model.n_layers=5", "train.source.lr=0.01"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.source.lr) == (32, 5, 0.01)
    assert cfg.train.global_batch_size(world_size=4) == cfg.train.micro_batch_size * cfg.train.grad_accum * 4


def test_missing_preset_is_an_error(tmp_path):
    p = _write(tmp_path, "model: huge\n")
    with pytest.raises(ConfigError, match=r"names preset 'huge'"):
        load_config(p)


def test_error_inside_preset_names_the_preset_file(tmp_path):
    p = _write(tmp_path, "model: small\n")
    (tmp_path / "configs" / "model" / "small.yaml").write_text("d_modell: 32\n")
    with pytest.raises(ConfigError, match=r"small.yaml: unknown config key 'model.d_modell'"):
        load_config(p)


def test_cross_field_check(tmp_path):
    p = _write(tmp_path, "data:\n  domains: [A, B]\n  target: C\n")
    with pytest.raises(ConfigError, match=r"data.target='C' is not one of"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "experiment" / "tiny.yaml", ["model.n_layers=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiment").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    cfg = load_config(path)
    assert cfg.data.source in cfg.data.domains and cfg.data.target in cfg.data.domains
