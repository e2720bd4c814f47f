"""``xdrec prepare``: raw interactions -> filters, id maps, chronological sequences, the split
(leave-one-out or temporal: train/data/split.py), WebDataset tar shards per domain and split,
and ``manifest.json``.

Layout of ``<data.out_dir>/<data.name>/``::

    manifest.json                  counts and samples_sha256 (train.data.digest) per domain and
                                   split, vocab per domain, sha256 per shard, filter report, the
                                   data config, the engine, schema version
    item_map.json, user_map.json   raw id -> xdrec id
    <domain>/train-000000.tar ...  one sample per user with >= 1 training target in <domain>
    <domain>/valid-000000.tar ...  users whose validation target (leave-one-out: the second last event) is in <domain>
    <domain>/test-000000.tar ...   users whose test target (leave-one-out: the last event) is in <domain>

Item ids are global: domain k owns ids ``offset_k + 1 .. offset_k + n_items_k``; 0 is padding.
Every sample is one JSON object ``{"user", "items", ...}``; valid/test samples add ``target``
(the held-out item) and ``exclude`` (every item of the user's full sequence, for the ABXI
negative sampling). A shard closes at ``data.shard_samples`` samples or ``data.shard_bytes``
bytes, whichever comes first. Events are held as arrays (``train.data.events``) and samples are
written user by user, so memory grows with events at array cost.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from model.config import Vocabulary
from train.config import DataConfig, to_dict
from train.data.digest import SamplesDigest
from train.data.split import Cut, cut_times, leave_one_out, temporal, user_samples
from train.data.events import apply_filters, chronological, collect, id_sort_key, no_events, nothing_kept, summary
from train.data.formats import DataFormatError, Event, read_abxi, read_files, table_files
from train.data.stream import bad_shard_path, vocabulary
from train.data.shards import SPLITS, ShardWriter
from train.data.synthetic import generate
from train.files import sha256_file
from train.redact import redact, redact_tree
from train.runlock import DataLock

SCHEMA_VERSION = 2
# no effect on the prepared samples (the engine: same samples, its own shard boundaries)
_READ_ONLY_KEYS = ("remote", "on_error", "source", "target", "engine", "ray_address")


def _input_files(cfg: DataConfig) -> list[Path]:
    if cfg.format == "synthetic":
        return []
    if cfg.format == "abxi":
        p = Path(cfg.path)
        return sorted(list(p.glob("*_preprocessed.txt")) + list(p.glob("map_item_*.txt"))) if p.is_dir() else []
    try:
        return [f for f, _ in table_files(cfg)]
    except DataFormatError:
        return []  # reported when the files are read


def read_events(cfg: DataConfig) -> Iterable[Event]:
    if cfg.format == "synthetic":
        return generate(cfg.synthetic, len(cfg.domains))
    if cfg.format == "abxi":
        return read_abxi(cfg.path, len(cfg.domains))
    return read_files(cfg)


def _item_ids(table, keep: np.ndarray, n_dom: int) -> tuple[np.ndarray, dict, list[dict]]:
    """Per domain, the surviving items in raw-id order get ids offset + 1, offset + 2, ...:
    (xdrec id of each raw item code, raw id -> xdrec id, [{offset, n_items}] per domain)."""
    kept_items = np.zeros(len(table.items), bool)
    kept_items[table.item[keep]] = True
    item_id = np.zeros(len(table.items), np.int64)
    item_map: dict[str, int] = {}
    info, offset = [], 0
    for d in range(n_dom):
        codes = sorted(np.flatnonzero(kept_items & (table.item_domain == d)).tolist(),
                       key=lambda c: id_sort_key(table.items[c]))
        for k, c in enumerate(codes):
            item_id[c] = offset + k + 1
            item_map[table.items[c]] = offset + k + 1
        info.append({"offset": offset, "n_items": len(codes)})
        offset += len(codes)
    return item_id, item_map, info


def _cuts(cfg: DataConfig, times: np.ndarray, bounds: np.ndarray) -> tuple[list[Cut], dict]:
    """Every user's cut (``data.split``) and the split's report for the manifest."""
    n_users = len(bounds) - 1
    if cfg.split == "leave_one_out":
        return [leave_one_out(int(bounds[k + 1] - bounds[k])) for k in range(n_users)], {"kind": "leave_one_out"}
    valid_at, test_at = cut_times(times, cfg.split_quantiles, cfg.split_times)
    cuts = [temporal(times[bounds[k]:bounds[k + 1]], valid_at, test_at) for k in range(n_users)]
    report = {"kind": "temporal", "valid_time": valid_at, "test_time": test_at, "users": n_users,
              "users_with_valid": sum(c.valid is not None for c in cuts),
              "users_with_test": sum(c.test is not None for c in cuts),
              "users_without_training_events": sum(c.n_train == 0 for c in cuts),
              "events_after_valid_cut": int((times >= valid_at).sum())}
    return cuts, report


def _write_users(cfg: DataConfig, table, keep, item_id, dom: Vocabulary, tmp: Path) -> tuple[dict, dict, dict, list, dict]:
    """Every kept user's samples (cut by ``data.split``) into shards, users in raw-id order
    (chronological()): (raw user id -> xdrec id, per domain and split the samples' count and
    samples_sha256, the shards' listing, per domain the most of its items one user evaluated
    there holds: what the sampled protocol cannot draw for them, the split and
    ``data.target_fraction`` reports)."""
    order = chronological(table, cfg.filter.tie_break)
    order = order[keep[order]]
    users_sorted, items_sorted = table.user[order], item_id[table.item[order]]
    bounds = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1], True])
    cuts, split_report = _cuts(cfg, table.ts[order], bounds)
    writers = {(d, s): ShardWriter(tmp / name, s, cfg.shard_samples, cfg.shard_bytes)
               for d, name in enumerate(cfg.domains) for s in SPLITS}
    user_map: dict[str, int] = {}
    digests = {key: SamplesDigest() for key in writers}
    most = [0] * len(cfg.domains)
    dropped = _dropped_users(cfg, items_sorted, bounds, cuts, dom)
    target = cfg.domains.index(cfg.targets()[0])
    for k in range(len(bounds) - 1):
        seq = items_sorted[bounds[k]:bounds[k + 1]]
        user = len(user_map)
        user_map[table.users[users_sorted[bounds[k]]]] = user
        drop = target if user in dropped else None
        for d, split, sample in user_samples(user, seq.tolist(), dom.of_ids(seq).tolist(), cuts[k], drop):
            writers[(d, split)].write(sample)
            digests[(d, split)].add(sample)
            if split != "train":
                most[d] = max(most[d], int((dom.of_ids(np.asarray(sample["exclude"])) == d).sum()))
    shards: dict = {name: {} for name in cfg.domains}
    for (d, split), w in writers.items():
        shards[cfg.domains[d]][split] = [{"path": str(sh["path"].relative_to(tmp)), "samples": sh["samples"],
                                          "bytes": sh["bytes"], "sha256": sha256_file(sh["path"])} for sh in w.finish()]
    shrunk = {} if cfg.target_fraction >= 1 else {
        "domain": cfg.targets()[0], "fraction": cfg.target_fraction, "seed": cfg.target_fraction_seed,
        "users_dropped": len(dropped), "events_dropped": int(sum(
            (dom.of_ids(items_sorted[bounds[k]:bounds[k] + cuts[k].n_train]) == target).sum() for k in dropped))}
    counts = {name: {s: {"samples": digests[(d, s)].count, "samples_sha256": digests[(d, s)].hexdigest()}
                     for s in SPLITS} for d, name in enumerate(cfg.domains)}
    return user_map, counts, shards, most, {"split": split_report, **({"target_fraction": shrunk} if shrunk else {})}


def _dropped_users(cfg: DataConfig, items_sorted: np.ndarray, bounds: np.ndarray, cuts: list[Cut],
                   dom: Vocabulary) -> set[int]:
    """The users (xdrec ids) whose target-domain training events ``data.target_fraction`` leaves
    out: of the users with a target-domain training target, all but round(fraction x their number),
    chosen by a permutation seeded with ``data.target_fraction_seed``."""
    if cfg.target_fraction >= 1:
        return set()
    target = cfg.domains.index(cfg.targets()[0])
    with_target = [k for k in range(len(bounds) - 1)
                   if (dom.of_ids(items_sorted[bounds[k] + 1:bounds[k] + cuts[k].n_train]) == target).any()]
    keep = round(cfg.target_fraction * len(with_target))
    order = np.random.default_rng(cfg.target_fraction_seed).permutation(len(with_target))
    return {with_target[i] for i in order[keep:]}


def prepare(cfg: DataConfig, log=print, lock: DataLock | None = None) -> Path:
    """Prepare ``cfg`` into ``cfg.prepared_dir()`` (written beside it, then renamed); returns the
    manifest path. Holds the folder's :class:`DataLock` exclusively meanwhile (``lock``: the
    caller's, held shared so far; else one of its own). A folder in the way that xdrec did not
    make (no manifest.json in it), or a link, is refused, never deleted."""
    own = lock is None
    lock = (lock or DataLock(cfg.prepared_dir(), log=log)).exclusive()
    try:
        return _prepare(cfg, log)
    finally:
        if own:
            lock.release()


_TMP_MARK = ".xdrec-prepare"  # in the folder prepare writes to, before anything else


def _claim_folders(out: Path) -> Path:
    """The temporary folder prepare writes to (emptied if an earlier prepare left it), once
    ``out`` and it are known to be xdrec's own or absent; ManifestError naming one that is not."""
    tmp = out.with_name(out.name + ".tmp")
    for folder, mark in ((out, "manifest.json"), (tmp, _TMP_MARK)):
        if folder.is_symlink() or (folder.exists() and not (folder / mark).is_file()):
            raise ManifestError(f"{folder} exists and is not a folder xdrec prepared (no {mark} in it"
                                f"{'; it is a link' if folder.is_symlink() else ''}); xdrec deletes only what it "
                                "made: move it away or choose another data.name / data.out_dir")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / _TMP_MARK).write_text("written by xdrec prepare; removed when it finishes\n")
    return tmp


def _build_local(cfg: DataConfig, tmp: Path) -> dict:
    """The in-process engine: every event in this process's arrays; shards and the id maps into
    ``tmp``; returns the manifest's account of the data (the keys :func:`_prepare` adds aside)."""
    n_dom = len(cfg.domains)
    table = collect(read_events(cfg), n_dom)
    if not len(table):
        raise DataFormatError(no_events(cfg.name, cfg.path or cfg.files))
    keep, reports = apply_filters(table, cfg.filter, n_dom)
    if not keep.any():
        raise DataFormatError(nothing_kept(cfg.name, reports))
    item_id, item_map, info = _item_ids(table, keep, n_dom)
    dom = vocabulary({"domains": [{"name": n, **i} for n, i in zip(cfg.domains, info)]})
    user_map, counts, shards, most, split_reports = _write_users(cfg, table, keep, item_id, dom, tmp)
    dom_events = np.bincount(table.domain[keep], minlength=n_dom).tolist()
    for name, obj in (("item_map.json", item_map), ("user_map.json", user_map)):
        (tmp / name).write_text(json.dumps(obj))
    return {"n_users": len(user_map), "n_events": int(keep.sum()),
            "read": {"events": len(table), "users": len(table.users), "items": len(table.items)},
            "filtered": reports, **split_reports,
            "domains": [{"name": name, "index": d, **info[d], "n_events": dom_events[d], "max_user_items": most[d]}
                        for d, name in enumerate(cfg.domains)],
            "engine": "local", "counts": counts, "shards": shards}


def _prepare(cfg: DataConfig, log) -> Path:
    out = cfg.prepared_dir()
    tmp = _claim_folders(out)
    if cfg.engine == "ray":
        from train.data.ray_prepare import build  # imports ray: only when asked for
        built = build(cfg, tmp)
    else:
        built = _build_local(cfg, tmp)
    manifest = {"schema_version": SCHEMA_VERSION, "name": cfg.name, "format": cfg.format,
                "fingerprint": data_fingerprint(cfg), "data_config": redact_tree(to_dict(cfg)), **built}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (tmp / _TMP_MARK).unlink()
    if out.exists():
        shutil.rmtree(out)  # an earlier prepare's (checked by _claim_folders)
    tmp.rename(out)
    split_reports = {k: manifest[k] for k in ("split", "target_fraction") if k in manifest}
    log(f"prepared {cfg.name} ({manifest['engine']} engine): read {manifest['read']['events']} events of "
        f"{manifest['read']['users']} users; kept {manifest['n_events']} events of {manifest['n_users']} users, "
        + ", ".join(f"{x['name']}: {x['n_items']} items" for x in manifest["domains"])
        + f"; filters: {summary(manifest['filtered'])}" + _split_note(split_reports) + f" -> {out}")
    return out / "manifest.json"


def _split_note(reports: dict) -> str:
    """The prepare line's account of the temporal split and of ``data.target_fraction``."""
    note = ""
    sp = reports["split"]
    if sp["kind"] == "temporal":
        note += (f"; temporal split at {sp['valid_time']:g} / {sp['test_time']:g}: {sp['users_with_valid']} of "
                 f"{sp['users']} users have a valid target, {sp['users_with_test']} a test target, "
                 f"{sp['users_without_training_events']} no training event")
    shrunk = reports.get("target_fraction")
    if shrunk:
        note += (f"; data.target_fraction={shrunk['fraction']:g}: {shrunk['users_dropped']} users' "
                 f"{shrunk['events_dropped']} {shrunk['domain']} training events left out")
    return note


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data config and the input files' contents: a changed input re-prepares.
    Keys that do not change the shards (``remote``, ``on_error``, which domain is the source) are
    left out: both transfer directions of a pair share one prepared folder."""
    keys = {k: v for k, v in to_dict(cfg).items() if k not in _READ_ONLY_KEYS}
    if cfg.target_fraction < 1:  # which domain shrinks shapes the shards then
        keys["target"] = cfg.targets()[0]
    h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
    for p in _input_files(cfg):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


class ManifestError(ValueError):
    """A prepared folder is missing, stale or does not match its manifest."""


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read ``manifest.json``, check its layout (every shard path one xdrec writes: a manifest is
    data from whoever made the folder) and (by default) every shard's presence and sha256."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: no manifest; run `xdrec prepare` first")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
        got = m.get("schema_version") if isinstance(m, dict) else type(m).__name__
        raise ManifestError(f"{mpath}: schema_version {got!r}, this xdrec reads {SCHEMA_VERSION}")
    _check_layout(m, mpath)
    if verify:
        for dom, splits in m["shards"].items():
            for split, shards in splits.items():
                for sh in shards:
                    p = folder / sh["path"]
                    if not p.is_file():
                        raise ManifestError(f"{mpath}: shard {p} ({dom}/{split}) is missing")
                    if sha256_file(p) != sh["sha256"]:
                        raise ManifestError(f"{mpath}: shard {p} ({dom}/{split}) does not match its sha256")
    return m


def _check_layout(m: dict, mpath: Path) -> None:
    """The keys every reader of a manifest relies on, and shard paths only of xdrec's own form."""
    try:
        names = [d["name"] for d in m["domains"]]
        for d in m["domains"]:
            int(d["n_items"]), int(d["offset"])
        for name in names:
            for split in SPLITS:
                int(m["counts"][name][split]["samples"])
                for sh in m["shards"][name][split]:
                    why = bad_shard_path(sh["path"], name, split)
                    if why:
                        raise ManifestError(f"{mpath}: {why}; refused (xdrec writes <domain>/<split>-NNNNNN.tar)")
                    int(sh["samples"]), str(sh["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{mpath}: not an xdrec manifest (missing or malformed {e})") from None


def ensure_prepared(cfg: DataConfig, log=print) -> tuple[dict, DataLock]:
    """The verified manifest of ``cfg``, preparing (again) if absent or stale, and the folder's
    :class:`DataLock`, held shared: the caller releases it when it no longer reads the folder.

    With ``data.remote`` the shards are streamed from elsewhere: the manifest must be here (it
    is small; copy it beside the config); its layout is checked (shard paths of xdrec's own form
    only), the stream names any bad shard."""
    folder = cfg.prepared_dir()
    mpath = folder / "manifest.json"
    lock = DataLock(folder, log=log).shared()
    try:
        if cfg.remote:
            if not mpath.is_file():
                raise ManifestError(f"{mpath}: data.remote={redact(cfg.remote)!r} streams the shards, but their "
                                    "manifest.json must be local; copy it there")
            return load_manifest(folder, verify=False), lock
        if mpath.is_file():
            try:
                current = load_manifest(folder, verify=False).get("fingerprint") == data_fingerprint(cfg)
                why = "data config or input changed since it was prepared"
            except ManifestError as e:
                current, why = False, str(e).removeprefix(f"{mpath}: ")
            if current:
                return load_manifest(folder), lock
            log(f"{mpath}: {why}; preparing again")
        prepare(cfg, log=log, lock=lock)
        lock.shared()
        return load_manifest(folder), lock
    except BaseException:
        lock.release()
        raise
