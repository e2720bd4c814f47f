"""``xdrec data verify <dir>`` and ``xdrec data stats <dir>`` over a prepared folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data.digest import SamplesDigest
from train.data.prepare import ManifestError, load_manifest
from train.data.stream import vocabulary, sample_stream, shard_urls


def _samples(manifest: dict, folder: Path, domain: str, split: str):
    for s in sample_stream(shard_urls(manifest, folder, domain, split), shuffle=False, seed=0, epoch=0,
                              buffer=0):
        yield s


def verify(folder: str | Path) -> dict:
    """Re-hash every shard, re-count its samples and recompute each split's samples digest against
    ``manifest.json``; raises ManifestError naming the first shard or split that differs.
    Returns ``{domain: {split: samples}}``."""
    folder = Path(folder)
    m = load_manifest(folder, verify=True)  # presence and sha256 of every shard
    counts: dict = {}
    for dom, splits in m["shards"].items():
        for split, shards in splits.items():
            digest = SamplesDigest()
            for sh in shards:
                part = SamplesDigest()
                for s in sample_stream([str(folder / sh["path"])], shuffle=False, seed=0, epoch=0, buffer=0):
                    part.add(s)
                if part.count != sh["samples"]:
                    raise ManifestError(f"{folder / sh['path']}: {part.count} samples, manifest.json says {sh['samples']}")
                digest = digest.merge(part)
            _check_split(m["counts"][dom][split], digest, folder / "manifest.json", f"{dom}/{split}")
            counts.setdefault(dom, {})[split] = digest.count
    return counts


def _check_split(recorded: dict, digest: SamplesDigest, mpath: Path, where: str) -> None:
    if digest.count != recorded["samples"]:
        raise ManifestError(f"{mpath}: {where} shards hold {digest.count} samples, counts say {recorded['samples']}")
    want = recorded.get("samples_sha256")  # absent in folders prepared before it was recorded
    if want is not None and digest.hexdigest() != want:
        raise ManifestError(f"{mpath}: {where} samples digest {digest.hexdigest()[:16]}... differs from its "
                            f"samples_sha256 {str(want)[:16]}...: the shards hold other samples than were prepared")


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
