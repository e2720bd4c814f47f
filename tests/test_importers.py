"""Importers and filters of ``xdrec prepare``: every table format gives the same shards as the
others for the same events; Amazon review JSON lines from a real slice match the ABXI release;
filters equal brute-force references and report what they removed."""
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from train.config import DataConfig, FilterConfig, TableConfig
from train.data.events import apply_filters, collect, k_core
from train.data.formats import DataFormatError, Event
from train.data.prepare import load_manifest, prepare
from train.data.stream import sample_stream, shard_urls

QUIET = dict(log=lambda *_: None)


def _rows(n_users=60, seed=0):
    """Events with repeated timestamps and items shared by several users, two domains."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        for _ in range(rng.randint(2, 9)):
            dom = rng.choice(["books", "movies"])
            rows.append({"uid": f"u{u}", "iid": f"{dom[0]}{rng.randint(0, 25)}", "t": rng.randint(0, 40),
                         "dom": dom, "stars": rng.choice([1, 3, 4, 5])})
    return rows


def _cfg(tmp_path, name, **kw) -> DataConfig:
    cfg = DataConfig(name=name, format="table", domains=["books", "movies"], source="books", target="movies",
                     out_dir=str(tmp_path / "out"), shard_samples=16, **kw)
    cfg.table = TableConfig(user="uid", item="iid", timestamp="t", domain="dom", rating="stars")
    return cfg


def _shard_digests(cfg: DataConfig) -> dict:
    m = load_manifest(cfg.prepared_dir())
    return {d: {s: [sh["sha256"] for sh in v] for s, v in splits.items()} for d, splits in m["shards"].items()}


def test_csv_tsv_parquet_jsonl_and_per_domain_files_give_identical_shards(tmp_path):
    rows = _rows()
    cols = list(rows[0])
    (tmp_path / "log.csv").write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n"
                                                                    for r in rows))
    with gzip.open(tmp_path / "log.tsv.gz", "wt") as f:
        f.write("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "log.parquet", row_group_size=50)
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for dom in ("books", "movies"):  # one file per domain, split in two: files and globs
        mine = [r for r in rows if r["dom"] == dom]
        half = len(mine) // 2
        for k, part in enumerate((mine[:half], mine[half:])):
            (tmp_path / f"{dom}-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    digests = []
    for name, kw in [("csv", dict(path=str(tmp_path / "log.csv"))),
                     ("tsvgz", dict(path=str(tmp_path / "log.tsv.gz"))),
                     ("parquet", dict(path=str(tmp_path / "log.parquet"))),
                     ("jsonl", dict(path=str(tmp_path / "log.jsonl"))),
                     ("files", dict(files={"books": [str(tmp_path / "books-0.jsonl"), str(tmp_path / "books-1.jsonl")],
                                           "movies": [str(tmp_path / "movies-*.jsonl")]}))]:
        cfg = _cfg(tmp_path, name, **kw)
        prepare(cfg, **QUIET)
        digests.append(_shard_digests(cfg))
    # per-domain files change the input order only across domains; ties at equal times keep the
    # per-user input order, which differs there, so compare those with tie_break=item
    assert digests[0] == digests[1] == digests[2] == digests[3]
    by_item = []
    for name, kw in [("csv-i", dict(path=str(tmp_path / "log.csv"))),
                     ("files-i", dict(files={"books": [str(tmp_path / "books-*.jsonl")],
                                             "movies": [str(tmp_path / "movies-*.jsonl")]}))]:
        cfg = _cfg(tmp_path, name, filter=FilterConfig(tie_break="item"))
        for k, v in kw.items():
            setattr(cfg, k, v)
        prepare(cfg, **QUIET)
        by_item.append(_shard_digests(cfg))
    assert by_item[0] == by_item[1]
    m = load_manifest(tmp_path / "out" / "csv")
    assert m["read"]["events"] == len(rows) and m["n_events"] <= len(rows)


def _amazon_from_abxi_slice(src: Path, dst: Path, n_lines: int = 150) -> dict:
    """Amazon review JSON lines (one gz file per domain) holding the first users of a real ABXI file."""
    seq = next(src.glob("*_preprocessed.txt"))
    asin_of = {v[0]: (asin, v[1]) for asin, v in json.loads(next(src.glob("map_item_*.txt")).read_text()).items()}
    reviewer = {v: k for k, v in json.loads(next(src.glob("map_user_*.txt")).read_text()).items()}
    files = {0: gzip.open(dst / "reviews_Grocery.json.gz", "wt"), 1: gzip.open(dst / "reviews_Kitchen.json.gz", "wt")}
    lines = seq.read_text().splitlines()[:n_lines]
    for k, line in enumerate(lines):
        user, *events = line.split()
        for j, ev in enumerate(events):
            item, ts = ev.split("|")
            asin, dom = asin_of[int(item)]
            files[dom].write(json.dumps({"reviewerID": reviewer[int(user)], "asin": asin, "unixReviewTime": int(ts),
                                         "overall": 2.0 if (k + j) % 7 == 0 else 5.0, "summary": "x"}) + "\n")
    for f in files.values():
        f.close()
    return {"lines": lines, "asin_of": asin_of, "reviewer": reviewer}


def test_amazon_review_files_from_a_real_slice_match_the_abxi_release(fk_slice, tmp_path):
    raw = _amazon_from_abxi_slice(SHARED_DATA / "amazon-food-kitchen", tmp_path)
    amazon = DataConfig(name="amz", format="amazon", domains=["food", "kitchen"], source="food", target="kitchen",
                        out_dir=str(tmp_path / "out"),
                        files={"food": [str(tmp_path / "reviews_Grocery.json.gz")],
                               "kitchen": [str(tmp_path / "reviews_Kitchen.json.gz")]})
    prepare(amazon, **QUIET)
    abxi = DataConfig(name="abxi", format="abxi", path=str(fk_slice), domains=["food", "kitchen"], source="food",
                      target="kitchen", out_dir=str(tmp_path / "out"))
    (fk_slice / "afk_50_preprocessed.txt").write_text("\n".join(raw["lines"]) + "\n")
    prepare(abxi, **QUIET)
    ma, mb = load_manifest(amazon.prepared_dir()), load_manifest(abxi.prepared_dir())
    assert ma["counts"] == mb["counts"] and [d["n_items"] for d in ma["domains"]] == [d["n_items"] for d in mb["domains"]]
    # the same users get the same held-out targets, in raw ids
    inv = lambda folder: {v: k for k, v in json.loads((folder / "item_map.json").read_text()).items()}
    users = lambda folder: {v: k for k, v in json.loads((folder / "user_map.json").read_text()).items()}
    ia, ib = inv(amazon.prepared_dir()), inv(abxi.prepared_dir())
    ua, ub = users(amazon.prepared_dir()), users(abxi.prepared_dir())
    for dom in ("food", "kitchen"):
        ta = {ua[s["user"]]: ia[s["target"]] for s in sample_stream(shard_urls(ma, amazon.prepared_dir(), dom, "test"),
                                                                    shuffle=False, seed=0, epoch=0, buffer=0)}
        tb = {raw["reviewer"][int(ub[s["user"]])]: raw["asin_of"][int(ib[s["target"]])][0]
              for s in sample_stream(shard_urls(mb, abxi.prepared_dir(), dom, "test"), shuffle=False, seed=0,
                                     epoch=0, buffer=0)}
        assert ta == tb and len(ta) > 10
    # the rating threshold drops the 2-star reviews and says how many
    amazon.name, amazon.filter = "amz4", FilterConfig(min_rating=4.0)
    prepare(amazon, **QUIET)
    rep = load_manifest(amazon.prepared_dir())["filtered"][0]
    n_low = sum(1 for k, line in enumerate(raw["lines"]) for j in range(len(line.split()) - 1) if (k + j) % 7 == 0)
    assert rep["filter"] == "rating >= 4" and rep["events_removed"] == n_low


def _brute_k_core(events, user_core, item_core, min_domains):
    """Reference: remove offending (user, domain) groups / items / users one sweep at a time."""
    keep = set(range(len(events)))
    while True:
        ud, it, doms = {}, {}, {}
        for e in keep:
            u, i, d = events[e]
            ud[(u, d)] = ud.get((u, d), 0) + 1
            it[i] = it.get(i, 0) + 1
        new = {e for e in keep if ud[(events[e][0], events[e][2])] >= user_core and it[events[e][1]] >= item_core}
        for e in new:
            doms.setdefault(events[e][0], set()).add(events[e][2])
        new = {e for e in new if len(doms[events[e][0]]) >= min_domains}
        if new == keep:
            return keep
        keep = new


@pytest.mark.parametrize("seed", range(6))
def test_k_core_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 400
    user = rng.integers(0, 40, n).astype(np.int32)
    dom = rng.integers(0, 2, n).astype(np.int8)
    item = (rng.integers(0, 30, n) * 2 + dom).astype(np.int32)  # an item lives in one domain
    uc, ic, md = int(rng.integers(2, 5)), int(rng.integers(2, 5)), int(rng.integers(1, 3))
    keep, passes = k_core(user, item, dom, np.ones(n, bool), n_users=40, n_items=60, n_domains=2,
                          user_core=uc, item_core=ic, min_domains=md)
    ref = _brute_k_core(list(zip(user.tolist(), item.tolist(), dom.tolist())), uc, ic, md)
    assert set(np.flatnonzero(keep).tolist()) == ref
    assert len(ref) < n and passes >= 2  # the filter really removed events, then checked its fixed point


def _table(events):
    return collect([Event(u, i, t, d, r) for u, i, t, d, r in events], 2)


def test_duplicates_last_n_ties_and_overlap_filters_report_counts():
    ev = [("a", "x", 1, 0, 5), ("a", "y", 2, 0, 5), ("a", "x", 3, 0, 5), ("a", "z", 4, 1, 5), ("a", "w", 4, 1, 5),
          ("b", "x", 1, 0, 5), ("b", "y", 1, 0, 5), ("b", "v", 2, 0, 5), ("b", "y", 3, 0, 5)]
    t = _table(ev)
    keep, rep = apply_filters(t, FilterConfig(duplicates="first"), 2)
    assert sorted(np.flatnonzero(keep).tolist()) == [0, 1, 3, 4, 5, 6, 7]
    assert rep[0]["events_removed"] == 2 and rep[0]["users_removed"] == 0
    keep, _ = apply_filters(t, FilterConfig(duplicates="last"), 2)
    assert sorted(np.flatnonzero(keep).tolist()) == [1, 2, 3, 4, 5, 7, 8]
    # last 3 by time; the tie at t=4 ("z" then "w" in input order) is broken by input order or by item id
    keep, rep = apply_filters(t, FilterConfig(last_n=3), 2)
    assert sorted(np.flatnonzero(keep).tolist()) == [2, 3, 4, 6, 7, 8]
    assert rep[0] == {"filter": "last 3 events per user", "events_removed": 3, "users_removed": 0, "items_removed": 0}
    # users active in both domains only: b has no domain-1 event
    keep, rep = apply_filters(t, FilterConfig(min_domains=2), 2)
    assert sorted(np.flatnonzero(keep).tolist()) == [0, 1, 2, 3, 4]
    assert rep[0]["users_removed"] == 1 and rep[0]["events_removed"] == 4 and rep[0]["items_removed"] == 1


def test_tie_break_by_item_makes_order_independent_of_input_order(tmp_path):
    a = "uid,iid,t,dom,stars\nu1,b9,5,books,5\nu1,b1,5,books,5\nu1,m2,6,movies,5\nu1,m1,7,movies,5\n"
    b = "uid,iid,t,dom,stars\nu1,b1,5,books,5\nu1,b9,5,books,5\nu1,m2,6,movies,5\nu1,m1,7,movies,5\n"
    seqs = {}
    for name, text in (("a", a), ("b", b)):
        for tie in ("input", "item"):
            (tmp_path / f"{name}.csv").write_text(text)
            cfg = _cfg(tmp_path, f"{name}-{tie}", path=str(tmp_path / f"{name}.csv"), filter=FilterConfig(tie_break=tie))
            prepare(cfg, **QUIET)
            m = load_manifest(cfg.prepared_dir())
            (s,) = list(sample_stream(shard_urls(m, cfg.prepared_dir(), "movies", "test"), shuffle=False, seed=0,
                                      epoch=0, buffer=0))
            seqs[(name, tie)] = s["items"]
    assert seqs[("a", "input")] != seqs[("b", "input")]
    assert seqs[("a", "item")] == seqs[("b", "item")]


def test_bad_tables_name_file_and_line(tmp_path):
    cases = {
        "x.jsonl": ('{"uid": "u", "iid": "i", "t": 1, "dom": "books", "stars": 5}\n{"uid": "u", "iid"\n', "x.jsonl:2"),
        "y.csv": ("uid,iid,t,dom,stars\nu,i,yesterday,books,5\n", "y.csv:2: timestamp 'yesterday'"),
        "z.jsonl": ('{"uid": "u", "iid": "i", "t": 1, "dom": "music", "stars": 5}\n', "z.jsonl:1: domain 'music'"),
        "w.jsonl": ('{"uid": "u", "iid": "i", "dom": "books", "stars": 5}\n', "w.jsonl:1: no field 't'"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataFormatError, match=msg):
            prepare(_cfg(tmp_path, name.split(".")[0], path=str(tmp_path / name)), **QUIET)
    pq.write_table(pa.Table.from_pylist([{"uid": "u", "iid": "i", "dom": "books"}]), tmp_path / "p.parquet")
    with pytest.raises(DataFormatError, match=r"p.parquet: columns .* lack \['t', 'stars'\]"):
        prepare(_cfg(tmp_path, "p", path=str(tmp_path / "p.parquet")), **QUIET)
    body = "".join(f"u{random.random()},i{random.random()},1,books,5\n" for _ in range(500)).encode()
    whole = gzip.compress(b"uid,iid,t,dom,stars\n" + body)
    (tmp_path / "cut.csv.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataFormatError, match="cut.csv.gz"):
        prepare(_cfg(tmp_path, "cut", path=str(tmp_path / "cut.csv.gz")), **QUIET)
    with pytest.raises(DataFormatError, match="data.files.books: .*nothing-\\*.csv matches no file"):
        prepare(_cfg(tmp_path, "none", files={"books": [str(tmp_path / "nothing-*.csv")]}), **QUIET)
