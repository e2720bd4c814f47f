"""The trust boundary: files xdrec is handed (checkpoints, run folders, exports, manifests, reports)
are data, names stay in their folders, secrets never reach disk, results carry their provenance.
Each case with real files and real processes: a forged pickle that would create a file, a
symlinked lock, an escaping name, a credentialed URL searched for on disk afterwards."""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from test_cli import ENV, REPO, one_error_line, xdrec

TINY = "configs/experiment/tiny.yaml"


def tiny(tmp: Path, *extra: str, name: str = "tiny") -> list[str]:
    """A tiny experiment's arguments, everything under ``tmp`` (data prepared once per ``tmp``)."""
    return [TINY, f"runs_dir={tmp / 'runs'}", f"data.out_dir={tmp / 'data'}", f"name={name}", *extra]


class Evil:
    """Unpickled, it creates the file it names (what a forged checkpoint would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-stage run (ZeRO-0: whole-model files; best and an epoch-end resume checkpoint)."""
    tmp = tmp_path_factory.mktemp("finished")
    p = xdrec("train", *tiny(tmp, "train.stages=[target_only]", "train.target_only.epochs=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert list((tmp / "runs" / "tiny" / "plots").glob("*.png"))  # drawn with W&B off (tiny.yaml) too
    return tmp


def copy_run(finished: Path, tmp: Path) -> Path:
    shutil.copytree(finished, tmp / "t", symlinks=True)
    return tmp / "t"


def test_no_unsafe_load_is_left_in_the_project():
    unsafe = "weights_only" + "=False"  # spelled apart, so this file is searched too
    found = subprocess.run(["grep", "-rn", unsafe, "train", "model", "launch", "tools", "bench", "tests", "slurm"],
                           cwd=REPO, capture_output=True, text=True)
    assert found.stdout == ""


def test_a_forged_checkpoint_never_runs_its_code(finished, tmp_path):
    """export (whole-model file), --resume auto (RNG file) and --reevaluate (DeepSpeed's load) each
    refuse a pickle that would create a file, naming the file; the real files still load."""
    t = copy_run(finished, tmp_path)
    ckpt = t / "runs" / "tiny" / "target_only" / "checkpoints"
    resume_tag = (ckpt / "latest").read_text().strip()
    pwned = tmp_path / "PWNED"
    exported = xdrec("export", str(t / "runs" / "tiny"), "--stage", "target_only")
    assert exported.returncode == 0, exported.stderr[-2000:]  # the genuine files are data

    torch.save({"module": Evil(pwned)}, ckpt / "best" / "mp_rank_00_model_states.pt")
    line = one_error_line(xdrec("export", str(t / "runs" / "tiny"), "--stage", "target_only",
                                "--out", str(tmp_path / "e")))
    assert "mp_rank_00_model_states.pt: refused to load: it names GLOBAL posix.system" in line
    line = one_error_line(xdrec("train", *tiny(t, "train.stages=[target_only]", "train.target_only.epochs=1"),
                                "--reevaluate"))
    assert "best/mp_rank_00_model_states.pt: refused to load" in line

    metrics = t / "runs" / "tiny" / "metrics.json"
    m = json.loads(metrics.read_text())
    m["_meta"]["target_only"]["done"] = False  # so --resume auto loads the stage's resume checkpoint
    metrics.write_text(json.dumps(m))
    torch.save({"torch": torch.get_rng_state(), "numpy": Evil(pwned)}, ckpt / resume_tag / "rng_rank0.pt")
    _reseal(ckpt / resume_tag)
    line = one_error_line(xdrec("train", *tiny(t, "train.stages=[target_only]", "train.target_only.epochs=2"),
                                "--resume", "auto"))
    assert f"{resume_tag}/rng_rank0.pt: refused to load" in line
    assert not pwned.exists()


def _reseal(folder: Path) -> None:
    """Rewrite a checkpoint's manifest for its files as they are now (a forger can do the same:
    the manifest catches corruption, not forgery)."""
    from train.checkpoint import MANIFEST, file_entries

    man = json.loads((folder / MANIFEST).read_text())
    man["files"] = file_entries(folder, sorted(man["files"]))
    (folder / MANIFEST).write_text(json.dumps(man))


def test_deepspeed_zero_shards_are_checked_before_deepspeed_unpickles_them(tmp_path):
    """ZeRO-3's optimizer shards hold DeepSpeed records (allowed by name); anything else is refused."""
    from train.checkpoint import UnsafeCheckpoint, load_data, verify_data_only

    p = xdrec("train", *tiny(tmp_path, "train.stages=[target_only]", "train.target_only.epochs=1",
                             "train.zero_stage=3"))
    assert p.returncode == 0, p.stderr[-2000:]
    best = tmp_path / "runs" / "tiny" / "target_only" / "checkpoints" / "best"
    verify_data_only(best)  # the genuine shards pass
    optim = next(best.glob("*optim_states.pt"))
    state = load_data(optim, deepspeed_types=True)
    state["optimizer_state_dict"]["zero_stage"] = Evil(tmp_path / "PWNED")
    torch.save(state, optim)
    with pytest.raises(UnsafeCheckpoint, match="optim_states.pt: refused to load: it names GLOBAL posix.system"):
        verify_data_only(best)
    line = one_error_line(xdrec("export", str(tmp_path / "runs" / "tiny"), "--stage", "target_only"))
    assert "optim_states.pt: refused to load" in line
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("override", ["name=../x", f"name={Path('/tmp').resolve() / 'abs'}", "name=",
                                      "data.name=..", "data.name=", "data.name=/tmp", "data.domains=[A,../B]"])
def test_names_are_one_path_component(tmp_path, override):
    line = one_error_line(xdrec("train", *tiny(tmp_path), override))
    assert "must be one path component" in line and override.split("=")[0] in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing written


def test_prepare_deletes_only_a_folder_it_made(tmp_path):
    mine = tmp_path / "data" / "synthetic-tiny"
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("mine")
    line = one_error_line(xdrec("prepare", *tiny(tmp_path)))
    assert f"{mine} exists and is not a folder xdrec prepared" in line
    assert (mine / "precious.txt").read_text() == "mine"
    shutil.rmtree(mine)
    assert xdrec("prepare", *tiny(tmp_path)).returncode == 0  # its own folder it replaces
    assert xdrec("prepare", *tiny(tmp_path, "data.synthetic.seed=1")).returncode == 0
    assert json.loads((mine / "manifest.json").read_text())["data_config"]["synthetic"]["seed"] == 1


def test_overwrite_moves_only_a_run_folder_xdrec_made(tmp_path):
    other = tmp_path / "runs" / "tiny"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("somebody else's\n")
    line = one_error_line(xdrec("train", *tiny(tmp_path), "--overwrite"))
    assert "is not a run folder xdrec made" in line
    assert (other / "config.yaml").read_text() == "somebody else's\n"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny"]  # nothing moved aside


def test_the_run_lock_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(victim)
    line = one_error_line(xdrec("train", *tiny(tmp_path)))
    assert ".lock is a symbolic link" in line
    assert victim.read_text() == "keep me"


def test_a_prepared_folder_in_use_is_not_prepared_over(tmp_path):
    """A run reading data/prepared/<name> holds it (shared); an experiment with another data
    config of the same data.name is refused instead of rewriting the shards under it."""
    from train.runlock import DataLock

    assert xdrec("prepare", *tiny(tmp_path)).returncode == 0
    reader = DataLock(tmp_path / "data" / "synthetic-tiny").shared()  # as a training run holds it
    try:
        line = one_error_line(xdrec("train", *tiny(tmp_path, "data.synthetic.seed=7")))
        assert "synthetic-tiny is in use by another xdrec process" in line and "data.name" in line
        same = xdrec("train", *tiny(tmp_path, "train.stages=[target_only]", "train.target_only.epochs=1"))
        assert same.returncode == 0, same.stderr[-2000:]  # the same data config reads it beside the holder
    finally:
        reader.release()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a, **k):
        pass


@pytest.fixture
def served(tmp_path):
    """An HTTP server of ``tmp_path / 'www'`` on loopback: its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, srv.server_address[1]
    srv.shutdown()


def test_credentials_in_a_remote_url_never_reach_disk_or_the_console(tmp_path, served):
    """Shards streamed over HTTP with a password in the URL (and one from the environment): the
    run works, and the secret is in no file it wrote (config, manifest, metrics, W&B) nor its output."""
    root, port = served
    assert xdrec("prepare", *tiny(tmp_path)).returncode == 0
    shutil.copytree(tmp_path / "data" / "synthetic-tiny", root / "shards")
    secret, from_env = "S3CRETtoken42", "ENVtoken77"
    env = {**ENV, "WANDB_MODE": "offline", "XDREC_SHARDS_TOKEN": from_env}
    runs = []
    for k, remote in enumerate((f"http://alice:{secret}@127.0.0.1:{port}/shards",
                                f"http://alice:${{XDREC_SHARDS_TOKEN}}@127.0.0.1:{port}/shards")):
        args = tiny(tmp_path, f"data.remote={remote}", "train.stages=[target_only]", "train.target_only.epochs=1",
                    "tracking.wandb=true", name=f"remote{k}")
        p = subprocess.run([sys.executable, "-m", "train.cli", "train", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(p)
    saved = (tmp_path / "runs" / "remote1" / "config.yaml").read_text()
    assert "${XDREC_SHARDS_TOKEN}" in saved and "alice:***@" in (tmp_path / "runs" / "remote0" / "config.yaml").read_text()
    for token in (secret, from_env):
        hits = subprocess.run(["grep", "-rl", token, str(tmp_path / "runs"), str(tmp_path / "data")],
                              capture_output=True, text=True).stdout
        assert hits == "", hits
        assert all(token not in p.stdout + p.stderr for p in runs)
    bad = xdrec("train", *tiny(tmp_path, f"data.remote=http://alice:{secret}@127.0.0.1:1/x",
                               "train.stages=[target_only]", name="remote2"))
    assert bad.returncode == 2 and secret not in bad.stdout + bad.stderr


def test_a_forged_manifest_cannot_reach_a_shell_or_leave_its_folder(tmp_path):
    """A shard path with shell characters, '..' or an absolute path is refused before a pipe: command runs."""
    assert xdrec("prepare", *tiny(tmp_path)).returncode == 0
    manifest = tmp_path / "data" / "synthetic-tiny" / "manifest.json"
    good = manifest.read_text()
    pwned = tmp_path / "PWNED"
    for path in (f"B/train-000000.tar; touch {pwned} #", "../../etc/passwd", "/etc/passwd"):
        m = json.loads(good)
        m["shards"]["B"]["train"][0]["path"] = path
        manifest.write_text(json.dumps(m))
        line = one_error_line(xdrec("train", *tiny(tmp_path, "data.remote=pipe:cat {path}", "train.stages=[target_only]")))
        assert "not of the form <domain>/<split>-NNNNNN.tar" in line and "refused" in line
    assert not pwned.exists()
    manifest.write_text(good)
    shards = tmp_path / "data" / "synthetic-tiny"
    ok = xdrec("train", *tiny(tmp_path, f"data.remote=pipe:cat {shards}/{{path}}", "train.stages=[target_only]",
                              "train.target_only.epochs=1", name="piped"))
    assert ok.returncode == 0, ok.stderr[-2000:]  # a genuine pipe: remote streams


def test_results_carry_their_provenance_and_other_data_is_refused(tmp_path):
    t = tmp_path
    assert xdrec("train", *tiny(t, "train.stages=[target_only]", "train.target_only.epochs=1")).returncode == 0
    run = t / "runs" / "tiny"
    prov = json.loads((run / "metrics.json").read_text())["_meta"]["provenance"]
    assert set(prov) == {"run_id", "git_commit", "config_sha256", "data_fingerprint"}
    manifest = json.loads((t / "data" / "synthetic-tiny" / "manifest.json").read_text())
    assert prov["data_fingerprint"] == manifest["fingerprint"]
    assert xdrec("export", str(run), "--stage", "target_only").returncode == 0
    info = json.loads((run / "export-target_only" / "domains.json").read_text())
    assert info["provenance"]["run_id"] == prov["run_id"]
    # the same data.name prepared again from other data of the same sizes
    assert xdrec("prepare", *tiny(t, "data.synthetic.seed=5")).returncode == 0
    other = json.loads((t / "data" / "synthetic-tiny" / "manifest.json").read_text())["fingerprint"]
    line = one_error_line(xdrec("evaluate", str(run / "export-target_only")))
    assert prov["data_fingerprint"] in line and other in line
    line = one_error_line(xdrec("export", str(run), "--stage", "target_only", "--out", str(t / "again")))
    assert prov["data_fingerprint"] in line and other in line


def test_init_from_a_run_on_other_data_is_refused(tmp_path):
    assert xdrec("train", *tiny(tmp_path, "train.stages=[source]", "train.source.epochs=1", name="src")).returncode == 0
    src = tmp_path / "runs" / "src"
    theirs = json.loads((src / "metrics.json").read_text())["_meta"]["provenance"]["data_fingerprint"]
    line = one_error_line(xdrec("train", *tiny(tmp_path, "data.synthetic.seed=3", "train.stages=[joint]",
                                               f"train.init_from={src}", name="j")))
    assert f"train.init_from {src} was made on data with fingerprint {theirs}" in line


def test_report_counts_a_run_once(finished, tmp_path):
    run = finished / "runs" / "tiny"
    line = one_error_line(xdrec("report", str(run), str(run)))
    assert "are the same folder" in line
    copy = copy_run(finished, tmp_path) / "runs" / "tiny"
    line = one_error_line(xdrec("report", str(run), str(copy)))
    assert "are the same run (run_id" in line
    out = tmp_path / "r.json"
    assert xdrec("report", str(run), "--out", str(out)).returncode == 0
    assert json.loads(out.read_text())["provenance"][0]["run_id"]
    line = one_error_line(xdrec("report", str(out), str(out)))
    assert "are the same run" in line


def test_bad_files_given_to_commands_are_one_line(finished, tmp_path):
    run = finished / "runs" / "tiny"
    (tmp_path / "file").write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"name: \xff\xfe\n")
    cases = [
        (["train", str(bad_yaml)], "not UTF-8 text"),
        (["train", str(tmp_path)], "is a folder, not a config file"),
        (["report", str(run), "--out", str(tmp_path / "missing" / "x.json")], "does not exist"),
        (["export", str(run), "--stage", "target_only", "--out", str(tmp_path / "file")], "exists and is not a folder"),
        (["plan", TINY, "model.d_model=1000000000"], "model.d_model must be <= 65,536"),
        (["data", "fetch", "amazon-food-kitchen", "--base-url", "notaurl", "--to", str(tmp_path / "f")],
         "not a URL of https://"),
        (["data", "fetch", "amazon-food-kitchen", "--base-url", "ftp://x/y", "--to", str(tmp_path / "f")],
         "not a URL of https://"),
        (["data", "fetch", "amazon-food-kitchen", "--to", str(tmp_path / "file")], "exists and is not a folder"),
    ]
    for args, expected in cases:
        assert expected in one_error_line(xdrec(*args)), args
    export = tmp_path / "export"
    assert xdrec("export", str(run), "--stage", "target_only", "--out", str(export)).returncode == 0
    (export / "domains.json").write_text("{not json")
    assert "not an xdrec export's domains.json" in one_error_line(xdrec("evaluate", str(export)))
    for k in ("0", "-3"):
        p = xdrec("recommend", str(export), "--domain", "B", "--history", "1", "--internal", "-k", k)
        assert p.returncode == 2 and "argument -k: must be >= 1" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("override, expected", [
    ("eval.ks=[5]", "eval.ks=[5] lacks [10]"),
    ("eval.ks=[0,10]", "every k must be >= 1"),
    ("eval.cold_start=[-1]", "bucket edges must be >= 1 and increasing"),
    ("eval.cold_start=[10,5]", "bucket edges must be >= 1 and increasing"),
    ("train.stages=[]", "train.stages is empty"),
    ("train.stages=[source,source]", "names a stage twice"),
    ("data.synthetic.items_per_domain=[0,0]", "every domain needs >= 1"),
    ("data.synthetic.items_per_domain=[80]", "has 1 entries for 2 domains"),
])
def test_settings_that_would_fail_late_are_refused_first(tmp_path, override, expected):
    line = one_error_line(xdrec("train", *tiny(tmp_path), override))
    assert expected in line
    assert not (tmp_path / "data").exists()  # refused before any work


def test_a_corrupt_manifest_is_prepared_again_or_named(tmp_path):
    assert xdrec("prepare", *tiny(tmp_path)).returncode == 0
    manifest = tmp_path / "data" / "synthetic-tiny" / "manifest.json"
    manifest.write_text("{cut")
    p = xdrec("train", *tiny(tmp_path, "train.stages=[target_only]", "train.target_only.epochs=1"))
    assert p.returncode == 0 and "not valid JSON" in p.stdout and "preparing again" in p.stdout
    manifest.write_text("[1, 2]")
    line = one_error_line(xdrec("train", *tiny(tmp_path, "data.remote=file:///nowhere", "train.stages=[target_only]",
                                               name="r")))
    assert "manifest.json: schema_version 'list'" in line


def test_abxi_maps_and_tables_that_are_not_what_they_claim(tmp_path):
    from train.data.formats import DataFormatError, read_abxi, read_table
    from train.config import TableConfig

    folder = tmp_path / "abxi"
    folder.mkdir()
    (folder / "x_preprocessed.txt").write_text("0 1|100 2|200 3|300\n")
    for content in (b"[1, 2]", b"\xff\xfe{}"):
        (folder / "map_item_x.txt").write_bytes(content)
        with pytest.raises(DataFormatError, match="map_item_x.txt: (expected a JSON object|not UTF-8)"):
            list(read_abxi(folder))
    bom = tmp_path / "log.csv"
    bom.write_bytes("\ufeffuser,item,timestamp,domain\nu1,i1,1,A\n".encode())
    events = list(read_table(bom, TableConfig(), ["A", "B"]))
    assert [(e.user, e.item) for e in events] == [("u1", "i1")]


def test_fetch_interrupted_leaves_no_part_file(tmp_path):
    """Ctrl-C in the middle of a download: exit 130, one line, no ``.part`` left behind."""
    import signal
    import time

    class Slow(_Quiet):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2913978")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"x" * 1024)
                self.wfile.flush()
                time.sleep(0.05)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    out = tmp_path / "got"
    # A suite started in the background by a non-interactive shell has SIGINT ignored, and the CLI
    # would inherit that: the child takes Python's Ctrl-C handler back first, as at a terminal.
    ctrl_c = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "runpy.run_module('train.cli', run_name='__main__', alter_sys=True)")
    p = subprocess.Popen([sys.executable, "-c", ctrl_c, "data", "fetch", "amazon-food-kitchen", "--to", str(out),
                          "--base-url", f"http://127.0.0.1:{srv.server_address[1]}"], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("*.part")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(out.glob("*.part")), "the download never started"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    srv.shutdown()
    assert p.returncode == 130 and "xdrec: interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not list(out.glob("*.part")) and not list(out.glob("*.txt"))
