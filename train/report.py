"""``xdrec report runs/<name>-seed0 runs/<name>-seed1 ...``: mean and std over runs (seeds) of the
test metrics each run's ``metrics.json`` holds, and each run's paired-bootstrap transfer interval.

    {"runs": [...], "provenance": [{run_id, git_commit, config_sha256, data_fingerprint} per run],
     "num_negatives": N or None, "prior": eval.prior, "transition": eval.transition, "test": {stage: {domain: {protocol: {metric: {...}}}}},
     "transfer": {protocol: {"diff": {...mean/std...}, "ci95": [[lo, hi] per run], "runs_ci_above_0": k}},
     "wall_s": {stage: {...mean/std...}, "total": {...}},
     "last_input": {stage: {domain: {latest input's domain: {protocol: {"ndcg@10": {...}, "n_users": {...}}}}}}}

``last_input`` groups each domain's test users by the domain of their latest input event (where
the runs' metrics.json record it): where a cross-domain model gains or loses against the
target-only one, which reads only the target's events.

``wall_s`` holds each stage's training time (``_meta.<stage>.wall_s``: summed over resumes; for a
run started from another run's source stage, that run's source time) for the stages every run
records, and ``total``, their sum per run. A run given twice (the same folder, or a copy of it: the
same ``run_id``) is refused: it would count twice.

Runs whose metrics.json record different protocols (``_meta.eval``: the number of negatives,
their seed, ``eval.prior`` and ``eval.transition``; a field recorded after a run was made counts as its default) are
refused: their numbers are not comparable. A metrics.json written before the protocol was
recorded is not checked; ``num_negatives`` is None when no run
records it, and the transfer line then names the sampled protocol by its key ``sampled999``.

A report saved with ``--out`` is read back by ``xdrec report <file>.json`` (the same tables without
the run folders, which are not kept); several saved reports of one protocol pool their runs'
values, so seeds trained apart (one a session) still give one mean ± std.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.config import STAGES, baseline_of, unit_stage
from train.protocol import PROTOCOLS, SAMPLED, protocol_label
from train.record import RunRecord, transfer_entries
from train.stages import unit_label

METRICS = ("hr@10", "ndcg@10", "mrr")
LAST_INPUT = ("ndcg@10", "n_users")  # what the report keeps of each latest-input group


class ReportError(ValueError):
    """A run folder has no metrics.json, or the runs do not describe the same experiment."""


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": [float(x) for x in v]}


def _protocol(runs: list[tuple[str, RunRecord]]) -> dict:
    """The evaluation protocol the runs share (``{}`` when none records one); ReportError naming
    the runs when they differ."""
    seen: dict[tuple, list[str]] = {}
    for d, rec in runs:
        ev = rec.recorded_protocol()
        if ev is not None:
            seen.setdefault(tuple(sorted(ev.items())), []).append(d)
    if len(seen) > 1:
        groups = "; ".join(", ".join(f"{k}={v}" for k, v in ev) + f" in {ds}" for ev, ds in seen.items())
        raise ReportError(f"the runs were evaluated under different protocols ({groups}); report runs of one protocol")
    return dict(next(iter(seen))) if seen else {}


def _load(run_dirs: list[str | Path]) -> list[tuple[str, RunRecord]]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise ReportError(f"{path}: no metrics.json (has the run finished?)")
        runs.append((str(d), RunRecord.load(path)))
    if not runs:
        raise ReportError("no run folders given")
    refuse_repeats([(str(Path(d).resolve()), rec.provenance.get("run_id")) for d, rec in runs], [d for d, _ in runs])
    return runs


def refuse_repeats(keys: list[tuple[str, str | None]], names: list[str]) -> None:
    """ReportError when one run would count twice: the same folder (``key[0]``) or the same run
    (``key[1]``, the run_id metrics.json records; a copy of a run folder keeps it) given again."""
    seen: dict = {}
    for (where, run_id), name in zip(keys, names):
        for key in (("folder", where), ("run", run_id)):
            if key[1] is not None and key in seen:
                raise ReportError(f"{name} and {seen[key]} are the same {key[0]}"
                                  f"{f' (run_id {run_id})' if key[0] == 'run' else ''}: a run counts once in a mean "
                                  "± std; give each run once")
            seen.setdefault(key, name)


def _test_metrics(runs: list[tuple[str, RunRecord]]) -> dict:
    """{stage: {domain: {protocol: {metric: stats}}}} over the runs; every run must hold each."""
    out: dict = {}
    for stage in _units(rec for _, rec in runs):
        tests = {d: rec.stages[stage].metrics.get("test", {}) if stage in rec.stages else {} for d, rec in runs}
        for dom in sorted({dom for t in tests.values() for dom in t}):
            missing = [d for d, t in tests.items() if dom not in t]
            if missing:
                raise ReportError(f"stage {stage} domain {dom}: missing in {missing}; report runs of one experiment")
            out.setdefault(stage, {})[dom] = {
                p: {k: _stats([t[dom][p][k] for t in tests.values()]) for k in METRICS} for p in PROTOCOLS}
    return out


def _last_input(runs: list[tuple[str, RunRecord]]) -> dict:
    """{stage: {domain: {latest input's domain: {protocol: {"ndcg@10", "n_users": stats}}}}}: test
    metrics by the domain of each user's latest input event, where every run records them."""
    out: dict = {}
    for stage in _units(rec for _, rec in runs):
        tests = [rec.stages[stage].metrics.get("test", {}) if stage in rec.stages else {} for _, rec in runs]
        for dom in tests[0]:
            parts = [t.get(dom, {}).get("last_input") for t in tests]
            if all(parts):
                out.setdefault(stage, {})[dom] = {k: {p: {m: _stats([x[k][p][m] for x in parts]) for m in LAST_INPUT}
                                                      for p in PROTOCOLS} for k in parts[0] if all(k in x for x in parts)}
    return out


def _target_fraction(run_dirs: list[str | Path]) -> float:
    """The ``data.target_fraction`` every run was trained with (its config.yaml; 1 where absent);
    ReportError when they differ: runs on less target data are another experiment."""
    import yaml

    seen: dict[float, list[str]] = {}
    for d in run_dirs:
        conf = Path(d) / "config.yaml"
        data = (yaml.safe_load(conf.read_text()) or {}).get("data", {}) if conf.is_file() else {}
        seen.setdefault(float(data.get("target_fraction", 1.0)), []).append(str(d))
    if len(seen) > 1:
        raise ReportError("the runs were trained on different shares of the target data ("
                          + "; ".join(f"data.target_fraction={f:g} in {ds}" for f, ds in seen.items())
                          + "): report each share apart, or all of them with --by-fraction")
    return next(iter(seen), 1.0)


def _units(records) -> list[str]:
    """Every unit the records hold (stages, and target_only-<domain> baselines), in run order."""
    return sorted({u for rec in records for u in rec.stages}, key=lambda u: (STAGES.index(unit_stage(u)), u))


def _pooled_transfer(per_run: list[list[dict]]) -> dict:
    """Each run's transfer entries (one per target domain, :func:`transfer_entries`) pooled per
    domain: one target gives its entry's layout, several ``{domain: entry}``."""
    out = {}
    for entry in per_run[0]:
        dom = entry["domain"]
        mine = [next(e for e in run if e["domain"] == dom) for run in per_run]
        pooled = {"domain": dom, "metric": entry["metric"]}
        for p in PROTOCOLS:
            diffs = [v for e in mine for v in (e[p]["diff"]["values"] if isinstance(e[p]["diff"], dict) else [e[p]["diff"]])]
            cis = [ci for e in mine for ci in (e[p]["ci95"] if isinstance(e[p]["ci95"][0], list) else [e[p]["ci95"]])]
            pooled[p] = {"diff": _stats(diffs), "ci95": cis, "runs_ci_above_0": sum(lo > 0 for lo, _ in cis)}
        out[dom] = pooled
    return next(iter(out.values())) if len(out) == 1 else out


def aggregate(run_dirs: list[str | Path]) -> dict:
    runs = _load(run_dirs)
    protocol = _protocol(runs)
    out: dict = {"runs": [d for d, _ in runs], "target_fraction": _target_fraction(run_dirs),
                 "num_negatives": protocol.get("num_negatives"),
                 "prior": protocol.get("prior", 0.0), "transition": protocol.get("transition", 0.0),
                 "test": _test_metrics(runs), "provenance": [rec.provenance for _, rec in runs]}
    last = _last_input(runs)
    if last:
        out["last_input"] = last
    tr = [transfer_entries(rec.transfer) for _, rec in runs]
    if all(tr):
        out["transfer"] = _pooled_transfer(tr)
    timed = [s for s in _units(rec for _, rec in runs)
             if all(s in rec.stages and "wall_s" in rec.stages[s].meta for _, rec in runs)]
    if timed:
        out["wall_s"] = {s: _stats([rec.stages[s].meta["wall_s"] for _, rec in runs]) for s in timed}
        out["wall_s"]["total"] = _stats([sum(rec.stages[s].meta["wall_s"] for s in timed) for _, rec in runs])
    return out


def load_saved(path: str | Path) -> dict:
    """A report saved by ``--out``, read back so its tables can be printed again (and a document
    quoting them checked) without the run folders; ReportError naming the file when it is not one."""
    import json

    path = Path(path)
    try:
        agg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not a readable report JSON ({e})") from None
    missing = [k for k in ("runs", "test", "num_negatives") if not isinstance(agg, dict) or k not in agg]
    if missing:
        raise ReportError(f"{path}: not an `xdrec report --out` file (no {', '.join(missing)})")
    return agg


def _merge_stats(parts: list[dict]) -> dict:
    return _stats([v for p in parts for v in p["values"]])


def merge_saved(reports: list[tuple[str, dict]]) -> dict:
    """Saved reports (of runs made apart, e.g. one seed a session) as one: every run's values
    pooled; ReportError naming the files when their protocols or stages and domains differ."""
    keys = ("num_negatives", "prior", "transition")
    protocols = {tuple(r.get(k) for k in keys) for _, r in reports}
    if len(protocols) > 1:
        raise ReportError("the reports were evaluated under different protocols: " + "; ".join(
            f"{p}: " + ", ".join(f"{k}={r.get(k)}" for k in keys) for p, r in reports))
    fractions = {r.get("target_fraction", 1.0) for _, r in reports}
    if len(fractions) > 1:
        raise ReportError("the reports were trained on different shares of the target data: " + "; ".join(
            f"{p}: data.target_fraction={r.get('target_fraction', 1.0):g}" for p, r in reports)
            + "; pool reports of one share, or draw them with --by-fraction")
    first = reports[0][1]
    runs = [(run, (r.get("provenance") or [{}] * len(r["runs"]))[k]) for _, r in reports for k, run in enumerate(r["runs"])]
    # saved reports name runs by the path they had; a run_id, where recorded, tells copies apart
    refuse_repeats([(run if not prov.get("run_id") else None, prov.get("run_id")) for run, prov in runs],
                   [f"run {run}" for run, _ in runs])
    layout = lambda r: {s: sorted(d) for s, d in r["test"].items()}
    if any(layout(r) != layout(first) for _, r in reports):
        raise ReportError(f"{', '.join(p for p, _ in reports)}: different stages or domains; merge reports of one experiment")
    out = {"runs": [run for run, _ in runs], "provenance": [prov for _, prov in runs],
           "target_fraction": first.get("target_fraction", 1.0), **{k: first.get(k) for k in keys},
           "test": {
        s: {d: {p: {k: _merge_stats([r["test"][s][d][p][k] for _, r in reports]) for k in m} for p, m in res.items()}
            for d, res in doms.items()} for s, doms in first["test"].items()}}
    if all("transfer" in r for _, r in reports):
        out["transfer"] = _pooled_transfer([transfer_entries(r["transfer"]) for _, r in reports])
    last = _merge_last_input([r.get("last_input", {}) for _, r in reports])
    if last:
        out["last_input"] = last
    timed = [s for s in first.get("wall_s", {}) if all(s in r.get("wall_s", {}) for _, r in reports)]
    if timed:
        out["wall_s"] = {s: _merge_stats([r["wall_s"][s] for _, r in reports]) for s in timed}
    return out


def _merge_last_input(parts: list[dict]) -> dict:
    """Saved reports' ``last_input`` groups pooled, those every report holds."""
    out: dict = {}
    for s, doms in parts[0].items():
        for d, lasts in doms.items():
            for k, res in lasts.items():
                if all(k in x.get(s, {}).get(d, {}) for x in parts):
                    out.setdefault(s, {}).setdefault(d, {})[k] = {
                        p: {m: _merge_stats([x[s][d][k][p][m] for x in parts]) for m in ms} for p, ms in res.items()}
    return out


def gather(sources: list[str]) -> tuple[dict, bool]:
    """The aggregate of run folders, or of saved reports (``<file>.json``, pooled when several);
    True when saved reports."""
    saved = [s for s in sources if str(s).endswith(".json")]
    if not saved:
        return aggregate(sources), False
    if len(saved) < len(sources):
        raise ReportError("give run folders or saved reports (.json), not both")
    reports = [(s, load_saved(s)) for s in saved]
    return (reports[0][1] if len(reports) == 1 else merge_saved(reports)), True


def by_fraction(sources: list[str]) -> dict[float, dict]:
    """Reports (saved, or run folders) grouped by ``data.target_fraction``, each group pooled
    (:func:`gather`): ``{fraction: aggregate}``, fractions ascending."""
    groups: dict[float, list[str]] = {}
    for s in sources:
        groups.setdefault(gather([s])[0].get("target_fraction", 1.0), []).append(s)
    return {f: gather(g)[0] for f, g in sorted(groups.items())}


def format_fractions(curve: dict[float, dict], protocol: str = "full") -> str:
    """One line per share of target data: target-only vs source-then-joint target NDCG@10 (mean ±
    std over the runs) and the transfer (relative, and the runs whose interval lies above 0)."""
    lines = [f"target NDCG@10 ({protocol_label(protocol, 999) if protocol != 'full' else 'full ranking'}) by share "
             "of target training users (data.target_fraction)",
             f"{'share':>6}  {'runs':>4}  {'target-only':>17}  {'source-then-joint':>17}  {'transfer':>9}  CI above 0"]
    for f, agg in curve.items():
        entries = transfer_entries(agg.get("transfer"))
        if len(entries) != 1:
            raise ReportError(f"data.target_fraction={f:g}: the runs have no transfer of one target domain "
                              "(train target_only and joint)")
        t = entries[0]
        dom = t["domain"]
        base = baseline_of(agg["test"], dom) or "target_only"
        a, b = agg["test"]["joint"][dom][protocol]["ndcg@10"], agg["test"][base][dom][protocol]["ndcg@10"]
        rel = (a["mean"] - b["mean"]) / max(b["mean"], 1e-12) * 100
        lines.append(f"{f * 100:>5g}%  {a['n']:>4}  {mean_pm(b, 17)}  {mean_pm(a, 17)}  {rel:>+8.1f}%  "
                     f"{t[protocol]['runs_ci_above_0']}/{t[protocol]['diff']['n']}")
    return "\n".join(lines)


def mean_pm(s: dict, width: int = 0) -> str:
    """``mean ± std`` over several runs; the value alone for one."""
    text = f"{s['mean']:.4f} ± {s['std']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f}"
    return f"{text:>{width}}"


def _terms(agg: dict) -> str:
    terms = [f"{agg['prior']:g} x log(1 + item count), eval.prior"] if agg.get("prior") else []
    if agg.get("transition"):
        terms.append(f"{agg['transition']:g} x log(1 + last item -> item count), eval.transition")
    return f" (scores + {' + '.join(terms)})" if terms else ""


def _transfer_lines(agg: dict) -> list[str]:
    return [line for t in transfer_entries(agg["transfer"]) for line in _transfer_entry_lines(agg, t)]


def _transfer_entry_lines(agg: dict, t: dict) -> list[str]:
    lines = []
    for p in PROTOCOLS:
        d = t[p]["diff"]
        cis = ", ".join(f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in t[p]["ci95"])
        label = protocol_label(p, agg["num_negatives"]) if agg.get("num_negatives") else p
        diff = f"{d['mean']:+.4f} ± {d['std']:.4f}" if d["n"] > 1 else f"{d['mean']:+.4f}"
        lines.append(f"transfer {t['domain']} {label} {t['metric']}: joint - target-only {diff}; "
                     f"95% CI per run {cis}; above 0 in {t[p]['runs_ci_above_0']}/{d['n']}")
    return lines


def _last_input_lines(agg: dict) -> list[str]:
    """One line per (domain, domain of the latest input event): each stage's test NDCG@10 there."""
    rows: dict = {}
    for stage, doms in agg.get("last_input", {}).items():
        for dom, lasts in doms.items():
            for last, res in lasts.items():
                rows.setdefault((dom, last), []).append((stage, res))
    return [f"{dom} test ndcg@10 full (sampled), latest input event in {last} ({res[0][1]['full']['n_users']['mean']:,.0f} "
            "users): " + "; ".join(f"{unit_label(s)} {mean_pm(r['full']['ndcg@10'])} ({mean_pm(r[SAMPLED]['ndcg@10'])})"
                                   for s, r in res) for (dom, last), res in rows.items()]


def _time_label(unit: str) -> str:
    """A time line's name of a unit: its stage's label, the domain for one of several baselines."""
    if unit == "total" or unit_stage(unit) not in STAGES:
        return unit
    return unit_label(unit) + (f" ({unit.split('-', 1)[1]})" if "-" in unit else "")


def _time_line(agg: dict) -> str:
    if len(agg["runs"]) == 1:
        return "stage time, s: " + "; ".join(f"{_time_label(s)} {w['mean']:,.0f}" for s, w in agg["wall_s"].items())
    return "stage time, s (mean ± std; per run): " + "; ".join(
        f"{_time_label(s)} {w['mean']:,.0f} ± {w['std']:,.0f} ({' / '.join(f'{v:,.0f}' for v in w['values'])})"
        for s, w in agg["wall_s"].items())


def format_report(agg: dict) -> str:
    cols = [(p, k) for p in PROTOCOLS for k in METRICS]
    width = 20 if len(agg["runs"]) > 1 else 12
    head = f"{'stage':<20}{'domain':<13}" + "".join(f"{p[:4] + ' ' + k:>{width}}" for p, k in cols)
    lines = [f"{len(agg['runs'])} run(s){_terms(agg)}: " + ", ".join(agg["runs"]), head, "-" * len(head)]
    for stage, doms in agg["test"].items():
        for dom, res in doms.items():
            lines.append(f"{unit_label(stage):<20}{dom:<13}" + "".join(mean_pm(res[p][k], width) for p, k in cols))
    if "transfer" in agg:
        lines += _transfer_lines(agg)
    lines += _last_input_lines(agg)
    if "wall_s" in agg:
        lines.append(_time_line(agg))
    return "\n".join(lines)


def format_markdown(agg: dict, plots: list[Path] = ()) -> str:
    """The report as Markdown: the test table (mean ± std over the runs), transfer, time, plots."""
    cols = [(p, k) for p in PROTOCOLS for k in METRICS]
    n = agg.get("num_negatives")
    lines = [f"**xdrec report: {len(agg['runs'])} run(s){_terms(agg)}**", "",
             "Runs: " + ", ".join(f"`{r}`" for r in agg["runs"]) + "; test split; sampled = "
             + (f"{n} negatives" if n else "the sampled protocol") + ".", "",
             "| stage | domain | " + " | ".join(f"{'sampled' if p != 'full' else 'full'} {k}" for p, k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for stage, doms in agg["test"].items():
        for dom, res in doms.items():
            lines.append(f"| {unit_label(stage)} | {dom} | " + " | ".join(mean_pm(res[p][k]) for p, k in cols) + " |")
    if "transfer" in agg:
        lines += [""] + [f"- {line}" for line in _transfer_lines(agg)]
    if "last_input" in agg:
        lines += [""] + [f"- {line}" for line in _last_input_lines(agg)]
    if "wall_s" in agg:
        lines += ["", f"- {_time_line(agg)}"]
    if plots:
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
