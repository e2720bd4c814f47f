"""``xdrec report``: mean/std over seeds of each run's test metrics and transfer intervals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.report import ReportError, aggregate, format_report

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, name, ndcg_joint, ndcg_only, ci, protocol=None, walls=None):
    m = lambda v, n=10: {p: {"hr@10": 2 * v, "ndcg@10": v, "mrr": v / 2, "n_users": n} for p in ("full", "sampled999")}
    by_last = lambda v: {"last_input": {"A": m(v + 0.1, 4), "B": m(v - 0.1, 6)}}  # users whose latest event is in A / B
    data = {"joint": {"test": {"B": {**m(ndcg_joint), **by_last(ndcg_joint)}, "A": m(0.3)}},
            "target_only": {"test": {"B": {**m(ndcg_only), **by_last(ndcg_only)}}},
            "transfer": {"domain": "B", "metric": "ndcg@10",
                         **{p: {"diff": ndcg_joint - ndcg_only, "ci95": ci} for p in ("full", "sampled999")}},
            "_meta": {} if protocol is None else {"eval": protocol}}
    for stage, w in (walls or {}).items():
        data["_meta"][stage] = {"wall_s": w, "done": True}
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(data))
    return d


def test_mean_std_and_transfer_over_seeds(tmp_path):
    runs = [_run(tmp_path, "s0", 0.20, 0.10, [0.05, 0.15]), _run(tmp_path, "s1", 0.30, 0.10, [-0.01, 0.4]),
            _run(tmp_path, "s2", 0.25, 0.10, [0.1, 0.2])]
    agg = aggregate(runs)
    j = agg["test"]["joint"]["B"]["sampled999"]["ndcg@10"]
    assert j["mean"] == pytest.approx(0.25) and j["std"] == pytest.approx(0.05) and j["n"] == 3
    assert agg["test"]["target_only"]["B"]["full"]["mrr"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert agg["transfer"]["sampled999"]["runs_ci_above_0"] == 2
    assert agg["transfer"]["full"]["diff"]["mean"] == pytest.approx(0.15)
    text = format_report(agg)
    assert "0.2500 ± 0.0500" in text and "above 0 in 2/3" in text


def test_report_cli_and_errors(tmp_path):
    runs = [_run(tmp_path, "s0", 0.2, 0.1, [0.05, 0.15]), _run(tmp_path, "s1", 0.2, 0.1, [0.05, 0.15])]
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "train.cli", "report", *map(str, runs), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["test"]["joint"]["A"]["full"]["ndcg@10"]["mean"] == pytest.approx(0.3)
    with pytest.raises(ReportError, match="nowhere/metrics.json: no metrics.json"):
        aggregate([tmp_path / "nowhere"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"joint": {"test": {"C": {}}}}))
    p = subprocess.run([sys.executable, "-m", "train.cli", "report", str(runs[0]), str(other)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "report runs of one experiment" in p.stderr


def test_a_saved_report_prints_the_same_tables_again_and_a_non_report_is_one_line(tmp_path):
    runs = [_run(tmp_path, "s0", 0.2, 0.1, [0.05, 0.15]), _run(tmp_path, "s1", 0.3, 0.1, [0.01, 0.2])]
    out = tmp_path / "report.json"
    cli = [sys.executable, "-m", "train.cli", "report"]
    first = subprocess.run([*cli, *map(str, runs), "--out", str(out), "--markdown"], cwd=REPO, capture_output=True,
                           text=True)
    again = subprocess.run([*cli, str(out), "--markdown"], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "| source-then-joint | B | 0.5000 ± 0.1414 |" in again.stdout
    (tmp_path / "x.json").write_text(json.dumps({"runs": []}))
    bad = subprocess.run([*cli, str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("x.json: not an `xdrec report --out` file (no test, "
                                                              "num_negatives)")
    gone = subprocess.run([*cli, str(tmp_path / "gone.json")], cwd=REPO, capture_output=True, text=True)
    assert gone.returncode == 2 and "gone.json: not a readable report JSON" in gone.stderr
    plots = subprocess.run([*cli, str(out), "--plots", str(tmp_path / "p")], cwd=REPO, capture_output=True, text=True)
    assert plots.returncode == 2 and "--plots draws from run folders" in plots.stderr


def test_saved_reports_of_runs_made_apart_pool_to_the_report_of_all_runs(tmp_path):
    runs = [_run(tmp_path, f"s{i}", v, 0.1, [v - 0.15, v], walls={"joint": 10 * i + 5}) for i, v in
            enumerate((0.2, 0.3, 0.25))]
    cli = [sys.executable, "-m", "train.cli", "report"]
    for name, part in (("a.json", runs[:2]), ("b.json", runs[2:])):
        subprocess.run([*cli, *map(str, part), "--out", str(tmp_path / name)], cwd=REPO, check=True, capture_output=True)
    pooled = subprocess.run([*cli, str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "ab.json")],
                            cwd=REPO, capture_output=True, text=True)
    assert pooled.returncode == 0, pooled.stderr
    assert json.loads((tmp_path / "ab.json").read_text()) == json.loads(json.dumps(aggregate(runs)))
    assert "above 0 in 3/3" in pooled.stdout and "0.2500 ± 0.0500" in pooled.stdout
    assert ("B test ndcg@10 full (sampled), latest input event in A (4 users): target-only 0.2000 ± 0.0000 "
            "(0.2000 ± 0.0000); source-then-joint 0.3500 ± 0.0500 (0.3500 ± 0.0500)") in pooled.stdout
    other = _run(tmp_path, "p99", 0.2, 0.1, [0.05, 0.15], {"num_negatives": 99, "seed": 2025})
    subprocess.run([*cli, str(other), "--out", str(tmp_path / "c.json")], cwd=REPO, check=True, capture_output=True)
    mixed = subprocess.run([*cli, str(tmp_path / "a.json"), str(tmp_path / "c.json")], cwd=REPO, capture_output=True,
                           text=True)
    assert mixed.returncode == 2 and "different protocols" in mixed.stderr and "num_negatives=99" in mixed.stderr
    both = subprocess.run([*cli, str(tmp_path / "a.json"), str(runs[0])], cwd=REPO, capture_output=True, text=True)
    assert both.returncode == 2 and "not both" in both.stderr


def test_runs_of_different_sampled_protocols_are_refused_and_one_protocol_is_named(tmp_path):
    p999, p99 = {"num_negatives": 999, "seed": 2025}, {"num_negatives": 99, "seed": 2025}
    a = _run(tmp_path, "a", 0.2, 0.1, [0.05, 0.15], p999)
    b = _run(tmp_path, "b", 0.2, 0.1, [0.05, 0.15], p99)
    c = _run(tmp_path, "c", 0.2, 0.1, [0.05, 0.15], {"num_negatives": 999, "seed": 7})
    with pytest.raises(ReportError, match=r"exclude_history=False, num_negatives=999, prior=0.0, seed=2025, transition=0.0 "
                                          r"in \[.*/a'\]; exclude_history=False, num_negatives=99, prior=0.0, seed=2025, "
                                          r"transition=0.0 in \[.*/b'\]\); report runs of one protocol"):
        aggregate([a, b])
    with pytest.raises(ReportError, match="different protocols"):
        aggregate([a, c])  # same N, other negatives
    d = _run(tmp_path, "d", 0.3, 0.1, [0.05, 0.15], p999)
    agg = aggregate([a, d])
    assert agg["num_negatives"] == 999
    assert "transfer B sampled (999 negatives) ndcg@10" in format_report(agg)
    assert agg["prior"] == 0.0 and "eval.prior" not in format_report(agg)
    # eval.prior changes the scores: refused beside runs without it (recorded before the field: 0)
    g = _run(tmp_path, "g", 0.3, 0.1, [0.05, 0.15], {**p999, "prior": 0.5})
    with pytest.raises(ReportError, match="different protocols"):
        aggregate([a, g])
    assert aggregate([a, _run(tmp_path, "h", 0.3, 0.1, [0.05, 0.15], {**p999, "prior": 0.0})])["prior"] == 0.0
    with_prior = aggregate([g, _run(tmp_path, "i", 0.3, 0.1, [0.05, 0.15], {**p999, "prior": 0.5})])
    assert with_prior["prior"] == 0.5
    assert "2 run(s) (scores + 0.5 x log(1 + item count), eval.prior): " in format_report(with_prior)
    both = aggregate([_run(tmp_path, n, 0.3, 0.1, [0.05, 0.15], {**p999, "prior": 0.5, "transition": 1.0}) for n in "jk"])
    assert both["transition"] == 1.0
    assert ("2 run(s) (scores + 0.5 x log(1 + item count), eval.prior + 1 x log(1 + last item -> item count), "
            "eval.transition): ") in format_report(both)
    with pytest.raises(ReportError, match="different protocols"):
        aggregate([g, _run(tmp_path, "l", 0.3, 0.1, [0.05, 0.15], {**p999, "prior": 0.5, "transition": 1.0})])
    # metrics.json from before the protocol was recorded: not checked, named by its key
    old = aggregate([_run(tmp_path, "e", 0.2, 0.1, [0.05, 0.15]), _run(tmp_path, "f", 0.2, 0.1, [0.05, 0.15])])
    assert old["num_negatives"] is None and "transfer B sampled999 ndcg@10" in format_report(old)


def test_stage_times_of_the_stages_every_run_records_and_their_sum(tmp_path):
    runs = [_run(tmp_path, "s0", 0.2, 0.1, [0.05, 0.15], walls={"target_only": 1000.0, "joint": 2000.0, "source": 600.0}),
            _run(tmp_path, "s1", 0.2, 0.1, [0.05, 0.15], walls={"target_only": 1200.0, "joint": 1500.0})]
    agg = aggregate(runs)
    assert set(agg["wall_s"]) == {"target_only", "joint", "total"}  # s1 records no source time
    assert agg["wall_s"]["joint"]["values"] == [2000.0, 1500.0]
    assert agg["wall_s"]["total"]["values"] == [3000.0, 2700.0]
    # the stages named as training names them
    assert "stage time, s (mean ± std; per run): target-only 1,100 ± 141 (1,000 / 1,200); source-then-joint 1,750 " \
           "± 354 (2,000 / 1,500); total 2,850 ± 212 (3,000 / 2,700)" in format_report(agg)
    one = aggregate(runs[:1])
    assert "stage time, s: target-only 1,000; source only 600; source-then-joint 2,000; total 3,600" in format_report(one)
    untimed = aggregate([_run(tmp_path, "u", 0.2, 0.1, [0.05, 0.15]), runs[0]])
    assert "wall_s" not in untimed and "stage time" not in format_report(untimed)


def test_runs_on_less_target_data_are_reported_by_share_and_never_pooled_with_others(tmp_path):
    """data.target_fraction (config.yaml) splits runs: one report refuses a mix, --by-fraction
    pools each share and prints (and draws) target-only vs joint per share."""
    def at(name, frac, joint, only):
        d = _run(tmp_path, name, joint, only, [joint - only - 0.01, joint - only + 0.01])
        (d / "config.yaml").write_text(f"data: {{target_fraction: {frac}}}\n")
        return d
    half = [at("h0", 0.5, 0.12, 0.08), at("h1", 0.5, 0.14, 0.08)]
    full = [at("f0", 1.0, 0.2, 0.18), at("f1", 1.0, 0.22, 0.18)]
    with pytest.raises(ReportError, match="different shares of the target data"):
        aggregate([*half, full[0]])
    saved = []
    for k, group in enumerate((half, full)):
        saved.append(tmp_path / f"r{k}.json")
        p = subprocess.run([sys.executable, "-m", "train.cli", "report", *map(str, group), "--out", str(saved[-1])],
                           cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    assert json.loads(saved[0].read_text())["target_fraction"] == 0.5
    p = subprocess.run([sys.executable, "-m", "train.cli", "report", *map(str, saved)], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "different shares of the target data" in p.stderr
    p = subprocess.run([sys.executable, "-m", "train.cli", "report", "--by-fraction", *map(str, [*half, *full]),
                        "--plots", str(tmp_path / "plots")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [ln for ln in p.stdout.splitlines() if ln.strip().startswith(("50%", "100%"))]
    assert rows[0].split() == ["50%", "2", "0.0800", "±", "0.0000", "0.1300", "±", "0.0141", "+62.5%", "2/2"]
    assert rows[1].split()[:2] == ["100%", "2"] and "+16.7%" in rows[1]
    assert (tmp_path / "plots" / "fraction.png").stat().st_size > 10_000
