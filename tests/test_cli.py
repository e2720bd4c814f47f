"""The command line as a user types it: settings the data cannot satisfy, bad input, help, doctor.
Each expected failure is one ``xdrec: error:`` line and exit status 2, before any training."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}


def xdrec(*args: str, cwd=REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The single ``xdrec: error:`` line of a refused command (exit 2, no traceback)."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("xdrec: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def _table_experiment(tmp_path: Path, rows: list[tuple[str, str, int, str]], **eval_keys) -> Path:
    """An experiment over a CSV of (user, item, time, domain) rows, written to ``tmp_path``."""
    (tmp_path / "log.csv").write_text("uid,iid,t,dom\n" + "".join(f"{u},{i},{t},{d}\n" for u, i, t, d in rows))
    ev = "".join(f"  {k}: {v}\n" for k, v in eval_keys.items())
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: t\nmodel: tiny\nruns_dir: {tmp_path / 'runs'}\n"
                   f"data:\n  name: t\n  format: table\n  path: {tmp_path / 'log.csv'}\n  domains: [A, B]\n"
                   f"  source: A\n  target: B\n  out_dir: {tmp_path / 'data'}\n"
                   "  table: {user: uid, item: iid, timestamp: t, domain: dom}\n"
                   "train: {micro_batch_size: 8, source: {epochs: 1}, joint: {epochs: 1}, target_only: {epochs: 1}}\n"
                   f"eval:\n{ev}tracking: {{wandb: false}}\n")
    return exp


def test_a_target_domain_with_no_valid_or_test_users_is_refused_before_training(tmp_path):
    """Every user's last two events are in A: B has training rows but nobody to select or report on."""
    rows = [(f"u{u}", f"{d.lower()}{(u + k) % 12}", k, d) for u in range(20)
            for k, d in enumerate(["B", "B", "A", "B", "A", "A"])]
    exp = _table_experiment(tmp_path, rows, num_negatives=5)
    line = one_error_line(xdrec("train", str(exp)))
    assert "domain 'B' has no valid and no test users in" in line
    assert not (tmp_path / "runs" / "t" / "metrics.jsonl").exists()  # nothing trained
    verify = xdrec("data", "verify", str(tmp_path / "data" / "t"))
    assert verify.returncode == 0
    assert "warning: B/valid holds no samples" in verify.stderr and "warning: B/test holds no samples" in verify.stderr
    assert "A/valid" not in verify.stderr


def test_more_negatives_than_a_users_unseen_items_is_refused_before_training(tmp_path):
    """30 items in B, a user evaluated there holds 6 of them: at most 24 negatives; 25 is refused
    naming the domain and the numbers, 24 trains."""
    rows = [(f"u{u}", f"{d.lower()}{(u + k) % 30}", k, d) for u in range(40)
            for k, d in enumerate(["A", "B", "A", "B", "B", "A", "B", "B", "B"])]
    exp = _table_experiment(tmp_path, rows, num_negatives=25)
    line = one_error_line(xdrec("train", str(exp), "train.stages=[target_only]"))
    assert ("eval.num_negatives=25 but domain 'B' of" in line and "has 30 items and a user evaluated there holds 6 of "
            "them: at most 24 negatives can be drawn" in line), line
    ok = xdrec("train", str(exp), "train.stages=[target_only]", "eval.num_negatives=24")
    assert ok.returncode == 0, ok.stderr[-3000:]
