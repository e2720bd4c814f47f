"""End-to-end: one real (tiny) source-then-joint run through DeepSpeed and an offline W&B run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.engine import warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def run_tiny(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``xdrec train`` on the tiny experiment in a subprocess (W&B off), outputs under ``tmp_path``."""
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
           f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def train_tiny(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """:func:`run_tiny`, asserting it exits 0."""
    p = run_tiny(tmp_path, *overrides)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "WANDB_DIR": str(work)}
    cmd = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
           f"runs_dir={work / 'runs'}", f"data.out_dir={work / 'data'}", "tracking.wandb=true",
           "train.source.epochs=4", "train.target_only.epochs=3", "train.joint.epochs=2"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "wandb: WARNING" not in p.stdout + p.stderr, "W&B warns on the console"
    return work / "runs" / "tiny", p.stdout


def test_metrics_json_has_the_agreed_shape(tiny_run):
    run, _ = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    for stage, domains in (("source", ["A"]), ("joint", ["A", "B"]), ("target_only", ["B"])):
        for split in ("valid", "test"):
            assert sorted(m[stage][split]) == domains
            for d in domains:
                for proto in ("full", "sampled999"):
                    r = m[stage][split][d][proto]
                    assert 0.0 <= r["ndcg@10"] <= r["hr@10"] <= 1.0 and 0.0 < r["mrr"] <= 1.0
                    assert r["n_users"] > 0
    assert m["_meta"]["eval"] == {"num_negatives": 50, "seed": 2025, "prior": 0.0, "transition": 0.0, "exclude_history": True}  # the tiny experiment's protocol


def test_report_names_the_recorded_sampled_protocol(tiny_run):
    from train.report import aggregate, format_report
    run, _ = tiny_run
    agg = aggregate([run])
    assert agg["num_negatives"] == 50
    assert "transfer B sampled (50 negatives) ndcg@10: joint - target-only" in format_report(agg)


def test_cold_start_buckets_and_paired_bootstrap_in_metrics(tiny_run):
    run, out = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    for stage in ("joint", "target_only"):
        test = m[stage]["test"]["B"]
        buckets = test["cold_start"]
        assert list(buckets) == ["0", "1-5", "6-10", ">10"]
        for proto in ("full", "sampled999"):
            assert sum(b[proto]["n_users"] for b in buckets.values()) == test[proto]["n_users"]
    tr = m["transfer"]
    for proto in ("full", "sampled999"):
        t = tr[proto]
        assert t["a"] == pytest.approx(m["joint"]["test"]["B"][proto]["ndcg@10"])
        assert t["b"] == pytest.approx(m["target_only"]["test"]["B"][proto]["ndcg@10"])
        assert t["ci95"][0] <= t["diff"] <= t["ci95"][1] and t["n_users"] == m["joint"]["test"]["B"][proto]["n_users"]
    # the tiny experiment ranks against 50 negatives: the log names that, not the metrics.json key
    assert "transfer on B test, sampled (50 negatives) NDCG@10: joint - target-only" in out
    assert "B NDCG@10, sampled (50 negatives): source-then-joint" in out and "sampled999" not in out


def test_test_users_grouped_by_the_domain_of_their_latest_input_event(tiny_run):
    """Each B test user's group is the domain of the last event of the whole history, also for the
    target-only model, which reads B's events only; the groups split the users; the report prints them."""
    import numpy as np

    from train.config import load_config
    from train.data.prepare import load_manifest
    from train.data.stream import eval_samples, vocabulary
    from train.report import aggregate, format_report

    run, _ = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    folder = load_config(run / "config.yaml").data.prepared_dir()
    manifest = load_manifest(folder)
    vocab = vocabulary(manifest)
    latest = {s["user"]: vocab.names[int(vocab.of_ids(np.asarray(s["items"][-1:]))[0])]
              for s in eval_samples(manifest, folder, "B", "test")}
    for stage in ("joint", "target_only"):
        test = m[stage]["test"]["B"]
        groups = test["last_input"]
        assert sorted(groups) == ["A", "B"], groups  # the target-only model's group A: read off the whole history
        for proto in ("full", "sampled999"):
            assert sum(g[proto]["n_users"] for g in groups.values()) == test[proto]["n_users"]
            assert sum(g[proto]["ndcg@10"] * g[proto]["n_users"] for g in groups.values()) == \
                pytest.approx(test[proto]["ndcg@10"] * test[proto]["n_users"])
        ranks = np.load(run / stage / "test_ranks.npz")
        assert [vocab.names[k] for k in ranks["B/last_domain"]] == [latest[u] for u in ranks["B/user"].tolist()]
        assert groups["A"]["full"]["n_users"] == sum(v == "A" for v in latest.values())
    text = format_report(aggregate([run]))
    a_of = lambda stage: m[stage]["test"]["B"]["last_input"]["A"]
    assert (f"B test ndcg@10 full (sampled), latest input event in A ({a_of('joint')['full']['n_users']:,} users): "
            f"target-only {a_of('target_only')['full']['ndcg@10']:.4f} ({a_of('target_only')['sampled999']['ndcg@10']:.4f}); "
            f"source-then-joint {a_of('joint')['full']['ndcg@10']:.4f} ({a_of('joint')['sampled999']['ndcg@10']:.4f})") in text


def test_training_lowers_the_loss(tiny_run):
    run, _ = tiny_run
    meta = json.loads((run / "metrics.json").read_text())["_meta"]
    losses = meta["source"]["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05


def test_joint_starts_from_source_checkpoint(tiny_run):
    run, out = tiny_run
    assert (run / "source" / "checkpoints" / "best").is_dir()
    assert "starting from the best source weights" in out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = lambda key: next(r[key] for r in lines if key in r)
    # The first logged source-domain CE of the joint stage is already well below the source
    # stage's first one: the joint stage did not start from the random init.
    assert first("joint/ce_A") < first("source/ce_A") - 0.1


def test_resolved_config_saved_beside_outputs(tiny_run):
    run, _ = tiny_run
    from train.config import load_config

    cfg = load_config(run / "config.yaml")
    assert cfg.train.source.epochs == 4 and cfg.name == "tiny"
    assert (run / "source" / "checkpoints" / "config.yaml").is_file()


def test_offline_wandb_run_directory_and_local_jsonl(tiny_run):
    run, _ = tiny_run
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "the offline run has no .wandb log"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("source/loss" in r for r in lines) and any("joint/test/B/full/ndcg@10" in r for r in lines)
    # the run's plots, drawn for W&B, and metrics.json saved into the W&B run's files
    for name in ("loss", "valid", "transfer", "cold_start"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 10_000, name
    assert (offline[0] / "files" / "metrics.json").read_text() == (run / "metrics.json").read_text()


def test_report_writes_plots_and_markdown_with_the_numbers_of_metrics_json(tiny_run, tmp_path):
    run, stdout = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    p = subprocess.run([sys.executable, "-m", "train.cli", "report", str(run), "--plots", str(tmp_path / "rep")],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("loss", "valid", "transfer", "cold_start"):
        assert (tmp_path / "rep" / f"{name}.png").stat().st_size > 10_000, name
    row = [line for line in p.stdout.splitlines() if line.startswith("source-then-joint   B")][0]
    assert row.split()[2:] == [f"{m['joint']['test']['B'][proto][k]:.4f}" for proto in ("full", "sampled999")
                               for k in ("hr@10", "ndcg@10", "mrr")]
    assert "±" not in row  # one run: no spread to show
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| source-then-joint | B | {m['joint']['test']['B']['full']['hr@10']:.4f} |" in md and "![loss](loss.png)" in md
    assert "[target_only] epoch 1/3" in stdout and "valid full ndcg@10 (B)" in stdout  # the training's names


def test_cli_reports_config_errors_before_work(tmp_path):
    p = subprocess.run([sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
                        "model.n_layer=2", f"runs_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert "command line: unknown config key 'model.n_layer'" in p.stderr
    assert not any(tmp_path.iterdir())


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    base = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
            f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", "tracking.wandb=true",
            "train.stages=[source]", "train.log_every=1"]
    p1 = subprocess.run([*base, "train.stop_after_steps=3"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p1.returncode == 0 and "stopped at step 3" in p1.stdout, p1.stderr[-2000:]
    first = (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()
    p2 = subprocess.run([*base, "--resume", "auto"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p2.returncode == 0, p2.stderr[-2000:]
    run_id = (tmp_path / "tiny" / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    # the resumed process continues the step axis (W&B drops records whose step goes back)
    steps = [json.loads(x)["step"] for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert len(first) == 3 and steps == sorted(steps) and steps[3] > steps[2] > 0


def test_resume_under_another_sampled_protocol_is_refused_before_work(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    base = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
            f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", "train.stages=[source]", "train.source.epochs=1"]
    first = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    config = (tmp_path / "tiny" / "config.yaml").read_text()
    again = subprocess.run([*base, "eval.num_negatives=20", "--resume", "auto"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 2
    assert (f"{tmp_path / 'tiny' / 'metrics.json'}: its stages were evaluated with {{'num_negatives': 50, "
            "'seed': 2025, 'prior': 0.0, 'transition': 0.0, 'exclude_history': True}, this run with {'num_negatives': 20, "
            "'seed': 2025, 'prior': 0.0, 'transition': 0.0, 'exclude_history': True}") in again.stderr
    assert (tmp_path / "tiny" / "config.yaml").read_text() == config  # refused before the run was touched
    same = subprocess.run([*base, "--resume", "auto"], cwd=REPO, env=env, capture_output=True, text=True)
    assert same.returncode == 0 and "finished in the run being resumed" in same.stdout, same.stderr[-2000:]


def test_reevaluate_scores_the_best_weights_again_under_a_new_prior_and_trains_nothing(tmp_path):
    import hashlib
    base = ["train.stages=[source]", "train.source.epochs=2"]
    train_tiny(tmp_path, *base)
    run = tmp_path / "tiny"
    first = json.loads((run / "metrics.json").read_text())
    ckpt = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "source" / "checkpoints").rglob("*") if p.is_file()}
    refused = run_tiny(tmp_path, *base, "eval.prior=1.0", "--resume", "auto")
    assert refused.returncode == 2 and "re-evaluate with --reevaluate" in refused.stderr, refused.stderr[-2000:]

    p = train_tiny(tmp_path, *base, "eval.prior=1.0", "--reevaluate")
    assert "evaluating its best weights again" in p.stdout and "epoch 1/2" not in p.stdout  # nothing trained
    second = json.loads((run / "metrics.json").read_text())
    assert second["_meta"]["eval"]["prior"] == 1.0
    assert {k: v for k, v in second["_meta"]["source"].items() if k != "reevaluated_s"} == first["_meta"]["source"]
    assert second["source"]["test"]["A"]["full"] != first["source"]["test"]["A"]["full"]
    assert ckpt == {p: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in (run / "source" / "checkpoints").rglob("*") if p.is_file()}

    train_tiny(tmp_path, *base, "--reevaluate")  # back to the model's scores alone: the first metrics exactly
    assert json.loads((run / "metrics.json").read_text())["source"] == first["source"]
    other = run_tiny(tmp_path, *base, "model.d_model=48", "--reevaluate")
    assert other.returncode == 2 and f"{run / 'config.yaml'} has model.d_model=16, this run 48" in other.stderr, \
        other.stderr[-2000:]


def test_sigusr1_checkpoints_and_exits_75_for_a_requeue(tmp_path):
    import signal
    import time

    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
           f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", "train.stages=[source]",
           "train.micro_batch_size=4", "train.log_every=1"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "tiny" / "metrics.jsonl"
    end = time.time() + 300
    while not (jsonl.is_file() and '"source/stage_step": 3' in jsonl.read_text()):
        assert p.poll() is None and time.time() < end, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-2000:]
    assert "on a preemption signal" in out
    ckpt = tmp_path / "tiny" / "source" / "checkpoints"
    assert (ckpt / (ckpt / "latest").read_text().strip() / "rng_rank0.pt").is_file()


def test_training_with_dataloader_workers_and_a_resampled_stream(tmp_path):
    p = train_tiny(tmp_path, "train.stages=[source]",
                   "train.num_workers=2", "train.resampled=true", "train.log_every=1")
    assert "2 DataLoader workers): every reader draws shards with replacement (resampled)" in p.stdout
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["_meta"]["source"]
    m = json.loads((tmp_path / "data" / "synthetic-tiny" / "manifest.json").read_text())
    per_epoch = -(-m["counts"]["A"]["train"]["samples"] // 64)  # nominal steps of one pass (batch 64)
    assert meta["steps"] == per_epoch * len(meta["epoch_losses"])


def test_a_stage_trains_with_its_own_micro_batch(tmp_path):
    """train.source.micro_batch_size=16 under train.micro_batch_size=64: the source stage takes a
    step per 16 samples (stream and DeepSpeed agree, or the engine refuses the batch), the joint
    stage keeps 64."""
    from train.data.stream import joint_rows

    p = train_tiny(tmp_path, "train.stages=[source, joint]", "train.source.micro_batch_size=16",
                   "train.source.epochs=1", "train.joint.epochs=1")
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["_meta"]
    counts = json.loads((tmp_path / "data" / "synthetic-tiny" / "manifest.json").read_text())["counts"]
    assert meta["source"]["steps"] == -(-counts["A"]["train"]["samples"] // 16)
    assert meta["joint"]["steps"] == -(-counts["B"]["train"]["samples"] // joint_rows(64, 0.5)[1])
    assert "; micro batch 16\n" in p.stdout and "; micro batch 64\n" in p.stdout


@pytest.mark.parametrize("loss, sequence, views, view_layers, zero, mean, temp, smooth, bias, table, shared",
                         [("sampled", "per_domain", "[]", 0, 0, "row", 0.1, 0, False, False, False),
                          ("uniform", "dual", "[B]", 0, 3, "target", 0, 0, True, False, False),
                          ("full", "dual", "[]", 1, 3, "row", 0.2, 0.1, True, "plain", False),
                          ("full", "dual", "[]", 2, 3, "target", 0.1, 0, False, "residual", True)])
def test_sampled_losses_and_sequence_options_train_end_to_end(tmp_path, loss, sequence, views, view_layers, zero, mean,
                                                              temp, smooth, bias, table, shared):
    """dual runs an encoder once more per domain view in a forward: under ZeRO-3 too. With
    view_layers the views have encoders of their own; the source stage leaves B's idle (its
    parameters are still in the checkpoint the joint stage loads); view_shared runs one view
    encoder twice in the joint stage's forward. The transition table is gathered and trained
    under ZeRO-3 as well, also as a residual (its second CE on detached queries and items)."""
    p = train_tiny(tmp_path, "train.stages=[source, joint]", f"model.transition_table={str(bool(table)).lower()}",
                   f"model.transition_residual={str(table == 'residual').lower()}",
                   f"model.view_shared={str(shared).lower()}",
                   f"model.loss={loss}", "model.sampled_negatives=16", f"model.sequence={sequence}",
                   f"model.view_domains={views}", f"model.view_layers={view_layers}", f"train.zero_stage={zero}",
                   f"model.loss_mean={mean}", f"model.temperature={temp}", f"model.label_smoothing={smooth}",
                   f"model.item_bias={str(bias).lower()}", "train.source.epochs=4")
    m = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    losses = m["_meta"]["source"]["epoch_losses"]
    assert losses[-1] < losses[0] - 0.05
    # a stage computes its own domains' views: the source stage (domain A) views A where every
    # domain has a view, none where the view is B's alone
    inputs = "each row's own domain only" if sequence == "per_domain" else "the mixed sequence of every domain"
    whose = f"one {view_layers}-block encoder they share" if shared else f"its own {view_layers}-block encoder"
    own = f" (each through {whose})" if view_layers else ""
    joint = inputs + ({"[B]": ", plus the own-domain view for B", "[]": ", plus the own-domain view for A, B"}[views] + own
                      if sequence == "dual" else "")
    source = inputs + (", plus the own-domain view for A" + own if views == "[]" and sequence == "dual" else "")
    trans = ", plus a learned transition vector of each domain's latest event" if table else ""
    trans += " (fitted to what the rest misses)" if table == "residual" else ""
    joint, source = joint + trans, source + trans
    assert f"[joint] inputs: {joint}\n" in p.stdout and f"[source] inputs: {source}\n" in p.stdout
    assert f"ZeRO stage {zero}" in p.stdout
    softmax = {"sampled": "sampled softmax (in-batch + 16 uniform negatives of the domain, log-Q corrected)",
               "uniform": "softmax over the target and 16 uniform negatives of its domain",
               "full": "full softmax over the target's domain"}[loss]
    per = {"row": "its rows, each row's mean first (every user weighs the same)", "target": "its targets"}[mean]
    softmax += ", label smoothing 0.1" if smooth else ""
    scores = f"cos(query, item) / {temp:g}" if temp else "dot(query, item)"
    scores += " + a learned bias per item" if bias else ""
    assert f"[joint] loss: {softmax}; a domain's loss is the mean over {per}; scores: {scores}\n" in p.stdout
    assert m["joint"]["test"]["B"]["sampled999"]["hr@10"] > 0
    if not (bias or table):
        return
    from safetensors.torch import load_file
    from train.export import export
    learned = load_file(str(export(tmp_path / "tiny", tmp_path / "export", stage="joint") / "model.safetensors"))
    if bias:  # the bias, a parameter of the model itself, is gathered and trained under ZeRO-3 as well
        assert learned["item_bias"][1:].abs().min() > 0
    if table:  # most items were some row's latest event of their domain: their vectors moved from zero
        moved = learned["transition.weight"][1:].abs().sum(1) > 0
        assert moved.float().mean() > 0.5 and learned["transition.weight"][0].eq(0).all()


def test_masked_item_objective_trains_end_to_end(tmp_path):
    train_tiny(tmp_path, "train.stages=[source]",
               "model.objective=masked", "model.causal=false", "model.mask_prob=0.3", "train.source.epochs=4")
    m = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    losses = m["_meta"]["source"]["epoch_losses"]
    assert losses[-1] < losses[0] - 0.05
    assert m["source"]["test"]["A"]["sampled999"]["hr@10"] > 0


def test_joint_stage_can_select_on_the_mean_of_both_domains(tmp_path):
    """eval.select_domains=all: the joint stage's selection value is the mean of the source's and the
    target's valid NDCG@10 (one joint epoch, so the reported valid metrics are of the same weights)."""
    train_tiny(tmp_path, "train.stages=[source, joint]",
               "train.source.epochs=2", "train.joint.epochs=1", "eval.select_domains=all")
    run = tmp_path / "tiny"
    valid = json.loads((run / "metrics.json").read_text())["joint"]["valid"]
    a, b = (valid[d]["full"]["ndcg@10"] for d in ("A", "B"))  # eval.select_protocol=full
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    selected = [r["joint/valid_select"] for r in logged if "joint/valid_select" in r]
    assert len(selected) == 1 and abs(a - b) > 1e-4
    assert selected[0] == pytest.approx((a + b) / 2, abs=1e-6)


def test_lr_decays_after_each_evaluation_without_gain_and_the_decay_survives_a_resume(tmp_path):
    """train.<stage>.plateau_decay: HR@100 with 50 negatives is 1.0 at every epoch, so only the first
    evaluation is a gain; every later one multiplies the LR by 0.5 from the next step on. A run
    stopped inside epoch 3 and resumed applies the same LRs at every step."""
    args = ["train.stages=[source]", "train.source.epochs=4", "train.source.patience=9",
            "train.source.plateau_decay=0.5", "train.log_every=1", "eval.ks=[5, 10, 100]",
            "eval.select_metric=hr@100"]

    def step_lrs(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["source/stage_step"]: (r["source/epoch"], r["source/lr"]) for r in rows if "source/lr" in r}

    train_tiny(tmp_path / "full", *args)
    lrs = step_lrs(tmp_path / "full" / "tiny")
    per_epoch = sum(1 for e, _ in lrs.values() if e == 1)  # epochs count from 1, as on the console
    assert sorted(lrs) == list(range(1, 4 * per_epoch + 1))
    for step, (epoch, lr) in lrs.items():
        # epoch e trains after e - 1 evaluations, the first of which was a gain
        expect = 0.005 * warmup_cosine(step, warmup=5, total=4 * per_epoch) * 0.5 ** max(0, epoch - 2)
        assert lr == pytest.approx(expect, rel=1e-6), (step, epoch)
    scales = [json.loads(line)["source/lr_scale"] for line in (tmp_path / "full" / "tiny" / "metrics.jsonl")
              .read_text().splitlines() if "source/lr_scale" in line]
    assert scales == [1.0, 1.0, 0.5, 0.25]

    train_tiny(tmp_path / "cut", *args, f"train.stop_after_steps={2 * per_epoch + 1}")
    resumed = train_tiny(tmp_path / "cut", *args, "--resume", "auto")
    assert f"resuming at epoch 3, batch 1, step {2 * per_epoch + 1}" in resumed.stdout
    again = step_lrs(tmp_path / "cut" / "tiny")
    assert sorted(again) == sorted(lrs)
    assert all(again[s][1] == pytest.approx(lrs[s][1], rel=1e-6) for s in lrs)


def test_joint_stage_can_start_from_another_runs_source_stage(tmp_path):
    """train.init_from: a [joint] run started from run a's finished source stage takes the same
    steps as a's own joint stage (same seed, weights and stream) and carries a's source metrics;
    a run whose model differs from a's is refused before training, naming the key and the file."""
    common = ["train.log_every=1", "train.joint.epochs=1"]
    train_tiny(tmp_path, "name=a", "train.stages=[source, joint]", *common)
    train_tiny(tmp_path, "name=b", "train.stages=[joint]", f"train.init_from={tmp_path / 'a'}", *common)

    def joint_losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["joint/stage_step"]: r["joint/loss"] for r in rows if "joint/loss" in r}

    a, b = joint_losses("a"), joint_losses("b")
    assert len(a) >= 3 and sorted(a) == sorted(b)
    assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in a)
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert mb["source"] == ma["source"] and mb["_meta"]["source"]["init_from"] == str(tmp_path / "a")
    assert mb["joint"]["test"]["B"] == ma["joint"]["test"]["B"]

    bad = run_tiny(tmp_path, "name=c", "train.stages=[joint]", f"train.init_from={tmp_path / 'a'}", "model.n_layers=2")
    assert bad.returncode == 2
    assert f"{tmp_path / 'a' / 'config.yaml'} has model.n_layers=1, this run 2" in bad.stderr
    assert not (tmp_path / "c" / "joint").exists()  # refused before the stage began


def test_the_joint_stage_distils_from_the_target_only_model_of_this_run_or_of_init_from(tmp_path):
    """train.joint.distill: the joint stage's teacher is the target-only stage's best weights, of this
    run or of train.init_from's (the same teacher, source weights and stream take the same steps);
    without it the steps differ; an init_from run without a target-only stage is refused before
    training, naming the folders."""
    common = ["train.log_every=1", "train.joint.epochs=1", "train.source.epochs=1", "train.target_only.epochs=1"]
    b = train_tiny(tmp_path, "name=b", "train.joint.distill=0.5", *common)
    assert f"[joint] distilling from target_only's best weights in {tmp_path / 'b' / 'target_only' / 'checkpoints'}" \
        in b.stdout
    assert "0.5 x the CE against the target-only model's next-item distribution given" in b.stdout
    c = train_tiny(tmp_path, "name=c", "train.stages=[joint]", f"train.init_from={tmp_path / 'b'}",
                   "train.joint.distill=0.5", *common)
    assert f"distilling from target_only's best weights in {tmp_path / 'b' / 'target_only' / 'checkpoints'}" in c.stdout
    train_tiny(tmp_path, "name=plain", "train.stages=[joint]", f"train.init_from={tmp_path / 'b'}", *common)

    def joint_losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["joint/stage_step"]: r["joint/loss"] for r in rows if "joint/loss" in r}

    lb, lc, lp = joint_losses("b"), joint_losses("c"), joint_losses("plain")
    assert len(lb) >= 3 and sorted(lb) == sorted(lc) == sorted(lp)
    assert all(lc[s] == pytest.approx(lb[s], abs=1e-6) for s in lb)
    assert all(abs(lp[s] - lb[s]) > 1e-3 for s in lb)

    train_tiny(tmp_path, "name=src", "train.stages=[source]", *common)
    bad = run_tiny(tmp_path, "name=d", "train.stages=[joint]", f"train.init_from={tmp_path / 'src'}",
                   "train.joint.distill=0.5", *common)
    assert bad.returncode == 2
    assert f"no best weights of stage target_only in {tmp_path / 'd' / 'target_only' / 'checkpoints'} or " \
           f"{tmp_path / 'src' / 'target_only' / 'checkpoints'}" in bad.stderr
    assert not (tmp_path / "d" / "joint").exists()


@pytest.mark.parametrize("pair, source, target", [("amazon-food-kitchen", "food", "kitchen"),
                                                    ("amazon-beauty-electronics", "beauty", "electronics")])
def test_the_source_view_of_an_amazon_pair_leaves_its_target_only_baseline_as_it_was(pair, source, target, tmp_path):
    """Both shipped pairs view the source domain through an encoder of its own; the target-only
    stage scores the target alone, so its model must start, score and train as the plain cosine
    model does (the view encoder idle, its init leaving the RNG where the plain model's leaves
    it), while the joint stage's source scores do change."""
    import dataclasses

    import torch

    from conftest import abxi_slice
    from train.config import load_config
    from train.data.prepare import load_manifest, prepare
    from train.stages import build_model

    data = abxi_slice(tmp_path / "raw", pair)
    cfg = load_config(REPO / f"configs/experiment/{pair}.yaml",
                      [f"data.path={data}", f"data.out_dir={tmp_path}", "tracking.wandb=false"])
    assert cfg.model.view_domains == [source] and cfg.model.view_layers == 1
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sequence="mixed", view_layers=0,
                                                                view_domains=[]))
    prepare(cfg.data, log=lambda *_: None)
    manifest = load_manifest(cfg.data.prepared_dir())
    viewed = build_model(cfg, manifest, [target])
    rng_viewed = torch.get_rng_state()
    base = build_model(plain, manifest, [target])
    # the idle source encoder's init must not shift the random stream the stage's dropout draws from
    assert torch.equal(rng_viewed, torch.get_rng_state())
    vs, bs = viewed.state_dict(), base.state_dict()
    assert set(vs) - set(bs) and all(k.startswith("view_encoders.") for k in set(vs) - set(bs))
    assert all(torch.equal(vs[k], bs[k]) for k in bs)
    (src, _), (tgt, _) = viewed.ranges
    items = torch.tensor([[0, 0, src, tgt, src + 3, tgt + 5, src + 9, tgt + 2]])
    targets = torch.roll(items, -1, dims=1)
    target_index = 1
    for m in (viewed, base):
        m.eval()
    assert torch.equal(viewed(items, domain=target_index), base(items, domain=target_index))
    for m in (viewed, base):
        m.train()
    losses = []
    for m in (viewed, base):
        torch.manual_seed(1)
        sums, _ = m(items, targets=targets)
        losses.append(sums[target_index])
    assert torch.equal(losses[0], losses[1])  # same dropout draws, same loss
    # the joint stage's model does use the source view: its source scores differ from the plain model's
    joint_viewed, joint_base = build_model(cfg, manifest, [source, target]).eval(), build_model(plain, manifest).eval()
    assert not torch.allclose(joint_viewed(items, domain=0), joint_base(items, domain=0), atol=1e-4)


def test_a_stage_adds_the_uniform_aux_loss_only_for_the_listed_domains_it_trains():
    """model.uniform_aux_domains=[source]: the target-only stage's model draws nothing and trains
    exactly as the model without the auxiliary loss (same loss, same random stream after the
    step), while the joint stage's model adds it to the source's loss; [] lists every domain."""
    import dataclasses

    import torch

    from train.config import load_config
    from train.stages import build_model

    cfg = load_config(REPO / "configs/experiment/tiny.yaml", ["model.uniform_aux=0.5", "model.sampled_negatives=8"])
    source, target = cfg.data.source, cfg.data.target
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, uniform_aux_domains=[source]))
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, uniform_aux=0.0, uniform_aux_domains=[]))
    manifest = {"domains": [{"name": n, "offset": 20 * i, "n_items": 20} for i, n in enumerate(cfg.data.domains)]}
    s, t = cfg.data.domains.index(source), cfg.data.domains.index(target)
    slo, tlo = 20 * s + 1, 20 * t + 1  # each domain's first item id
    items = torch.tensor([[0, 0, slo, tlo, slo + 3, tlo + 5, slo + 9, tlo + 2]])
    targets = torch.roll(items, -1, dims=1)
    results = {}
    for name, c, domains in (("to_aux", cfg, [target]), ("to_plain", plain, [target]),
                             ("joint_aux", cfg, [source, target]), ("joint_plain", plain, [source, target])):
        m = build_model(c, manifest, domains).train()
        torch.manual_seed(1)
        sums, _ = m(items, targets=targets)
        results[name] = (torch.stack(sums).detach(), torch.get_rng_state())
    assert torch.equal(results["to_aux"][0], results["to_plain"][0])
    assert torch.equal(results["to_aux"][1], results["to_plain"][1])
    joint_aux, joint_plain = results["joint_aux"][0], results["joint_plain"][0]
    assert not torch.equal(results["joint_aux"][1], results["joint_plain"][1])  # the source's draw
    assert joint_aux[s] > joint_plain[s]  # plus 0.5 x a (positive) CE on the source
    assert torch.equal(joint_aux[t], joint_plain[t])
    every = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, uniform_aux_domains=[]))
    assert build_model(every, manifest, [target]).loss.aux.domains == (t,)
    assert build_model(every, manifest).loss.aux.domains == tuple(sorted([s, t]))


def test_ctrl_c_checkpoints_at_the_next_step_and_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGINT during training: a checkpoint at the next optimizer step, one 'resume with' line
    naming the command, exit 130; resumed with it, the run ends as the uninterrupted one does."""
    import signal
    import time

    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    over = ["train.stages=[source]", "train.micro_batch_size=4", "train.source.epochs=1", "train.log_every=1"]
    whole = train_tiny(tmp_path / "whole", *over)
    assert whole.returncode == 0
    cmd = [sys.executable, "-m", "train.cli", "train", str(REPO / "configs/experiment/tiny.yaml"),
           f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}", *over]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "tiny" / "source" / "checkpoints"
    end = time.time() + 300
    jsonl = tmp_path / "tiny" / "metrics.jsonl"
    while not (jsonl.is_file() and '"source/stage_step": 3' in jsonl.read_text()):
        assert p.poll() is None and time.time() < end, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "SIGINT: stopping at the next optimizer step with a checkpoint" in err
    stopped = [line for line in out.splitlines() if "stopped at step" in line][0]
    step = int(stopped.split("stopped at step ")[1].split()[0])
    assert 0 < step < json.loads((tmp_path / "whole" / "tiny" / "metrics.json").read_text())["_meta"]["source"]["steps"]
    assert (ckpt / (ckpt / "latest").read_text().strip() / "rng_rank0.pt").is_file()
    again = [line for line in out.splitlines() if line.startswith("stopped; resume with: ")][0]
    assert again.endswith(" --resume auto") and "train.micro_batch_size=4" in again and "Traceback" not in err
    train_tiny(tmp_path, *over, "--resume", "auto")
    done = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert done["source"] == json.loads((tmp_path / "whole" / "tiny" / "metrics.json").read_text())["source"]


def test_a_run_with_the_op_already_built_says_nothing_about_building_it(tiny_run):
    """DeepSpeed prints 'built successfully' on every load by every rank; xdrec drops it and says
    'built DeepSpeed op(s)' only when one was really built (not here: the set-up built it)."""
    _, stdout = tiny_run
    assert "built successfully" not in stdout and "built DeepSpeed op" not in stdout
    assert "[source] epoch 1/4" in stdout


def test_min_epochs_keeps_a_stage_training_past_patience_until_that_many_epochs(tmp_path):
    """At lr 1e-30 the weights do not move, so the valid metric never improves after epoch 1:
    patience 1 alone would stop after epoch 2; min_epochs 3 holds the stop back to epoch 3, and
    the cap (5) is not reached."""
    from train.loop import patience_ends
    assert not patience_ends(1, 1, 2, 3) and patience_ends(1, 1, 3, 3) and patience_ends(1, 1, 2, 0)
    assert not patience_ends(0, 1, 9, 3)  # improving: never
    p = train_tiny(tmp_path, "train.stages=[source]", "train.source.lr=1e-30", "train.source.patience=1",
                   "train.source.min_epochs=3", "train.source.epochs=5")
    meta = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["_meta"]["source"]
    assert len(meta["epoch_losses"]) == 3 and meta["best_epoch"] == 0
    assert "[source] no better valid metric for 1 evaluations; stopping" in p.stdout
