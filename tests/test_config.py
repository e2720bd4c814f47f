import dataclasses
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, ModelConfig, load_config, save_config

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


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  micro_batch_size: lots\n", [], r"exp.yaml: key 'train.micro_batch_size' expects int"),
    ("model:\n  n_layers: true\n", [], r"exp.yaml: key 'model.n_layers' expects int"),  # bool is no int
    ("train:\n  precision: fp8\n", [], r"exp.yaml: key 'train.precision' must be one of"),
    ("model: huge\n", [], r"exp.yaml: key 'model' names preset 'huge'"),
    ("data:\n  domains: [A, B]\n  target: C\n", [], r"exp.yaml: data.target='C' is not one of"),
    ("name: x\n", ["model.nope=3"], r"command line: unknown config key 'model.nope'"),
    ("name: x\n", ["model.dropout=high"], r"command line: key 'model.dropout' expects float"),
    ("name: x\n", ["model.dropout"], r"command line: override 'model.dropout' is not of the form"),
    ("data:\n  format: table\n  files: {A: [a.csv], C: [c.csv]}\n", [], r"data.files.C: 'C' is not one of"),
    ("data:\n  format: table\n  path: x.csv\n  filter: {min_rating: 4}\n", [],
     r"data.filter.min_rating needs ratings"),
    ("name: x\n", ["data.filter.min_events=2"], r"data.filter.min_events=2; leave-one-out needs >= 3"),
    ("name: x\n", ["data.filter.duplicates=drop"], r"key 'data.filter.duplicates' must be one of"),
    ("data:\n  format: amazon\n", [], r"data.format='amazon' needs data.files"),
    ("name: x\n", ["model.causal=false"], r"model.objective='next_item' needs causal=True"),
    ("name: x\n", ["model.objective=masked"], r"model.objective='masked' needs causal=False"),
    ("name: x\n", ["model.loss=uniform", "model.sampled_negatives=0"],
     r"model.loss=uniform needs sampled_negatives >= 1"),
    ("name: x\n", ["train.init_from=runs/a"], r"train.init_from='runs/a' starts the joint stage from that run's"),
    ("name: x\n", ["train.source.distill=0.5"], r"command line: train.source.distill=0.5: only the joint stage distils"),
    ("name: x\n", ["train.stages=[source, joint]", "train.joint.distill=0.5"],
     r"command line: train.joint.distill=0.5 learns from the target-only model, so train.stages must hold 'target_only'"),
    ("name: x\n", ["train.joint.distill=1.5"], r"command line: train.joint.distill must be in \[0, 1\], got 1.5"),
    ("name: x\n", ["train.joint.distill_temperature=0"], r"command line: train.joint.distill_temperature must be > 0, got 0"),
    ("name: x\n", ["train.joint.distill=0.5", "model.loss=sampled"],
     r"train.joint.distill=0.5 needs model.loss=full without exclude_own_items"),
    ("name: x\n", ["train.stages=[target_only, joint]"], r"train.stages has 'joint' without 'source'"),
    ("name: x\n", ["train.joint.plateau_decay=0"], r"command line: train.joint.plateau_decay must be in \(0, 1\], got 0"),
    ("name: x\n", ["model.view_domains=[B]"], r"model.view_domains=\['B'\] needs sequence=dual, got 'mixed'"),
    ("name: x\n", ["model.sequence=dual", "model.view_domains=[C]"], r"model.view_domains: 'C' is not one of data.domains"),
    ("name: x\n", ["model.view_layers=1"], r"model.view_layers=1 needs sequence=dual, got 'mixed'"),
    ("name: x\n", ["train.autocast=bf16", "train.precision=bf16"],
     r"command line: train.autocast=bf16 needs train.precision=fp32 \(the weights stay fp32\), got bf16"),
    ("name: x\n", ["model.transition_dropout=0.5"], r"command line: model.transition_dropout needs transition_table: true"),
    ("name: x\n", ["model.transition_residual=true"], r"command line: model.transition_residual needs transition_table: true"),
    ("name: x\n", ["model.sequence=dual", "model.view_layers=-1"], r"model.view_layers must be >= 0, got -1"),
    ("name: x\n", ["model.sequence=dual", "model.view_shared=true"],
     r"command line: model.view_shared needs view_layers >= 1 \(0 views through the shared encoder\)"),
    ("name: x\n", ["model.uniform_aux=0.5", "model.loss=uniform"],
     r"command line: model.uniform_aux=0.5 needs loss=full, got 'uniform'"),
    ("name: x\n", ["model.uniform_aux=0.5", "model.uniform_aux_domains=[C]"],
     r"model.uniform_aux_domains: 'C' is not one of data.domains"),
    ("name: x\n", ["model.exclude_own_items=true", "model.loss=sampled"],
     r"command line: model.exclude_own_items needs loss=full, got 'sampled'"),
    ("name: x\n", ["train.joint.micro_batch_size=-1"],
     r"command line: train.joint.micro_batch_size must be >= 0 \(0: train.micro_batch_size\), got -1"),
    ("name: x\n", ["model.temperature=-0.5"], r"command line: model.temperature must be >= 0 \(0 = dot product\), got -0.5"),
    ("name: x\n", ["model.label_smoothing=1.0"], r"command line: model.label_smoothing must be in \[0, 1\), got 1.0"),
    ("name: x\n", ["model.label_smoothing=0.1", "model.loss=sampled"],
     r"command line: model.label_smoothing needs loss=full without exclude_own_items"),
    ("name: x\n", ["eval.prior=-0.5"], r"command line: eval.prior must be >= 0 \(0 = the model's scores alone\), got -0.5"),
    ("name: x\n", ["eval.transition=-1"], r"command line: eval.transition must be >= 0 \(0 = off\), got -1$"),
    ("name: x\n", ["data.split=temporal", "data.split_quantiles=[0.9,0.5]"],
     r"data.split_quantiles=\[0.9, 0.5\]: two increasing quantiles in \(0, 1\)"),
    ("name: x\n", ["data.split_times=[5]"], r"data.split_times=\[5.0\]: two increasing times"),
], ids=["type", "bool-not-int", "literal", "preset", "cross-field", "override-key", "override-type",
        "override-form", "files-domain", "rating-column", "min-events", "duplicates", "amazon-files", "bidirectional-next-item",
        "causal-cloze", "no-negatives", "init-from-and-source", "distill-not-joint", "distill-without-teacher",
        "distill-range", "distill-temperature", "distill-not-full", "joint-without-source", "plateau-decay",
        "view-without-dual", "view-domain", "view-layers-without-dual", "autocast-not-fp32", "transition-dropout-without-table",
        "transition-residual-without-table",
        "view-layers-negative", "view-shared-without-layers",
        "uniform-aux-not-full", "uniform-aux-domain",
        "exclude-own-items-not-full", "stage-micro-batch", "temperature-negative", "label-smoothing-range",
        "label-smoothing-not-full", "prior-negative", "transition-negative", "split-quantiles", "split-times"])
def test_bad_values_name_key_and_origin(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides)


def test_a_stage_micro_batch_overrides_the_global_one_for_that_stage_only(tmp_path):
    cfg = load_config(_write(tmp_path, "name: x\n"), ["train.micro_batch_size=64", "train.source.micro_batch_size=16"])
    assert cfg.train.for_stage("source").micro_batch_size == 16
    assert cfg.train.for_stage("joint").micro_batch_size == 64
    assert cfg.train.for_stage("source").global_batch_size(world_size=2) == 32
    assert cfg.train.micro_batch_size == 64  # the run's config is left as it was


def test_an_experiment_naming_only_its_data_trains_every_stage_until_early_stopping(tmp_path):
    """No fixed epoch count by default: the cap is far above where patience ends a stage."""
    cfg = load_config(_write(tmp_path, "name: x\ndata: amazon-food-kitchen\n"), [])
    for stage in ("source", "joint", "target_only"):
        sc = getattr(cfg.train, stage)
        assert sc.epochs >= 100 and sc.patience == 3


def test_preset_and_overrides_apply_in_order(tmp_path):
    p = _write(tmp_path, "model:\n  preset: small\n  n_layers: 3\n")
    cfg = load_config(p, ["model.n_layers=5", "train.source.lr=0.01"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.source.lr) == (32, 5, 0.01)
    assert cfg.train.global_batch_size(world_size=4) == cfg.train.micro_batch_size * cfg.train.grad_accum * 4


def test_error_inside_preset_names_the_preset_file(tmp_path):
    p = _write(tmp_path, "model: small\n")
    (tmp_path / "configs" / "model" / "small.yaml").write_text("d_modell: 32\n")
    with pytest.raises(ConfigError, match=r"small.yaml: unknown config key 'model.d_modell'"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "experiment" / "tiny.yaml", ["model.n_layers=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiment").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    cfg = load_config(path)
    assert cfg.data.source in cfg.data.domains and cfg.data.target in cfg.data.domains


def test_amazon_pairs_add_cosine_scoring_and_a_source_view_of_its_own_to_the_preset():
    """The two shipped ABXI pairs add the same keys to the `amazon` preset: cosine scoring
    (temperature 0.1) and the source domain's own-domain view through a 1-block encoder (as
    measured in the README); every other model key, and the reverse directions, stay the preset's."""
    preset = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / "amazon.yaml").read_text()))
    assert preset.temperature == 0.0 and preset.sequence == "mixed"
    experiments = REPO / "configs" / "experiment"
    for name in ("amazon-kitchen-food", "amazon-electronics-beauty"):
        assert load_config(experiments / f"{name}.yaml").model == preset, name
    for name, source in (("amazon-food-kitchen", "food"), ("amazon-beauty-electronics", "beauty")):
        cfg = load_config(experiments / f"{name}.yaml")
        assert cfg.data.source == source, name
        keys = {"sequence": "dual", "view_layers": 1, "view_domains": [source]}
        model = cfg.model
        assert model.temperature == 0.1, name
        assert {k: getattr(model, k) for k in keys} == keys, name
        assert dataclasses.replace(model, temperature=0.0, **{k: getattr(preset, k) for k in keys}) == preset, name


def test_float_settings_accept_exponent_notation_from_files_and_the_command_line(tmp_path):
    """YAML 1.1 reads 1e6 (no dot) as a string; a float key takes it as the number it spells."""
    cfg = load_config(_write(tmp_path, "train:\n  source: {lr: 1e-3}\n"), ["train.joint.lr=1e6", "eval.prior=.5"])
    assert cfg.train.source.lr == 0.001 and cfg.train.joint.lr == 1e6 and cfg.eval.prior == 0.5
    for bad in ("inf", "nan", "1e", "ten"):  # not finite, or not a number
        with pytest.raises(ConfigError, match=f"key 'train.joint.lr' expects float, got '{bad}'"):
            load_config(_write(tmp_path, "name: x\n"), [f"train.joint.lr={bad}"])
    with pytest.raises(ConfigError, match="key 'train.micro_batch_size' expects int"):  # ints stay strict
        load_config(_write(tmp_path, "name: x\n"), ["train.micro_batch_size=1e2"])


@pytest.mark.parametrize("preset", ["large", "xl"])
def test_scale_presets_build_on_the_meta_device_with_the_parameter_counts_their_headers_state(preset):
    """configs/model/<preset>.yaml states its parameters without the item table and per item;
    its experiment builds (on the meta device: no memory) to exactly that count."""
    import re

    import torch

    from tools.plan import count_parts
    from train.stages import build_model

    header = (REPO / "configs" / "model" / f"{preset}.yaml").read_text()
    base, per_item = (int(x.replace(",", "")) for x in
                      re.search(r"# ([\d,]+) parameters of encoder, heads and position/domain tables, plus ([\d,]+) "
                                r"per item", header).groups())
    cfg = load_config(REPO / "configs" / "experiment" / f"{preset}.yaml")
    assert cfg.model.d_model == per_item
    for n_items in (2968, 28095):
        manifest = {"domains": [{"name": "A", "offset": 0, "n_items": n_items // 2},
                                {"name": "B", "offset": n_items // 2, "n_items": n_items - n_items // 2}]}
        with torch.device("meta"):
            parts = count_parts(build_model(cfg, manifest))
        assert sum(parts.values()) == base + per_item * (n_items + 1)
    assert (sum(parts.values()) >= 10 ** 9) == (preset == "xl")
    assert 150e6 <= base + per_item * 2969 <= 300e6 or preset == "xl"


def test_presets_resolve_from_anywhere_and_from_the_command_line(tmp_path):
    """An experiment file outside configs/ finds presets in its own tree first, then in the
    project's configs/; `model=<preset>` on the command line selects one; a misspelled preset
    lists the ones there are."""
    lone = tmp_path / "anywhere" / "exp.yaml"
    lone.parent.mkdir()
    lone.write_text("name: lone\nmodel: base\ndata: synthetic\n")
    cfg = load_config(lone)
    assert cfg.model.d_model == 64 and cfg.data.name == "synthetic"  # the project's base and synthetic presets
    own = _write(tmp_path / "tree", "model: small\n")  # its own configs/model/small.yaml comes first
    assert load_config(own).model.d_model == 32
    wide = load_config(lone, ["model=wide", "model.n_layers=3"])
    assert (wide.model.d_model, wide.model.dropout, wide.model.n_layers) == (128, 0.3, 3)
    with pytest.raises(ConfigError, match=r"command line: key 'model' names preset 'wdie', which is not in .*; known: "
                                          r"\[.*'base'.*'wide'.*\]"):
        load_config(lone, ["model=wdie"])
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'data' names preset 'synthetc'.*known: \[.*'synthetic'"):
        (tmp_path / "anywhere" / "bad.yaml").write_text("data: synthetc\n")
        load_config(tmp_path / "anywhere" / "bad.yaml")
