import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from train.config import DataConfig, SyntheticConfig
from train.data.formats import DataFormatError
from train.data.prepare import ManifestError, load_manifest, prepare
from train.data.stream import vocabulary, sample_stream, shard_urls


def _samples(manifest, folder, domain, split):
    return [s for s in sample_stream(shard_urls(manifest, folder, domain, split), shuffle=False,
                                          seed=0, epoch=0, buffer=0)]


def _raw_sequences(folder: Path):
    seqs = {}
    for line in next(folder.glob("*_preprocessed.txt")).read_text().splitlines():
        parts = line.split()
        seqs[int(parts[0])] = [int(t.split("|")[0]) for t in parts[1:]]
    return seqs


@pytest.fixture
def prepared(fk_slice, tmp_path):
    cfg = DataConfig(name="fk", format="abxi", path=str(fk_slice), domains=["food", "kitchen"],
                     source="food", target="kitchen", out_dir=str(tmp_path / "out"), shard_samples=64)
    prepare(cfg, log=lambda *_: None)
    return cfg, load_manifest(cfg.prepared_dir()), _raw_sequences(fk_slice)


def test_counts_and_vocab_on_real_slice(prepared):
    cfg, m, raw = prepared
    assert m["n_users"] == 200 == len(raw)
    assert m["n_events"] == sum(len(s) for s in raw.values())
    food, kitchen = m["domains"]
    # ABXI ids: food 1..11837, kitchen above; the slice keeps the original global ids.
    assert food["offset"] == 0 and kitchen["offset"] == food["n_items"]
    dom = vocabulary(m)
    all_items = {i for s in raw.values() for i in s}
    assert dom.n_items == len(all_items)
    assert food["n_events"] + kitchen["n_events"] == m["n_events"]
    # every user appears once in valid and once in test, in the domain of the held-out item
    for split in ("valid", "test"):
        assert sum(m["counts"][d][split]["samples"] for d in ("food", "kitchen")) == 200
    # shards are hashed, and > 1 shard per split exists at 64 samples per shard
    assert len(m["shards"]["food"]["train"]) >= 2
    assert all(len(sh["sha256"]) == 64 for sh in m["shards"]["food"]["train"])


def test_leave_one_out_splits_do_not_leak(prepared):
    cfg, m, raw = prepared
    folder = cfg.prepared_dir()
    item_map = json.loads((folder / "item_map.json").read_text())
    user_map = json.loads((folder / "user_map.json").read_text())
    inv_user = {v: int(k) for k, v in user_map.items()}
    seqs = {inv_user[u]: s for u, s in ((u, [item_map[str(i)] for i in raw[inv_user[u]]]) for u in inv_user)}
    dom = vocabulary(m)
    test_users = set()
    for d in ("food", "kitchen"):
        for s in _samples(m, folder, d, "train"):
            full = seqs[inv_user[s["user"]]]
            assert s["items"] == full[:-2]  # the last two events are never training data
        for s in _samples(m, folder, d, "valid"):
            full = seqs[inv_user[s["user"]]]
            assert s["items"] == full[:-2] and s["target"] == full[-2]
            assert m["domains"][int(dom.of_ids([s["target"]])[0])]["name"] == d
        for s in _samples(m, folder, d, "test"):
            full = seqs[inv_user[s["user"]]]
            assert s["items"] == full[:-1] and s["target"] == full[-1]
            assert set(s["exclude"]) == set(full)
            test_users.add(s["user"])
    assert len(test_users) == 200


def test_sha_mismatch_is_refused(prepared):
    cfg, m, _ = prepared
    shard = cfg.prepared_dir() / m["shards"]["kitchen"]["test"][0]["path"]
    with open(shard, "r+b") as f:
        f.seek(600)
        f.write(b"X")
    with pytest.raises(ManifestError, match=r"kitchen/test.*sha256"):
        load_manifest(cfg.prepared_dir())


def test_missing_shard_is_named(prepared):
    cfg, m, _ = prepared
    shard = cfg.prepared_dir() / m["shards"]["food"]["valid"][0]["path"]
    shard.unlink()
    with pytest.raises(ManifestError, match=str(shard)):
        load_manifest(cfg.prepared_dir())


def test_shards_are_plain_webdataset_tars(prepared):
    cfg, m, _ = prepared
    path = cfg.prepared_dir() / m["shards"]["food"]["test"][0]["path"]
    with tarfile.open(path) as t:
        names = t.getnames()
    assert names and all(n.startswith("u") and n.endswith(".json") for n in names)


def test_malformed_line_names_file_and_line(fk_slice, tmp_path):
    seq = next(fk_slice.glob("*_preprocessed.txt"))
    lines = seq.read_text().splitlines()
    lines[6] = lines[6] + " 12|notatime"
    seq.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="bad", format="abxi", path=str(fk_slice), domains=["food", "kitchen"],
                     source="food", target="kitchen", out_dir=str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match=rf"{seq.name}:7: event '12\|notatime'"):
        prepare(cfg, log=lambda *_: None)
    assert not (tmp_path / "out" / "bad").exists()


def test_unknown_item_names_line(fk_slice, tmp_path):
    seq = next(fk_slice.glob("*_preprocessed.txt"))
    seq.write_text(seq.read_text() + "9999 99999999|1400000000\n")
    cfg = DataConfig(name="bad", format="abxi", path=str(fk_slice), domains=["food", "kitchen"],
                     source="food", target="kitchen", out_dir=str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match=r":201: item 99999999 is not in map_item"):
        prepare(cfg, log=lambda *_: None)


def test_table_format_with_ties_and_filtering(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("uid,iid,t,dom\n"
                   "u1,x,3,books\nu1,y,1,movies\nu1,z,1,books\nu1,x2,5,movies\n"  # tie at t=1: file order
                   "u2,x,1,books\nu2,y,2,movies\n")  # 2 events: filtered
    cfg = DataConfig(name="t", format="table", path=str(csv), domains=["books", "movies"], source="books",
                     target="movies", out_dir=str(tmp_path / "out"))
    cfg.table.user, cfg.table.item, cfg.table.timestamp, cfg.table.domain = "uid", "iid", "t", "dom"
    prepare(cfg, log=lambda *_: None)
    m = load_manifest(cfg.prepared_dir())
    assert m["filtered"][-1] == {"filter": "users with < 3 events", "events_removed": 2, "users_removed": 1,
                                 "items_removed": 0}
    items = json.loads((cfg.prepared_dir() / "item_map.json").read_text())
    assert [d["n_items"] for d in m["domains"]] == [2, 2]
    (test,) = _samples(m, cfg.prepared_dir(), "movies", "test")
    assert test["items"] == [items["y"], items["z"], items["x"]] and test["target"] == items["x2"]


def test_table_bad_row_names_line(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("user,item,timestamp,domain\nu1,a,1,A\nu1,b,two,B\n")
    cfg = DataConfig(name="t", format="table", path=str(csv), out_dir=str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match=r"log.csv:3: timestamp 'two' is not a number"):
        prepare(cfg, log=lambda *_: None)


def test_synthetic_default_needs_no_files(tmp_path):
    cfg = DataConfig(out_dir=str(tmp_path), synthetic=SyntheticConfig(n_users=50, items_per_domain=[30, 30]))
    prepare(cfg, log=lambda *_: None)
    m = load_manifest(cfg.prepared_dir())
    assert m["n_users"] == 50 and [d["n_items"] for d in m["domains"]] == [30, 30]


def test_data_verify_and_stats_on_real_slice(prepared):
    from train.data.inspect import stats, verify

    cfg, m, raw = prepared
    folder = cfg.prepared_dir()
    counts = verify(folder)
    assert counts["kitchen"]["test"] == m["counts"]["kitchen"]["test"]["samples"]
    s = stats(folder)
    assert s["users"] == 200 == s["users_in_all_domains"]  # ABXI users are active in both domains
    assert [s["domains"][d["name"]]["events"] for d in m["domains"]] == [d["n_events"] for d in m["domains"]]
    lens = sorted(len(v) for v in raw.values())
    assert s["sequence_length_percentiles"]["p50"] == pytest.approx(float(np.percentile(lens, 50)))
    # a manifest whose sample count disagrees with the shard is refused, naming the shard
    mpath = folder / "manifest.json"
    bad = json.loads(mpath.read_text())
    bad["shards"]["food"]["train"][0]["samples"] += 1
    mpath.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"food/train-000000.tar: 64 samples, manifest.json says 65"):
        verify(folder)


def test_same_input_gives_byte_identical_shards(tmp_path):
    hashes = []
    for k in range(2):
        cfg = DataConfig(out_dir=str(tmp_path / str(k)), synthetic=SyntheticConfig(n_users=40, items_per_domain=[20, 20]))
        prepare(cfg, log=lambda *_: None)
        m = load_manifest(cfg.prepared_dir())
        hashes.append([sh["sha256"] for d in m["shards"].values() for s in d.values() for sh in s])
    assert hashes[0] == hashes[1] and len(hashes[0]) == 6


def test_samples_digest_depends_on_the_samples_not_on_their_shards(tmp_path):
    """Shards of 7 samples or of 1000 hold the same samples: the same samples_sha256 per domain and
    split, which verify recomputes; other samples (another seed), another digest."""
    from train.data.inspect import verify

    def digests(k: str, **kw) -> tuple[dict, int]:
        cfg = DataConfig(out_dir=str(tmp_path / k), synthetic=SyntheticConfig(n_users=60, items_per_domain=[20, 20], **kw),
                         shard_samples=7 if k == "small" else 1000)
        prepare(cfg, log=lambda *_: None)
        m = load_manifest(cfg.prepared_dir())
        verify(cfg.prepared_dir())
        assert m["engine"] == "local"
        n_shards = sum(len(sh) for d in m["shards"].values() for sh in d.values())
        return {(d, sp): c["samples_sha256"] for d, x in m["counts"].items() for sp, c in x.items()}, n_shards

    (small, n_small), (big, n_big) = digests("small"), digests("big")
    assert small == big and n_small > n_big == 6
    other, _ = digests("other", seed=1)
    assert all(other[k] != small[k] for k in small)


def test_verify_names_a_split_whose_samples_changed_under_resealed_shards(prepared):
    """A shard rewritten with one sample changed (its sha256 and count updated, as a careless
    tool would): every shard check passes, the samples digest names the split."""
    from train.data.inspect import verify
    from train.files import sha256_file

    cfg, m, _ = prepared
    folder = cfg.prepared_dir()
    shard = folder / m["shards"]["kitchen"]["test"][0]["path"]
    with tarfile.open(shard) as t:
        members = [(x, json.load(t.extractfile(x))) for x in t.getmembers()]
    members[0][1]["target"] = members[1][1]["target"]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for info, obj in members:
            data = json.dumps(obj).encode()
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    m["shards"]["kitchen"]["test"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"kitchen/test samples digest .* differs from its samples_sha256"):
        verify(folder)


_TIMED = {  # user: [(item, time, domain)]; the cuts are at 100 (valid) and 200 (test)
    "u1": [("a1", 10, "A"), ("b1", 20, "B"), ("a2", 50, "A"), ("b2", 150, "B"), ("a3", 160, "A"), ("b3", 250, "B"),
           ("a4", 300, "A")],
    "u2": [("a1", 10, "A"), ("a2", 20, "A"), ("b1", 30, "B")],  # every event before the valid cut: trains only
    "u3": [("a5", 120, "A"), ("b4", 130, "B"), ("b5", 210, "B")],  # nothing before the valid cut
    "u4": [("b1", 10, "B"), ("b2", 20, "B"), ("a1", 220, "A")],  # no event between the cuts
}


def test_temporal_split_trains_on_nothing_after_the_valid_cut(tmp_path):
    """Every user cut at the same two times: train holds only events before the valid cut; a
    user's first event in [valid, test) is their valid target, the first at or after the test cut
    their test target, each with every event before it; users without one are counted."""
    csv = tmp_path / "log.csv"
    csv.write_text("user,item,timestamp,domain\n" + "".join(
        f"{u},{i},{t},{d}\n" for u, evs in _TIMED.items() for i, t, d in evs))
    cfg = DataConfig(name="timed", format="table", path=str(csv), out_dir=str(tmp_path / "out"),
                     split="temporal", split_times=[100, 200])
    prepare(cfg, log=lambda *_: None)
    folder = cfg.prepared_dir()
    assert folder.name == "timed-temporal"
    m = load_manifest(folder)
    assert m["split"] == {"kind": "temporal", "valid_time": 100, "test_time": 200, "users": 4, "users_with_valid": 1,
                          "users_with_test": 3, "users_without_training_events": 1, "events_after_valid_cut": 8}
    name = {v: k for k, v in json.loads((folder / "item_map.json").read_text()).items()}
    user = {v: k for k, v in json.loads((folder / "user_map.json").read_text()).items()}

    def read(split):
        return {(user[s["user"]], tuple(name[i] for i in s["items"]), name.get(s.get("target"))): sorted(
            name[i] for i in s.get("exclude", [])) for s in _tar_samples(folder, f"*/{split}-*.tar")}

    assert set(read("train")) == {("u1", ("a1", "b1", "a2"), None), ("u2", ("a1", "a2", "b1"), None),
                                  ("u4", ("b1", "b2"), None)}
    assert read("valid") == {("u1", ("a1", "b1", "a2"), "b2"): ["a1", "a2", "b1", "b2"]}
    assert read("test") == {("u1", ("a1", "b1", "a2", "b2", "a3"), "b3"): ["a1", "a2", "a3", "b1", "b2", "b3"],
                            ("u3", ("a5", "b4"), "b5"): ["a5", "b4", "b5"], ("u4", ("b1", "b2"), "a1"): ["a1", "b1", "b2"]}
    cfg.split_times = []  # the default quantiles of the kept events' times
    cfg.split_quantiles = [0.5, 0.75]
    prepare(cfg, log=lambda *_: None)
    times = sorted(t for evs in _TIMED.values() for _, t, _ in evs)
    assert load_manifest(folder)["split"]["valid_time"] == pytest.approx(float(np.quantile(times, 0.5)))


def _tar_samples(folder: Path, pattern: str) -> list[dict]:
    out = []
    for tar in sorted(folder.glob(pattern)):
        with tarfile.open(tar) as t:
            out += [json.load(t.extractfile(m)) for m in t.getmembers() if m.name.endswith(".json")]
    return out


def test_target_fraction_keeps_that_share_of_target_training_users_and_every_valid_test_sample(tmp_path):
    """data.target_fraction=0.25: a quarter of the users with B training targets keep them; the
    others' B events leave every training sample (A's too); valid and test are the full data's."""
    full = DataConfig(out_dir=str(tmp_path), synthetic=SyntheticConfig(n_users=200, items_per_domain=[40, 50]))
    part = DataConfig(out_dir=str(tmp_path), target_fraction=0.25, synthetic=full.synthetic)
    prepare(full, log=lambda *_: None)
    prepare(part, log=lambda *_: None)
    a, b = full.prepared_dir(), part.prepared_dir()
    assert b.name == "synthetic-B25" and a.name == "synthetic"
    m = load_manifest(b)
    lo = m["domains"][1]["offset"]
    kept = {s["user"] for s in _tar_samples(b, "B/train-*.tar")}
    assert len(kept) == round(0.25 * len({s["user"] for s in _tar_samples(a, "B/train-*.tar")}))
    assert m["target_fraction"]["users_dropped"] == 200 - len(kept) and m["target_fraction"]["events_dropped"] > 0
    for s in _tar_samples(b, "A/train-*.tar"):
        if s["user"] not in kept:
            assert all(i <= lo for i in s["items"])  # no B event left in a dropped user's training rows
    for split in ("valid", "test"):
        assert _tar_samples(a, f"*/{split}-*.tar") == _tar_samples(b, f"*/{split}-*.tar")
    assert json.loads((a / "manifest.json").read_text())["domains"] == m["domains"]  # one vocabulary
