"""The samples digest: one hash of a (domain, split)'s decoded samples that depends neither on the
order they were written in nor on how they were cut into shards, so two preparations (another
engine, another shard size, another machine count) can be compared sample for sample.

It is a multiset hash: each sample's canonical JSON (sorted keys, no spaces, fields whose names
start with ``__`` left out) is hashed with sha256, the digests are added as 256-bit integers
modulo 2**256, and the sum and the count are hashed together. Partial digests of disjoint parts
combine with :meth:`SamplesDigest.merge`, so workers can hash their own parts."""
from __future__ import annotations

import hashlib
import json

_MOD = 1 << 256


def canonical(sample: dict) -> bytes:
    """The bytes a sample is hashed as: its JSON with sorted keys, without ``__`` fields."""
    return json.dumps({k: v for k, v in sample.items() if not k.startswith("__")}, sort_keys=True,
                      separators=(",", ":")).encode()


class SamplesDigest:
    """Order-free digest of a collection of samples (count and the sum of their sha256s)."""

    def __init__(self, count: int = 0, total: int = 0):
        self.count, self.total = count, total

    def add(self, sample: dict) -> None:
        self.count += 1
        self.total = (self.total + int.from_bytes(hashlib.sha256(canonical(sample)).digest(), "big")) % _MOD

    def merge(self, other: "SamplesDigest") -> "SamplesDigest":
        return SamplesDigest(self.count + other.count, (self.total + other.total) % _MOD)

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()
