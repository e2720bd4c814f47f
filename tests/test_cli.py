"""The command line as a user types it: settings the data cannot satisfy, bad input, help, doctor.
Each expected failure is one ``xdrec: error:`` line and exit status 2, before any training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_help_shows_defaults_and_doctor_names_the_stack():
    train = xdrec("train", "--help")
    assert train.returncode == 0 and "(default: never)" in train.stdout and "--debug" in train.stdout
    assert "(default: 10)" in xdrec("recommend", "--help").stdout
    doctor = xdrec("doctor")
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    import deepspeed

    assert f"deepspeed: {deepspeed.__version__}" in doctor.stdout
    assert "deepspeed_op_cache:" in doctor.stdout and "wandb:" in doctor.stdout and "sbatch:" in doctor.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A target-only run of the tiny experiment, exported."""
    tmp = tmp_path_factory.mktemp("exp")
    p = xdrec("train", "configs/experiment/tiny.yaml", f"runs_dir={tmp}", f"data.out_dir={tmp / 'data'}",
              "train.stages=[target_only]", "train.target_only.epochs=1")
    assert p.returncode == 0, p.stderr[-3000:]
    e = xdrec("export", str(tmp / "tiny"), "--stage", "target_only")
    assert e.returncode == 0, e.stderr[-3000:]
    return tmp / "tiny" / "export-target_only"


def test_recommend_takes_and_gives_the_datas_own_ids_and_leaves_the_history_out(exported):
    item_map = json.loads((exported / "item_map.json").read_text())
    domains = json.loads((exported / "domains.json").read_text())["domains"]
    lo, n = domains[1]["offset"], domains[1]["n_items"]
    b_items = [raw for raw, i in item_map.items() if lo < i <= lo + n]
    history = b_items[:5]
    p = xdrec("recommend", str(exported), "--domain", "B", "--history", *history, "-k", str(n), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    top = json.loads(p.stdout)
    assert len(top) == n - 5 and not {t["item"] for t in top} & set(history)
    assert {t["item"] for t in top} <= set(b_items)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    every = json.loads(xdrec("recommend", str(exported), "--domain", "B", "--history", *history, "-k", str(n),
                             "--json", "--include-history").stdout)
    assert {t["item"] for t in every} == set(b_items)
    internal = xdrec("recommend", str(exported), "--domain", "B", "--internal", "--history",
                     *(str(item_map[h]) for h in history), "-k", "3")
    assert internal.returncode == 0
    rows = internal.stdout.splitlines()[1:]
    assert [int(r.split()[1]) for r in rows] == [item_map[t["item"]] for t in top[:3]]
    table = xdrec("recommend", str(exported), "--domain", "B", "--history", *history, "-k", "3")
    assert table.stdout.splitlines()[1].split()[:2] == ["1", top[0]["item"]]


def test_bad_recommend_export_and_evaluate_input_is_one_line(exported, tmp_path):
    line = one_error_line(xdrec("recommend", str(exported), "--domain", "B", "--history", "no-such-item"))
    assert "--history: item 'no-such-item' is not in" in line
    line = one_error_line(xdrec("recommend", str(exported), "--domain", "B", "--internal", "--history", "5000"))
    assert "--history: no xdrec item id 5000 (this model has ids 1..160)" in line
    line = one_error_line(xdrec("recommend", str(exported), "--domain", "Z", "--history", "1"))
    assert "--domain 'Z': this export (stage target_only) scores ['B'] of ['A', 'B']" in line
    line = one_error_line(xdrec("evaluate", str(tmp_path)))
    assert f"{tmp_path / 'model.safetensors'} is missing: not an xdrec export folder" in line
    data = exported.parents[1] / "data"
    data.rename(data.with_name("moved"))
    try:
        line = one_error_line(xdrec("export", str(exported.parent), "--stage", "target_only"))
    finally:
        data.with_name("moved").rename(data)
    assert "manifest.json: no manifest; run `xdrec prepare` first" in line
    debug = xdrec("recommend", str(exported), "--domain", "Z", "--history", "1", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_evaluate_prints_the_training_table(exported):
    p = xdrec("evaluate", str(exported))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "test metrics of" in p.stdout and "target-only" in p.stdout and "full hr@10" in p.stdout
    metrics = json.loads(xdrec("evaluate", str(exported), "--json").stdout)
    row = [line for line in p.stdout.splitlines() if line.startswith("target-only")][0]
    assert f"{metrics['test']['B']['full']['ndcg@10']:.4f}" in row


def test_wandb_groups_seeds_carries_the_run_context_and_a_wandb_failure_only_warns(tmp_path, monkeypatch, capsys):
    """A real offline W&B run: group = the run name without -seed<k>, job_type train, the context in
    its config. A W&B that cannot write (its folder is a file) warns once and metrics.jsonl goes on."""
    from train.config import load_config
    from train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(REPO / "configs/experiment/tiny.yaml", ["tracking.wandb=true", "name=tiny-seed3"])
    t = Tracker(cfg, tmp_path / "ok", is_main=True, context={"git_commit": "abc123", "world_size": 2})
    assert (t.run.group, t.run.job_type) == ("tiny", "train")
    assert dict(t.run.config)["run"] == {"git_commit": "abc123", "world_size": 2}
    t.finish()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "wandb").write_text("")
    t = Tracker(cfg, tmp_path / "broken", is_main=True)
    assert t.run is None
    t.log({"source": {"loss": 1.5, "stage_step": 1}})
    t.finish()
    err = capsys.readouterr().err
    assert err.count("warning: W&B failed") == 1 and "training goes on" in err
    assert json.loads((tmp_path / "broken" / "metrics.jsonl").read_text())["source/loss"] == 1.5


@pytest.fixture
def release_mirror(tmp_path):
    """A local HTTP mirror of the ABXI release's data/ folder, holding the real Beauty-Electronics files."""
    import functools
    import http.server
    import shutil
    import threading

    from conftest import SHARED_DATA

    mirror = tmp_path / "mirror" / "abe"
    mirror.mkdir(parents=True)
    for f in (SHARED_DATA / "amazon-beauty-electronics").iterdir():
        shutil.copy(f, mirror / f.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", mirror
    srv.shutdown()


def test_data_fetch_downloads_a_release_checked_by_sha256_and_refuses_a_changed_file(release_mirror, tmp_path):
    from conftest import SHARED_DATA

    url, mirror = release_mirror
    out = tmp_path / "got"
    p = xdrec("data", "fetch", "amazon-beauty-electronics", "--to", str(out), "--base-url", url)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in (SHARED_DATA / "amazon-beauty-electronics").iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert f"train with data.path={out}" in p.stdout
    again = xdrec("data", "fetch", "amazon-beauty-electronics", "--to", str(out), "--base-url", url)
    assert again.stdout.count("present, sha256 matches") == 3  # nothing downloaded twice
    changed = bytearray((mirror / "map_user_50.txt").read_bytes())
    changed[10] ^= 1  # same size, other content
    (mirror / "map_user_50.txt").write_bytes(bytes(changed))
    line = one_error_line(xdrec("data", "fetch", "amazon-beauty-electronics", "--to", str(tmp_path / "bad"),
                                "--base-url", url))
    assert f"{url}/abe/map_user_50.txt: sha256 " in line and "nothing kept" in line
    assert not (tmp_path / "bad" / "map_user_50.txt").exists() and not list((tmp_path / "bad").glob("*.part"))
    (mirror / "map_user_50.txt").write_bytes(bytes(changed) + b"x" * 4096)  # longer than the release's file
    line = one_error_line(xdrec("data", "fetch", "amazon-beauty-electronics", "--to", str(tmp_path / "long"),
                                "--base-url", url))
    assert "map_user_50.txt: longer than the release's 105,126 bytes; nothing kept" in line
    assert not list((tmp_path / "long").glob("*.part")) and not (tmp_path / "long" / "map_user_50.txt").exists()
    line = one_error_line(xdrec("data", "fetch", "movielens"))
    assert "unknown data set 'movielens'; known: amazon-food-kitchen, amazon-beauty-electronics" in line


def test_a_terminal_gets_progress_bars_and_a_pipe_plain_lines(tmp_path):
    """Under a pseudo-terminal (120 columns) rank 0 shows a bar per epoch and per evaluation; the
    same run into a pipe has none (its epoch lines are there either way)."""
    import fcntl
    import pty
    import struct
    import termios

    cmd = [sys.executable, "-m", "train.cli", "train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}",
           f"data.out_dir={tmp_path / 'data'}", "train.stages=[source]", "train.source.epochs=1"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=600) == 0
    os.close(leader)
    seen = b"".join(chunks).decode(errors="replace")
    assert "[source] epoch 1/1:" in seen and "step/s" in seen and "evaluating A valid:" in seen
    plain = xdrec("train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}",
                  "train.stages=[source]", "train.source.epochs=1", "--overwrite")
    assert plain.returncode == 0 and "[source] epoch 1/1  loss" in plain.stdout
    assert "step/s" not in plain.stdout + plain.stderr and "evaluating A valid:" not in plain.stderr


def test_not_at_a_terminal_training_prints_a_plain_progress_line_every_log_every_steps(tmp_path):
    """Slurm logs and pipes: a line per train.log_every steps (stage, epoch, step of steps, loss,
    samples/s, ETA) besides the epoch line; XDREC_PROGRESS=0 turns them off."""
    args = ("train", "configs/experiment/tiny.yaml", f"runs_dir={tmp_path}", f"data.out_dir={tmp_path / 'data'}",
            "train.stages=[source]", "train.source.epochs=1", "train.log_every=2")
    p = xdrec(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[source] epoch 1/1 step")]
    assert [ln.split("  ")[0] for ln in lines] == ["[source] epoch 1/1 step 2/5", "[source] epoch 1/1 step 4/5"]
    assert all("samples/s  ETA " in ln and "  loss " in ln for ln in lines)
    quiet = subprocess.run([sys.executable, "-m", "train.cli", *args, "--overwrite"], cwd=REPO,
                           env={**ENV, "XDREC_PROGRESS": "0"}, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and "step 2/5" not in quiet.stdout and "[source] epoch 1/1  loss" in quiet.stdout
