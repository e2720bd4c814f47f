"""The Ray Data engine of ``xdrec prepare`` (``data.engine: ray``, ``--engine ray``).

The same plan as the in-process engine, as Ray Data operations, so that the driver never holds the
events: input files are read in parallel (one task a file, through the same readers and their
one-line errors); every event keeps a ``gone`` column (the index in ``filter_plan`` of the filter
that removed it, ``KEPT`` if none), so each filter's report is counted from it at the end; the
per-user filters (duplicates, k-core's user side, last n, minimum events), the cut
(``train.data.split``) and the samples run per user after a shuffle by a hash of the user; k-core's item
side joins the item counts of each pass. Ids follow raw-id order: users and items are sorted by
Ray and numbered as the driver streams the sorted rows (it holds one batch at a time and writes
``user_map.json``/``item_map.json`` as it goes). Workers write their shards into a folder of their
own under ``<prepared>.tmp/_parts``; the driver moves only the shards of tasks that finished into
place (consecutive names per domain and split, ordered by their first user), so a worker killed
mid-shard leaves nothing a later run reads. Samples equal the in-process engine's: same
``samples_sha256`` per domain and split; shard boundaries differ.

Without an address xdrec starts a local Ray sized to this machine and stops it afterwards; with
one (``data.ray_address`` / ``--address``) it joins that cluster, whose workers must have xdrec
installed and see the input files and ``data.out_dir`` at the same paths (a shared file system).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import uuid
import zlib
from pathlib import Path

import numpy as np

from train.config import DataConfig
from train.data.digest import SamplesDigest, canonical
from train.data.events import filter_plan, id_sort_key, no_events, nothing_kept
from train.data.formats import AMAZON_COLUMNS, DataFormatError, read_abxi, read_table, table_files
from train.data.shards import SPLITS, ShardWriter, sample_bytes
from train.data.split import cut_times, leave_one_out, temporal, user_samples
from train.data.synthetic import generate
from train.files import sha256_file

KEPT = 127  # the ``gone`` of an event no filter removed
_PART_BITS = 40  # pos = part << 40 | row: the input order across files
KILL_ENV = "XDREC_TEST_KILL_WORKER_ONCE"  # tests: a shard writer kills its own process once (_maybe_die)


def build(cfg: DataConfig, tmp: Path) -> dict:
    """Prepare ``cfg`` into ``tmp`` on Ray (``data.ray_address``, or a local Ray); returns the
    manifest's account of the data."""
    with _ray(cfg.ray_address):
        try:
            return _build(cfg, tmp)
        except Exception as e:  # a reader's or a check's error inside a Ray task: its own line
            cause = _data_error(e)
            if cause is None:
                raise
            raise DataFormatError(cause) from None


def col(name: str):
    """A Ray Data column expression (ray is imported only when the engine runs)."""
    from ray.data.expressions import col as ray_col

    return ray_col(name)


@contextlib.contextmanager
def _ray(address: str):
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        kw = {"address": address} if address else {"num_cpus": os.cpu_count()}
        ray.init(**kw, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors come back as exceptions
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # sort-based shuffles run as tasks in the pooled workers; the hash shuffle starts aggregator
    # actors (new processes) for every grouping, which dominates on small machines
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _data_error(e: BaseException) -> str | None:
    """The message of the DataFormatError a Ray task raised, if that is what ``e`` carries: Ray
    hands back the task's traceback as text (the exception object does not come back)."""
    if isinstance(e, DataFormatError):
        return str(e)
    found = re.search(r"DataFormatError: ([^\n]+)", str(e))
    return found.group(1) if found else None


def _build(cfg: DataConfig, tmp: Path) -> dict:
    n_dom = len(cfg.domains)
    plan = filter_plan(cfg.filter)
    events = _read(cfg, plan).materialize()
    n_read = events.count()
    if not n_read:
        raise DataFormatError(no_events(cfg.name, cfg.path or cfg.files))
    events, passes = _filter(cfg, events, plan)
    items = _items(events, n_dom)
    kept = events.filter(expr=col("gone") == KEPT).materialize()
    n_kept = kept.count()
    times = _cut_times(cfg, kept, n_kept) if n_kept else None
    users = _users(cfg, events, times).materialize()
    reports = _reports(plan, events, users, items, passes)
    if not n_kept:
        raise DataFormatError(nothing_kept(cfg.name, reports))
    item_ids, info = _number_items(items, n_dom, tmp)
    user_ids, user_report = _number_users(cfg, users, tmp, times, kept)
    counts, shards, most = _place_shards(cfg, _write(cfg, kept, item_ids, user_ids, times, tmp), tmp)
    dom_events = {int(r["domain"]): int(r["count()"]) for r in kept.groupby("domain").count().take_all()}
    return {"n_users": user_report.pop("n_users"), "n_events": n_kept,
            "read": {"events": n_read, "users": users.count(), "items": items.count()},
            "filtered": reports, **user_report,
            "domains": [{"name": name, "index": d, **info[d], "n_events": dom_events.get(d, 0),
                         "max_user_items": most[d]} for d, name in enumerate(cfg.domains)],
            "engine": "ray", "counts": counts, "shards": shards}


def _parts(cfg: DataConfig) -> list[tuple[str, int | None]]:
    """What one read task reads: a table file (and its domain, None: the domain column), or the
    whole ABXI folder or synthetic generator."""
    if cfg.format in ("synthetic", "abxi"):
        return [(cfg.format, None)]
    return [(str(path), dom) for path, dom in table_files(cfg)]


def _read(cfg: DataConfig, plan: list):
    """The events, one read task a part, with ``pos`` (the input order), ``gone`` (the rating
    filter already applied: it looks at one event at a time) and ``bucket`` (a stable hash of the
    user: the per-user work groups by it, every user whole in one bucket)."""
    import ray.data

    parts = _parts(cfg)
    rating = next((k for k, (kind, _) in enumerate(plan) if kind == "rating"), None)
    return ray.data.range(len(parts), override_num_blocks=len(parts)).map_batches(
        _read_parts, batch_size=1, batch_format="numpy",
        fn_kwargs={"cfg": cfg, "parts": parts, "rating": rating, "buckets": _n_buckets()})


def _read_parts(batch: dict, cfg: DataConfig, parts: list, rating: int | None, buckets: int) -> dict:
    cols = {"user": [], "item": [], "ts": [], "domain": [], "rating": []}
    pos = []
    for k in batch["id"].tolist():
        path, dom = parts[k]
        if path == "synthetic":
            evs = generate(cfg.synthetic, len(cfg.domains))
        elif path == "abxi":
            evs = read_abxi(cfg.path, len(cfg.domains))
        else:
            evs = read_table(path, AMAZON_COLUMNS if cfg.format == "amazon" else cfg.table, cfg.domains, dom)
        for row, ev in enumerate(evs):
            for col, value in zip(cols.values(), ev):
                col.append(value)
            pos.append(k << _PART_BITS | row)
    out = {"user": np.array(cols["user"], dtype=object), "item": np.array(cols["item"], dtype=object),
           "ts": np.array(cols["ts"], np.float64), "domain": np.array(cols["domain"], np.int64),
           "rating": np.array(cols["rating"], np.float64), "pos": np.array(pos, np.int64)}
    out["gone"] = np.full(len(pos), KEPT, np.int64)
    out["bucket"] = np.array([zlib.crc32(u.encode()) % buckets for u in cols["user"]], np.int64)
    if rating is not None:
        out["gone"][~(out["rating"] >= cfg.filter.min_rating)] = rating  # nan (no rating) fails the test
    return out


def _filter(cfg: DataConfig, events, plan: list):
    """``gone`` after every per-user filter of ``plan``; k-core iterates with the item counts of
    each pass joined in. Returns (events, k-core passes)."""
    steps = [(k, kind) for k, (kind, _) in enumerate(plan) if kind not in ("rating",)]
    core = next((k for k, kind in steps if kind == "k_core"), None)
    if core is None:
        return _per_user(cfg, events, steps), 0
    events = _per_user(cfg, events, [s for s in steps if s[0] < core])
    alive, passes = _alive(events), 0
    while True:
        passes += 1
        counts = events.filter(expr=col("gone") == KEPT).groupby("item").count().to_arrow_refs()
        events = _per_user(cfg, events, [(core, "k_core")], counts)
        now = _alive(events)
        if now == alive:
            break
        alive = now
    return _per_user(cfg, events, [s for s in steps if s[0] > core]), passes


def _alive(events) -> int:
    return events.filter(expr=col("gone") == KEPT).count()


def _per_user(cfg: DataConfig, events, steps: list, item_counts: list | None = None):
    if not steps:
        return events
    return _per_bucket(events, _user_filters, f=cfg.filter, steps=steps, item_counts=item_counts).materialize()


def _n_buckets() -> int:
    import ray

    return 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))


def _per_bucket(ds, fn, **kw):
    """``fn`` applied to every user's rows, a bucket of users a call (Ray's per-group call would
    cost more than the per-user work itself)."""
    return ds.groupby("bucket").map_groups(_by_user, batch_format="numpy", fn_kwargs={"fn": fn, "kw": kw})


def _by_user(b: dict, fn, kw: dict) -> dict:
    order = np.argsort(b["user"], kind="stable")
    users = b["user"][order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    outs = [fn({k: v[order[s:e]] for k, v in b.items()}, **kw) for s, e in zip(starts, np.r_[starts[1:], len(users)])]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


_TABLES: dict = {}  # per worker process: the broadcast tables it has read, by their refs


def _table(refs: list) -> dict:
    """A broadcast table (Arrow blocks in the object store: key column, value columns) as
    {key: row of values}, read once per worker process."""
    import ray

    key = tuple(r.hex() for r in refs)
    if key not in _TABLES:
        while len(_TABLES) >= 2:  # an operation reads at most two (items and users); older ones are done with
            del _TABLES[next(iter(_TABLES))]
        out = {}
        for block in ray.get(list(refs)):
            cols = [block.column(j).to_pylist() for j in range(block.num_columns)]
            out.update(zip(cols[0], zip(*cols[1:])))
        _TABLES[key] = out
    return _TABLES[key]


def _chronological(b: dict, tie_break: str) -> np.ndarray:
    """One user's events in time order, ties in input order (or item id order, then input order)."""
    if tie_break == "item":
        return np.array(sorted(range(len(b["ts"])), key=lambda i: (b["ts"][i], id_sort_key(b["item"][i]),
                                                                    b["pos"][i])), np.int64)
    return np.lexsort((b["pos"], b["ts"]))


def _user_filters(b: dict, f, steps: list, item_counts: list | None) -> dict:
    """One user's events with ``gone`` set by ``steps`` ((index in the plan, kind), in order)."""
    gone = b["gone"].copy()
    order = _chronological(b, f.tie_break)
    for k, kind in steps:
        alive = order[gone[order] == KEPT]  # the alive events, in time order
        if kind == "duplicates":
            seen, walk = set(), alive if f.duplicates == "first" else alive[::-1]
            for i in walk:
                if b["item"][i] in seen:
                    gone[i] = k
                seen.add(b["item"][i])
        elif kind == "last_n":
            gone[alive[:max(0, len(alive) - f.last_n)]] = k
        elif kind == "min_events":
            if len(alive) < f.min_events:
                gone[alive] = k
        else:  # k_core: one pass, the item counts of this pass in item_n
            per_dom = np.bincount(b["domain"][alive], minlength=int(b["domain"].max()) + 1)
            counts = _table(item_counts)
            item_n = np.array([counts[i][0] for i in b["item"][alive]], np.int64)
            gone[alive[(per_dom[b["domain"][alive]] < f.user_core) | (item_n < f.item_core)]] = k
            left = order[gone[order] == KEPT]
            if f.min_domains > 1 and len(np.unique(b["domain"][left])) < f.min_domains:
                gone[left] = k
    return {**b, "gone": gone}


def _items(events, n_dom: int):
    """Per item: its domain, first input position and the last filter it survived (``gone_max``);
    an item in two domains, or a domain out of range, is refused."""
    from ray.data.aggregate import Max, Min

    items = events.groupby("item").aggregate(
        Min("domain", alias_name="domain"), Max("domain", alias_name="domain_max"),
        Min("pos", alias_name="first_pos"), Max("gone", alias_name="gone_max")).materialize()
    bad = items.filter(expr=col("domain") != col("domain_max")).take(1)
    if bad:
        raise DataFormatError(f"item {bad[0]['item']!r} appears in domain {bad[0]['domain']} and domain "
                              f"{bad[0]['domain_max']}")
    top = items.max("domain_max")
    if top >= n_dom:
        raise DataFormatError(f"an event has domain {top}, but data.domains has {n_dom}")
    return items


def _cut_times(cfg: DataConfig, kept, n: int) -> tuple[float, float] | None:
    """The temporal split's two cut times (None: leave-one-out): ``data.split_times``, or the
    quantiles of the kept events' times as numpy's linear method gives them, read off the
    sorted times as they stream past."""
    if cfg.split == "leave_one_out":
        return None
    if cfg.split_times:
        return cut_times(np.zeros(0), cfg.split_quantiles, cfg.split_times)
    where = {}
    for q in cfg.split_quantiles:
        h = q * (n - 1)
        lo = int(np.floor(h))
        where[q] = (lo, min(lo + 1, n - 1), h - lo)
    need = {i for lo, hi, _ in where.values() for i in (lo, hi)}
    got, start = {}, 0
    for batch in kept.select_columns(["ts"]).sort("ts").iter_batches(batch_size=1 << 16, batch_format="numpy"):
        ts = batch["ts"]
        for i in need:
            if start <= i < start + len(ts):
                got[i] = ts[i - start]
        start += len(ts)
    valid, test = (float(np.quantile(np.array([got[lo], got[hi]]), g)) for lo, hi, g in where.values())
    return valid, test


def _id_key(raw: str) -> tuple[int, int, str, str]:
    """Sort columns giving :func:`id_sort_key`'s order (numeric ids by value, then the rest)."""
    if raw.isdigit() and raw.isascii():
        digits = raw.lstrip("0") or "0"
        return 0, len(digits), digits, ""
    return 1, 0, "", raw


_KEY = ["k_kind", "k_len", "k_digits", "k_raw", "first_pos"]  # ties: the first input position


def _with_key(b: dict, column: str) -> dict:
    keys = [_id_key(str(x)) for x in b[column]]
    out = dict(b)
    for j, name in enumerate(_KEY[:4]):
        out[name] = np.array([k[j] for k in keys], dtype=np.int64 if j < 2 else object)
    return out


def _users(cfg: DataConfig, events, times):
    """One row per read user: the last filter it survived, its sort key, its cut's facts."""
    target = cfg.domains.index(cfg.targets()[0])
    return _per_bucket(events, _user_row, cfg=cfg, times=times, target=target)


def _cut(cfg: DataConfig, ts: np.ndarray, times):
    return leave_one_out(len(ts)) if times is None else temporal(ts, *times)


def _user_row(b: dict, cfg: DataConfig, times, target: int) -> dict:
    order = _chronological(b, cfg.filter.tie_break)
    alive = order[b["gone"][order] == KEPT]
    row = {"user": b["user"][:1], "gone_max": np.array([b["gone"].max()]), "first_pos": np.array([b["pos"].min()])}
    flags = dict.fromkeys(("n_kept", "has_target", "n_target_train", "has_valid", "has_test", "no_train"), 0)
    if len(alive):
        cut = _cut(cfg, b["ts"][alive], times)
        doms = b["domain"][alive]
        flags.update(n_kept=len(alive), has_target=int((doms[1:cut.n_train] == target).any()),
                     n_target_train=int((doms[:cut.n_train] == target).sum()), has_valid=int(cut.valid is not None),
                     has_test=int(cut.test is not None), no_train=int(cut.n_train == 0))
    return _with_key({**row, **{k: np.array([v], np.int64) for k, v in flags.items()}}, "user")


def _reports(plan: list, events, users, items, passes: int) -> list[dict]:
    """One report per filter, counted from ``gone``: the events it removed, and the users and items
    whose last events it removed."""
    def by(ds, col):
        return {int(r[col]): int(r["count()"]) for r in ds.groupby(col).count().take_all()}

    ev, us, it = by(events, "gone"), by(users, "gone_max"), by(items, "gone_max")
    return [{"filter": name, "events_removed": ev.get(k, 0), "users_removed": us.get(k, 0),
             "items_removed": it.get(k, 0), **({"passes": passes} if kind == "k_core" else {})}
            for k, (kind, name) in enumerate(plan)]


class _MapWriter:
    """``{"raw id": id, ...}`` written as the ids stream past, as json.dumps writes a dict."""

    def __init__(self, path: Path):
        self._f, self._first = path.open("w"), True
        self._f.write("{")

    def add(self, raws, ids) -> None:
        text = ", ".join(f"{json.dumps(str(r))}: {int(i)}" for r, i in zip(raws, ids))
        if text:
            self._f.write(("" if self._first else ", ") + text)
            self._first = False

    def close(self) -> None:
        self._f.write("}")
        self._f.close()


def _number_items(items, n_dom: int, tmp: Path):
    """Kept items get ids domain by domain in raw-id order (offset_d + 1, ...): a Ray dataset of
    (item, iid), and per domain {offset, n_items}; item_map.json is written as they stream."""
    import pyarrow as pa
    import ray

    kept = items.filter(expr=col("gone_max") == KEPT).map_batches(_with_key, batch_format="numpy",
                                                                   fn_kwargs={"column": "item"})
    out, refs, n_items, next_id = _MapWriter(tmp / "item_map.json"), [], np.zeros(n_dom, np.int64), 1
    for b in kept.sort(["domain"] + _KEY).iter_batches(batch_size=1 << 16, batch_format="numpy"):
        ids = np.arange(next_id, next_id + len(b["item"]), dtype=np.int64)
        next_id += len(ids)
        np.add.at(n_items, b["domain"], 1)
        out.add(b["item"], ids)
        refs.append(ray.put(pa.table({"item": b["item"].astype(str), "iid": ids})))
    out.close()
    offsets = np.r_[0, np.cumsum(n_items)[:-1]]
    return refs, [{"offset": int(o), "n_items": int(n)} for o, n in zip(offsets, n_items)]


def _number_users(cfg: DataConfig, users, tmp: Path, times, kept):
    """Kept users get ids in raw-id order: a Ray dataset of (user, uid, drop: its target-domain
    training events leave, ``data.target_fraction``); user_map.json written as they stream; the
    split's and target_fraction's reports."""
    import pyarrow as pa
    import ray

    kept_users = users.filter(expr=col("n_kept") > 0)
    inv, keep_n = _fraction_draw(cfg, kept_users)
    out, refs, n, flagged = _MapWriter(tmp / "user_map.json"), [], 0, 0
    sums = dict.fromkeys(("has_valid", "has_test", "no_train", "users_dropped", "events_dropped"), 0)
    for b in kept_users.sort(_KEY).iter_batches(batch_size=1 << 16, batch_format="numpy"):
        uid = np.arange(n, n + len(b["user"]), dtype=np.int64)
        n += len(uid)
        rank = flagged + np.cumsum(b["has_target"]) - 1
        flagged += int(b["has_target"].sum())
        drop = (b["has_target"] > 0) & (inv[np.maximum(rank, 0)] >= keep_n) if inv is not None else np.zeros(len(uid), bool)
        for k in ("has_valid", "has_test", "no_train"):
            sums[k] += int(b[k].sum())
        sums["users_dropped"] += int(drop.sum())
        sums["events_dropped"] += int(b["n_target_train"][drop].sum())
        out.add(b["user"], uid)
        refs.append(ray.put(pa.table({"user": b["user"].astype(str), "uid": uid, "drop": drop})))  # a block of the broadcast table
    out.close()
    return refs, {"n_users": n, **_split_reports(cfg, times, n, sums, kept)}


def _fraction_draw(cfg: DataConfig, kept_users):
    """``data.target_fraction``'s draw, as the in-process engine makes it: the inverse of a seeded
    permutation of the users with a target-domain training target (in id order), and how many
    stay. None when nothing is dropped."""
    if cfg.target_fraction >= 1:
        return None, 0
    n = int(kept_users.sum("has_target") or 0)
    order = np.random.default_rng(cfg.target_fraction_seed).permutation(n)
    inv = np.empty(max(n, 1), np.int64)
    inv[order] = np.arange(n)
    return inv, round(cfg.target_fraction * n)


def _split_reports(cfg: DataConfig, times, n_users: int, sums: dict, kept) -> dict:
    if times is None:
        out = {"split": {"kind": "leave_one_out"}}
    else:
        after = kept.filter(expr=col("ts") >= times[0]).count()
        out = {"split": {"kind": "temporal", "valid_time": times[0], "test_time": times[1], "users": n_users,
                         "users_with_valid": sums["has_valid"], "users_with_test": sums["has_test"],
                         "users_without_training_events": sums["no_train"], "events_after_valid_cut": after}}
    if cfg.target_fraction < 1:
        out["target_fraction"] = {"domain": cfg.targets()[0], "fraction": cfg.target_fraction,
                                  "seed": cfg.target_fraction_seed, "users_dropped": sums["users_dropped"],
                                  "events_dropped": sums["events_dropped"]}
    return out


def _write(cfg: DataConfig, kept, item_ids: list, user_ids: list, times, tmp: Path):
    """Every kept user's samples (cut as the in-process engine cuts them), written by the workers
    into shards of their own under ``tmp/_parts``: one row per shard written. The id tables reach
    the workers as broadcast tables (users and items must fit a worker's memory, not events)."""
    target = cfg.domains.index(cfg.targets()[0])
    samples = _per_bucket(kept, _user_samples, cfg=cfg, times=times, target=target, item_ids=item_ids,
                          user_ids=user_ids)
    return samples.map_batches(_write_part, batch_size=None, batch_format="numpy", fn_kwargs={
        "cfg": cfg, "tmp": str(tmp), "kill": os.environ.get(KILL_ENV, "")}).take_all()


def _user_samples(b: dict, cfg: DataConfig, times, target: int, item_ids: list, user_ids: list) -> dict:
    order = _chronological(b, cfg.filter.tie_break)
    iid = _table(item_ids)
    seq, doms = [iid[i][0] for i in b["item"][order]], b["domain"][order].tolist()
    dom_of = dict(zip(seq, doms))
    cut = _cut(cfg, b["ts"][order], times)
    uid, drop = _table(user_ids)[b["user"][0]]
    rows = {"domain": [], "split": [], "uid": [], "data": [], "h": [], "n_own": []}
    for d, split, sample in user_samples(uid, seq, doms, cut, target if drop else None):
        own = 0 if split == "train" else sum(dom_of[i] == d for i in sample["exclude"])
        for col, value in zip(rows.values(), (d, split, uid, sample_bytes(sample),
                                              hashlib.sha256(canonical(sample)).digest(), own)):
            col.append(value)
    return {"domain": np.array(rows["domain"], np.int64), "split": np.array(rows["split"], dtype=object),
            "uid": np.array(rows["uid"], np.int64), "data": np.array(rows["data"], dtype=object),
            "h": np.array(rows["h"], dtype=object), "n_own": np.array(rows["n_own"], np.int64)}


def _write_part(b: dict, cfg: DataConfig, tmp: str, kill: str) -> dict:
    """A block's samples into shards under ``tmp/_parts/<unique>/<domain>/``, users in id order;
    per shard: where, how many samples, its first user, sha256, the digest part, the most items
    of its domain one evaluated user holds."""
    folder = Path(tmp) / "_parts" / uuid.uuid4().hex
    rows = {k: [] for k in ("domain", "split", "path", "samples", "bytes", "sha256", "first_uid", "total", "most")}
    for d, split in sorted({(int(d), str(s)) for d, s in zip(b["domain"], b["split"])}):
        idx = np.flatnonzero((b["domain"] == d) & (b["split"] == split))
        idx = idx[np.argsort(b["uid"][idx], kind="stable")]
        w = ShardWriter(folder / cfg.domains[d], split, cfg.shard_samples, cfg.shard_bytes)
        for i in idx:
            w.write_bytes(int(b["uid"][i]), b["data"][i])
            _maybe_die(kill, len(w.shards))
        start = 0
        for sh in w.finish():
            mine = idx[start:start + sh["samples"]]
            total = sum(int.from_bytes(bytes(b["h"][i]), "big") for i in mine) % (1 << 256)
            for col, value in zip(rows.values(), (d, split, str(sh["path"].relative_to(tmp)), sh["samples"],
                                                  sh["bytes"], sha256_file(sh["path"]), int(b["uid"][mine[0]]),
                                                  f"{total:064x}", int(b["n_own"][mine].max()))):
                col.append(value)
            start += sh["samples"]
    return {k: np.array(v, dtype=object if k in ("split", "path", "sha256", "total") else np.int64)
            for k, v in rows.items()}


def _maybe_die(marker: str, closed: int) -> None:
    """Fault injection for the tests (``XDREC_TEST_KILL_WORKER_ONCE`` in the driver's environment:
    a marker file's path): once a shard is closed, the first writer to get here kills its own
    process, mid-prepare, with a shard on disk; the marker says it happened."""
    if marker and closed and not os.path.exists(marker):
        with contextlib.suppress(FileExistsError):
            with open(marker, "x"):
                pass
            os.kill(os.getpid(), signal.SIGKILL)


def _place_shards(cfg: DataConfig, written: list[dict], tmp: Path):
    """The finished tasks' shards moved to ``<domain>/<split>-NNNNNN.tar`` (by first user), the
    per-split digests merged, an empty shard where a split has none; ``_parts`` (and whatever a
    killed worker left there) removed. Returns (counts, shards, most per domain)."""
    counts, shards, most = {}, {}, [0] * len(cfg.domains)
    for d, name in enumerate(cfg.domains):
        counts[name], shards[name] = {}, {}
        for split in SPLITS:
            mine = sorted((r for r in written if r["domain"] == d and r["split"] == split), key=lambda r: r["first_uid"])
            digest, listing = SamplesDigest(), []
            for k, r in enumerate(mine):
                dest = tmp / name / f"{split}-{k:06d}.tar"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / r["path"], dest)
                listing.append({"path": f"{name}/{dest.name}", "samples": int(r["samples"]), "bytes": int(r["bytes"]),
                                "sha256": r["sha256"]})
                digest = digest.merge(SamplesDigest(int(r["samples"]), int(r["total"], 16)))
                most[d] = max(most[d], int(r["most"]) if split != "train" else 0)
            if not listing:
                sh = ShardWriter(tmp / name, split, cfg.shard_samples, cfg.shard_bytes).finish()[0]
                listing.append({"path": f"{name}/{sh['path'].name}", "samples": 0, "bytes": sh["bytes"],
                                "sha256": sha256_file(sh["path"])})
            counts[name][split] = {"samples": digest.count, "samples_sha256": digest.hexdigest()}
            shards[name][split] = listing
    shutil.rmtree(tmp / "_parts", ignore_errors=True)
    return counts, shards, most
