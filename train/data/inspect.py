"""``xdrec data verify <dir>`` and ``xdrec data stats <dir>`` over a prepared folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data.prepare import ManifestError, load_manifest
from train.data.stream import vocabulary, sample_stream, shard_urls


def _samples(manifest: dict, folder: Path, domain: str, split: str):
    for s in sample_stream(shard_urls(manifest, folder, domain, split), shuffle=False, seed=0, epoch=0,
                              buffer=0):
        yield s


def verify(folder: str | Path) -> dict:
    """Re-hash every shard and re-count its samples against ``manifest.json``; raises ManifestError
    naming the first shard that differs. Returns ``{domain: {split: samples}}``."""
    folder = Path(folder)
    m = load_manifest(folder, verify=True)  # presence and sha256 of every shard
    counts: dict = {}
    for dom, splits in m["shards"].items():
        for split, shards in splits.items():
            for sh in shards:
                n = sum(1 for _ in sample_stream([str(folder / sh["path"])], shuffle=False, seed=0, epoch=0,
                                                 buffer=0))
                if n != sh["samples"]:
                    raise ManifestError(f"{folder / sh['path']}: {n} samples, manifest.json says {sh['samples']}")
            total = sum(sh["samples"] for sh in shards)
            if total != m["counts"][dom][split]["samples"]:
                raise ManifestError(f"{folder / 'manifest.json'}: {dom}/{split} shards hold {total} samples, "
                                    f"counts say {m['counts'][dom][split]['samples']}")
            counts.setdefault(dom, {})[split] = total
    return counts


def empty_splits(counts: dict) -> list[str]:
    """``domain/split`` of every split holding no samples: a stage selecting or reporting on it cannot run."""
    return [f"{dom}/{split}" for dom, splits in counts.items() for split, n in splits.items() if not n]


def stats(folder: str | Path) -> dict:
    """Users, items and events per domain, cross-domain overlap, sequence-length percentiles."""
    folder = Path(folder)
    m = load_manifest(folder, verify=False)
    dom = vocabulary(m)
    # The test sample of a user holds the whole sequence but its last event, plus that target.
    seqs = {}
    for d in dom.names:
        for s in _samples(m, folder, d, "test"):
            seqs[s["user"]] = np.asarray(s["items"] + [s["target"]])
    per_dom_users = [set() for _ in dom.names]
    per_dom_items = [set() for _ in dom.names]
    per_dom_events = [0 for _ in dom.names]
    lengths = []
    for u, seq in seqs.items():
        lengths.append(len(seq))
        ds = dom.of_ids(seq)
        for d in range(len(dom.names)):
            sel = seq[ds == d]
            if len(sel):
                per_dom_users[d].add(u)
                per_dom_items[d].update(sel.tolist())
                per_dom_events[d] += len(sel)
    pct = np.percentile(lengths, [5, 25, 50, 75, 95]) if lengths else []
    return {
        "users": len(seqs),
        "domains": {n: {"users": len(per_dom_users[d]), "items_seen": len(per_dom_items[d]),
                        "vocab": int(dom.sizes[d]), "events": per_dom_events[d]} for d, n in enumerate(dom.names)},
        "users_in_all_domains": len(set.intersection(*per_dom_users)) if per_dom_users else 0,
        "sequence_length_percentiles": dict(zip(["p5", "p25", "p50", "p75", "p95"], [float(x) for x in pct])),
        "filtered": m.get("filtered", {}),
    }
