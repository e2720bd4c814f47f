"""``xdrec prepare``: raw interactions -> id maps, chronological sequences, leave-one-out splits,
WebDataset tar shards per domain and split, and ``manifest.json``.

Layout of ``<data.out_dir>/<data.name>/``::

    manifest.json                  counts, vocab per domain, sha256 per shard, schema version
    item_map.json, user_map.json   raw id -> xdrec id
    <domain>/train-000000.tar ...  one sample per user with >= 1 training target in <domain>
    <domain>/valid-000000.tar ...  users whose validation target (second last event) is in <domain>
    <domain>/test-000000.tar ...   users whose test target (last event) is in <domain>

Item ids are global: domain k owns ids ``offset_k + 1 .. offset_k + n_items_k``; 0 is padding.
Every sample is one JSON object ``{"user", "items", ...}``; valid/test samples add ``target``
(the held-out item) and ``exclude`` (every item of the user's full sequence, for the ABXI
negative sampling).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds

from train.config import DataConfig, config_fingerprint, to_dict
from train.data.formats import DataFormatError, Event, read_abxi, read_table
from train.data.stream import DomainIndex
from train.data.synthetic import generate

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_files(cfg: DataConfig) -> list[Path]:
    if cfg.format == "synthetic":
        return []
    p = Path(cfg.path)
    if cfg.format == "abxi":
        return sorted(list(p.glob("*_preprocessed.txt")) + list(p.glob("map_item_*.txt"))) if p.is_dir() else []
    return [p] if p.is_file() else []


def read_events(cfg: DataConfig) -> Iterable[Event]:
    if cfg.format == "synthetic":
        return generate(cfg.synthetic, len(cfg.domains))
    if cfg.format == "abxi":
        return read_abxi(cfg.path, len(cfg.domains))
    return read_table(cfg.path, cfg.table, cfg.domains)


def _sort_key(raw: str):
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def build_sequences(events: Iterable[Event], n_domains: int):
    """Group events by user, map ids, sort each user's events by time (ties: input order).

    Returns ``(sequences, item_map, user_map, domains_info)``; ``sequences[u]`` is the list of
    global item ids of user ``u`` in time order.
    """
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    item_domain: dict[str, int] = {}
    for n, ev in enumerate(events):
        prev = item_domain.setdefault(ev.item, ev.domain)
        if prev != ev.domain:
            raise DataFormatError(f"item {ev.item!r} appears in domain {prev} and domain {ev.domain}")
        per_user[ev.user].append((ev.ts, n, ev.item))
    item_map: dict[str, int] = {}
    info = []
    offset = 0
    for d in range(n_domains):
        items = sorted((i for i, dd in item_domain.items() if dd == d), key=_sort_key)
        for k, raw in enumerate(items):
            item_map[raw] = offset + k + 1
        info.append({"offset": offset, "n_items": len(items)})
        offset += len(items)
    user_map = {u: k for k, u in enumerate(per_user)}
    sequences = [[item_map[i] for _, _, i in sorted(evs)] for evs in per_user.values()]
    return sequences, item_map, user_map, info


def split_samples(sequences: list[list[int]], dom: DomainIndex):
    """Leave-one-out samples per (domain, split); users with < 3 events are filtered and counted."""
    out = {(d, s): [] for d in range(len(dom.names)) for s in SPLITS}
    filtered = 0
    for user, seq in enumerate(sequences):
        if len(seq) < 3:
            filtered += 1
            continue
        doms = dom.of(np.asarray(seq)).tolist()
        train = seq[:-2]
        exclude = sorted(set(seq))
        for d in set(doms[1:-2]):  # train targets are train[1:]
            out[(d, "train")].append({"user": user, "items": train})
        out[(doms[-2], "valid")].append({"user": user, "items": seq[:-2], "target": seq[-2], "exclude": exclude})
        out[(doms[-1], "test")].append({"user": user, "items": seq[:-1], "target": seq[-1], "exclude": exclude})
    return out, filtered


def _write_shards(samples: list[dict], folder: Path, split: str, per_shard: int) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, max(len(samples), 1), per_shard):
        chunk = samples[k:k + per_shard]
        path = folder / f"{split}-{k // per_shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0.0) as w:  # fixed mtime: same input, same sha256
            for s in chunk:
                w.write({"__key__": f"u{s['user']:08d}", "json": s})
        shards.append({"path": str(path), "samples": len(chunk)})
    return shards


def prepare(cfg: DataConfig, log=print) -> Path:
    """Prepare ``cfg`` into ``cfg.prepared_dir()``; returns the manifest path."""
    out = cfg.prepared_dir()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sequences, item_map, user_map, info = build_sequences(read_events(cfg), len(cfg.domains))
    n_events = sum(len(s) for s in sequences)
    if not sequences:
        raise DataFormatError(f"data '{cfg.name}': no events read from {cfg.path or 'synthetic'}")
    dom = DomainIndex({"domains": [{"name": n, **i} for n, i in zip(cfg.domains, info)]})
    samples, filtered = split_samples(sequences, dom)
    counts: dict = {}
    shards: dict = {}
    for d, name in enumerate(cfg.domains):
        counts[name], shards[name] = {}, {}
        for split in SPLITS:
            ss = samples[(d, split)]
            written = _write_shards(ss, tmp / name, split, cfg.shard_samples)
            for sh in written:
                p = Path(sh["path"])
                sh["path"] = str(p.relative_to(tmp))
                sh["sha256"] = sha256_file(p)
            shards[name][split] = written
            counts[name][split] = {"samples": len(ss)}
    dom_events = np.bincount(dom.of(np.fromiter((i for seq in sequences for i in seq), dtype=np.int64)),
                             minlength=len(info)).tolist()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "format": cfg.format,
        "fingerprint": data_fingerprint(cfg),
        "data_config": to_dict(cfg),
        "n_users": len(sequences),
        "n_events": n_events,
        "filtered": {"users_with_fewer_than_3_events": filtered},
        "domains": [{"name": name, "index": d, **info[d], "n_events": dom_events[d]}
                    for d, name in enumerate(cfg.domains)],
        "counts": counts,
        "shards": shards,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "item_map.json").write_text(json.dumps(item_map))
    (tmp / "user_map.json").write_text(json.dumps(user_map))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"prepared {cfg.name}: {len(sequences)} users, {n_events} events, "
        + ", ".join(f"{x['name']}: {x['n_items']} items" for x in manifest["domains"])
        + f"; filtered {filtered} users with < 3 events -> {out}")
    return out / "manifest.json"


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data config and the input files' contents: a changed input re-prepares."""
    h = hashlib.sha256(config_fingerprint(cfg).encode())
    for p in _input_files(cfg):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


class ManifestError(ValueError):
    """A prepared folder is missing, stale or does not match its manifest."""


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read ``manifest.json`` and (by default) check every shard's presence and sha256."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: no manifest; run `xdrec prepare` first")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{mpath}: not valid JSON: {e}") from None
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{mpath}: schema_version {m.get('schema_version')!r}, this xdrec reads {SCHEMA_VERSION}")
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


def ensure_prepared(cfg: DataConfig, log=print) -> dict:
    """Return the verified manifest of ``cfg``, preparing (again) if absent or stale."""
    folder = cfg.prepared_dir()
    mpath = folder / "manifest.json"
    if mpath.is_file():
        m = json.loads(mpath.read_text())
        if m.get("fingerprint") == data_fingerprint(cfg) and m.get("schema_version") == SCHEMA_VERSION:
            return load_manifest(folder)
        log(f"{mpath}: data config or input changed since it was prepared; preparing again")
    prepare(cfg, log=log)
    return load_manifest(folder)
