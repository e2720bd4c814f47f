"""The pictures of ``xdrec report``: PNGs a person looks at, drawn from the runs' own files.

- ``loss.png``: each stage's training loss over its optimizer steps (``metrics.jsonl``), one line per run;
- ``valid.png``: each stage's selection metric on valid per epoch (``metrics.jsonl``);
- ``transfer.png``: target-only vs source-then-joint test NDCG@10 on the target (mean over runs,
  std as error bars) and each run's joint - target-only difference with its 95% bootstrap interval;
- ``cold_start.png``: target test NDCG@10 (full ranking) per history bucket, target-only vs source-then-joint;
- ``fraction.png`` (``xdrec report --by-fraction``): target test NDCG@10 of target-only and
  source-then-joint against the share of target training users kept (``data.target_fraction``).
"""
from __future__ import annotations

import json
from pathlib import Path

from train.config import STAGES, baseline_of, unit_stage
from train.protocol import PROTOCOLS
from train.record import RunRecord
from train.record import transfer_entries
from train.stages import STAGE_LABELS, unit_label


def _series(run_dir: Path, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{stage: (x, y)} of ``<stage>/<key>`` in a run's metrics.jsonl, x the stage's optimizer step
    (``stage_step``) for step records, the epoch for epoch records."""
    out: dict = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for stage in {k.split("/", 1)[0] for k in row if k.endswith(f"/{key}")}:  # units: stages, target_only-<d>
            if f"{stage}/{key}" in row:
                x = row.get(f"{stage}/stage_step" if key == "loss" else f"{stage}/epoch", 0)
                xs, ys = out.setdefault(stage, ([], []))
                xs.append(x)
                ys.append(row[f"{stage}/{key}"])
    return out


def _curves(runs: list[Path], key: str, ylabel: str, xlabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    per_run = [(_series(r, key), r.name) for r in runs]
    stages = sorted({s for series, _ in per_run for s in series}, key=lambda u: (STAGES.index(unit_stage(u)), u))
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(4.5 * max(len(stages), 1), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for series, name in per_run:
            if stage in series:
                ax.plot(*series[stage], label=name, marker="o" if key != "loss" else None, markersize=3)
        ax.set(title=unit_label(stage) + (f" ({stage.split('-', 1)[1]})" if "-" in stage else ""), xlabel=xlabel,
               ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _transfer(agg: dict, t: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    test, dom = agg["test"], t["domain"]
    base = baseline_of(test, dom)
    if "joint" not in test or base is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, p in enumerate(PROTOCOLS):
        for j, stage in enumerate((base, "joint")):
            s = test[stage][dom][p]["ndcg@10"]
            left.bar(i * 3 + j, s["mean"], yerr=s["std"] if s["n"] > 1 else None, capsize=4,
                     color=("tab:gray", "tab:blue")[j], label=unit_label(stage) if i == 0 else None)
        ci = t[p]["ci95"]
        diffs = t[p]["diff"]["values"]
        xs = [k + i * (len(ci) + 1) for k in range(len(ci))]
        right.errorbar(xs, diffs, yerr=[[d - lo for d, (lo, _) in zip(diffs, ci)], [hi - d for d, (_, hi) in zip(diffs, ci)]],
                       fmt="o", capsize=4, label=p)
    left.set_xticks([0.5, 3.5], list(PROTOCOLS))
    left.set(title=f"{dom} test NDCG@10", ylabel="NDCG@10")
    left.legend(fontsize=8)
    right.axhline(0, color="black", lw=0.8)
    right.set(title="joint - target-only, per run (95% bootstrap CI)", ylabel="NDCG@10 difference", xticks=[])
    right.legend(fontsize=8)
    return _save(fig, path)


def _cold_start(records: list[RunRecord], target: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import numpy as np

    buckets: dict = {}
    for rec in records:
        for stage in (baseline_of(rec.stages, target) or "target_only", "joint"):
            cs = rec.stages[stage].metrics.get("test", {}).get(target, {}).get("cold_start") if stage in rec.stages else None
            for name, m in (cs or {}).items():
                if m["full"].get("n_users"):  # an empty bucket has no metrics
                    buckets.setdefault(name, {}).setdefault(stage, []).append(m["full"]["ndcg@10"])
    if not buckets:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(buckets)
    for j, stage in enumerate(("target_only", "joint")):
        vals = [float(np.mean([v for k, vs in buckets[n].items() if unit_stage(k) == stage for v in vs] or [np.nan]))
                for n in names]
        ax.bar(np.arange(len(names)) + 0.4 * j, vals, width=0.4, label=STAGE_LABELS[stage])
    ax.set_xticks(np.arange(len(names)) + 0.2, [f"{n} events" for n in names])
    ax.set(title=f"{target} test NDCG@10 (full ranking) by training events", ylabel="NDCG@10")
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw(agg: dict, out: Path) -> list[Path]:
    """Every plot the runs of ``agg`` allow, into ``out``; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in agg["runs"]]
    records = [RunRecord.load(r / "metrics.json") for r in runs]
    entries = transfer_entries(agg.get("transfer"))
    one = len(entries) == 1  # one target: transfer.png; several: transfer-<domain>.png each
    drawn = [_curves(runs, "loss", "training loss", "optimizer step", out / "loss.png"),
             _curves(runs, "valid_select", "valid selection metric", "epoch", out / "valid.png")]
    for t in entries:
        suffix = "" if one else f"-{t['domain']}"
        drawn += [_transfer(agg, t, out / f"transfer{suffix}.png"),
                  _cold_start(records, t["domain"], out / f"cold_start{suffix}.png")]
    return [p for p in drawn if p is not None]


def draw_fractions(curve: dict[float, dict], out: Path) -> list[Path]:
    """``fraction.png``: per protocol, target-only vs source-then-joint target test NDCG@10 (mean
    over runs, std as error bars) at each share of target training users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    shares = [f * 100 for f in curve]
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(5 * len(PROTOCOLS), 3.6), squeeze=False)
    for ax, p in zip(axes[0], PROTOCOLS):
        dom = transfer_entries(next(iter(curve.values()))["transfer"])[0]["domain"]
        for stage, color in (("target_only", "tab:gray"), ("joint", "tab:blue")):
            stats = [agg["test"][stage][dom][p]["ndcg@10"] for agg in curve.values()]
            ax.errorbar(shares, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=4,
                        color=color, label=STAGE_LABELS[stage])
        ax.set(title=f"{dom} test NDCG@10, {p}", xlabel="target training users kept, %", ylabel="NDCG@10",
               xticks=shares)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, out / "fraction.png")]
