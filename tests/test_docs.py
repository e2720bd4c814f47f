"""The documents' numbers are the committed reports': every block of ``docs/*.md`` between
``<!-- xdrec report <file> [<file> ...] --markdown -->`` and ``<!-- /xdrec report -->`` is what that
command prints (several files: their runs pooled), and the README's results rows and transfer figures
are values of the pooled reports under ``docs/results/<pair>/``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from train.report import mean_pm, format_markdown, gather

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- xdrec report (\S+(?: \S+)*?) --markdown -->\n(.*?)<!-- /xdrec report -->", re.S)


def report_blocks() -> list[tuple[str, str, str]]:
    """(document, report files, the block's text) for every report block of README.md and docs/."""
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for path, text in BLOCK.findall(doc.read_text()):
            out.append((doc.name, path, text))
    return out


def test_the_experiment_log_quotes_committed_reports():
    blocks = report_blocks()
    files = [f for _, p, _ in blocks for f in p.split()]
    assert set(files) >= {"docs/results/demo-seed0.json"}
    assert all((REPO / f).is_file() for f in files), files


@pytest.mark.parametrize("doc,path,text", report_blocks(), ids=lambda v: v if isinstance(v, str) and v.endswith(
    ".json") else "")
def test_each_report_block_is_what_xdrec_report_prints(doc, path, text):
    agg = gather([str(REPO / f) for f in path.split()])[0]
    assert text == format_markdown(agg), f"{doc}: the block of {path} differs from its report"


def pooled(pattern: str) -> dict:
    """The committed reports matching ``docs/results/<pattern>``, their runs pooled."""
    files = sorted(str(p) for p in (REPO / "docs/results").glob(pattern))
    assert files, pattern
    return gather(files)[0]


def test_the_readme_results_rows_are_the_committed_reports():
    """Each model row of the README's checked results table is the pooled reports' full-ranking
    HR@10 and NDCG@10 of the target (scored alone), then its sampled HR@10 and NDCG@10 scored alone
    and with the shipped evaluation terms."""
    readme = (REPO / "README.md").read_text()
    for pair, target in (("amazon-beauty-electronics", "electronics"), ("amazon-food-kitchen", "kitchen")):
        alone, terms = pooled(f"{pair}/scores-alone-*.json"), pooled(f"{pair}/shipped-*.json")
        assert (alone["prior"], alone["transition"], terms["prior"], terms["transition"]) == (0, 0, 0.5, 1.0)
        assert len(alone["runs"]) == len(terms["runs"]) and terms["num_negatives"] == 999
        for stage, label in (("target_only", "target-only"), ("joint", "source-then-joint")):
            cells = [mean_pm(alone["test"][stage][target]["full"][k]) for k in ("hr@10", "ndcg@10")] + [
                mean_pm(r["test"][stage][target]["sampled999"][k]) for r in (alone, terms) for k in ("hr@10", "ndcg@10")]
            row = f"| {label} | " + " | ".join(cells) + " |"
            assert row in readme, f"README.md: no row {row!r} ({pair})"
        prose = " ".join(readme.split())  # a quote may wrap across lines
        for r, proto in ((alone, "sampled999"), (terms, "sampled999"), (alone, "full")):
            quoted = transfer_quote(r["transfer"][proto])
            assert quoted in prose, f"README.md: no transfer {quoted!r} ({pair}, {proto})"


def transfer_quote(t: dict) -> str:
    """How the README quotes a transfer: one seed, the difference and its interval; several, the
    mean ± std of the differences and on how many seeds the interval lies above 0."""
    d = t["diff"]
    if d["n"] == 1:
        (lo, hi), = t["ci95"]
        return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    return f"{d['mean']:+.4f} ± {d['std']:.4f} (above 0 on {t['runs_ci_above_0']}/{d['n']} seeds)"
