"""Where shards are streamed from (local, brace patterns, file://, http:// on 127.0.0.1, pipe:),
bad shards and samples (named errors or counted skips), DataLoader workers, resampled epochs,
and exact mid-epoch resume with 2 ranks x 2 workers."""
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import prepared_synthetic

from train.data.prepare import ManifestError, load_manifest
from train.data.stream import (ReaderOptions, ShardError, eval_batches, sample_stream, shard_sizes, shard_urls,
                               train_batches)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("prep"), n_users=150, shard_samples=30)


def _users(stream) -> list[int]:
    return [s["user"] for s in stream]


def _local(m, folder, split="train", domain="A"):
    return _users(sample_stream(shard_urls(m, folder, domain, split), shuffle=False, seed=0, epoch=0, buffer=0))


@pytest.fixture
def http_server(prep):
    _, folder = prep
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_file_pipe_and_brace_sources_yield_the_local_samples(prep, http_server):
    m, folder = prep
    local = _local(m, folder)
    assert len(local) == m["counts"]["A"]["train"]["samples"] and len(m["shards"]["A"]["train"]) > 1
    for remote in (http_server, f"file://{folder}", f"pipe:cat {folder}/{{path}}"):
        urls = shard_urls(m, folder, "A", "train", remote)
        assert urls[0].startswith(remote.split("{")[0])
        assert _users(sample_stream(urls, shuffle=False, seed=0, epoch=0, buffer=0)) == local, remote
    n = len(m["shards"]["A"]["train"])
    pattern = f"{folder}/A/train-{{000000..{n - 1:06d}}}.tar"
    assert _users(sample_stream(pattern, shuffle=False, seed=0, epoch=0, buffer=0)) == local
    # batches through the training path from the HTTP server equal the local ones
    kw = dict(batch_size=16, max_len=12, seed=3, epoch=1, buffer=50)
    a = [b["user"].tolist() for b in train_batches(m, folder, "A", **kw)]
    b = [b["user"].tolist() for b in train_batches(m, folder, "A", **kw, reader=ReaderOptions(remote=http_server))]
    assert a == b


def _copy(prep, tmp_path) -> Path:
    _, folder = prep
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_truncated_shard_names_the_shard_and_skip_counts_it(prep, tmp_path, capfd):
    m, _ = prep
    folder = _copy(prep, tmp_path)
    shard = folder / m["shards"]["A"]["train"][1]["path"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:1500])
    with pytest.raises(ManifestError, match=f"{shard}.*does not match its sha256"):
        load_manifest(folder)  # the local check refuses it before any work
    urls, sizes = shard_urls(m, folder, "A", "train"), shard_sizes(m, "A", "train")
    total = m["counts"]["A"]["train"]["samples"]
    # cut inside a member's data (tar raises) and at a member boundary (tar reads a clean end)
    for cut in (1500, 2048):
        shard.write_bytes(whole[:cut])
        with pytest.raises(ShardError, match=f"{shard}"):
            list(sample_stream(urls, shuffle=False, seed=0, epoch=0, buffer=0, sizes=sizes))
        got = _users(sample_stream(urls, shuffle=False, seed=0, epoch=0, buffer=0, sizes=sizes,
                                   reader=ReaderOptions(on_error="skip")))
        assert total - sizes[1] <= len(got) < total
        err = capfd.readouterr().err
        assert f"skipped the rest of {shard}" in err or f"skipped {shard}: ended after" in err, err
        assert "1 shard(s)" in err


def test_missing_shard_and_wrong_field_are_named(prep, tmp_path, http_server, capfd):
    m, folder = prep
    missing = shard_urls(m, folder, "A", "train", http_server + "/nowhere")
    with pytest.raises(ShardError, match="nowhere/A/train-000000.tar"):
        list(sample_stream(missing[:1], shuffle=False, seed=0, epoch=0, buffer=0))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key, obj in (("u1", {"user": 1, "items": [1, 2]}), ("u2", {"user": 2, "items": "1 2 3"}),
                         ("u3", {"user": 3, "items": [1, 99999]}), ("u4", {"user": 4, "items": [3, 4]})):
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=f"{bad} key 'u2': field 'items' must be list"):
        list(sample_stream([str(bad)], shuffle=False, seed=0, epoch=0, buffer=0, n_items=90))
    skip = ReaderOptions(on_error="skip")
    capfd.readouterr()
    assert _users(sample_stream([str(bad)], shuffle=False, seed=0, epoch=0, buffer=0, n_items=90, reader=skip)) == [1, 4]
    err = capfd.readouterr().err
    assert "key 'u3': item ids must be integers in 1..90" in err and "0 shard(s), 2 sample(s)" in err


def test_two_workers_read_every_sample_once(prep):
    m, folder = prep
    kw = dict(batch_size=8, max_len=12, seed=0, epoch=0, buffer=20)
    one = [u for b in train_batches(m, folder, "A", **kw) for u in b["user"].tolist()]
    two = [u for b in train_batches(m, folder, "A", **kw, reader=ReaderOptions(num_workers=2)) for u in b["user"].tolist()]
    assert sorted(one) == sorted(two) and len(set(two)) == len(two)
    again = [u for b in train_batches(m, folder, "A", **kw, reader=ReaderOptions(num_workers=2)) for u in b["user"].tolist()]
    assert again == two  # worker round-robin order is deterministic


def test_resampled_stream_is_endless_and_bounded_by_with_epoch(prep):
    m, folder = prep
    r = ReaderOptions(resampled=True)
    kw = dict(batch_size=8, max_len=12, seed=0, buffer=20, reader=r)
    n = m["counts"]["A"]["train"]["samples"]
    a = [b["user"].tolist() for b in train_batches(m, folder, "A", epoch=0, epoch_batches=3 * n, **kw)]
    assert len(a) == 3 * n  # far more than one pass: shards are drawn again and again
    assert a == [b["user"].tolist() for b in train_batches(m, folder, "A", epoch=0, epoch_batches=3 * n, **kw)]
    with pytest.raises(ValueError, match="epoch_batches"):
        train_batches(m, folder, "A", epoch=0, **kw)


def test_eval_stream_with_skip_policy_still_covers_good_users(prep):
    m, folder = prep
    users = [u for b in eval_batches(m, folder, "B", "test", batch_size=10, max_len=12,
                                     reader=ReaderOptions(on_error="skip")) for u in b["user"].tolist()]
    assert len(users) == m["counts"]["B"]["test"]["samples"]


@pytest.mark.parametrize("resampled", [False, True], ids=["epoch", "resampled"])
def test_exact_resume_two_ranks_two_workers(prep, tmp_path, resampled):
    """Each rank (2, gloo, under torchrun) reads 2 workers' batches: a run cut after 5 batches and
    resumed (skipping the 5) sees exactly the batches of an uninterrupted run: nothing repeated,
    nothing missing; the ranks' samples are disjoint and cover the split."""
    m, folder = prep
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "dist_stream_resume.py"), str(folder), str(out), "5", str(int(resampled))]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    for r, got in runs.items():
        assert got["first"] + got["resumed"] == got["full"]
        assert len(got["first"]) == 5 and got["resumed"]
    if not resampled:
        flat = lambda r: [u for b in runs[r]["full"] for u in b]
        assert not set(flat(0)) & set(flat(1))
        assert sorted(flat(0) + flat(1)) == sorted(_local(m, folder))
