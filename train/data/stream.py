"""WebDataset streams of prepared shards: decode, trim/pad to ``max_len``, batch, mix domains.

A training example of domain ``d`` is a user's mixed training sequence with next-item targets
kept only where the target item belongs to ``d`` (target 0 = no loss). ``only_domain`` drops the
other domain's items from the input first (the target-only baseline sees its domain alone).
Sequences are left-padded with 0 so the last column is always the most recent event.

Batches are dicts of tensors::

    items   [B, L] int64   input item ids (0 = padding)
    targets [B, L] int64   next-item target per position (0 = no loss)
    user    [B]    int64
    target  [B]    int64   eval only: the held-out item
    exclude list[np.ndarray] eval only: the user's items (ABXI negative sampling excludes them)
"""
from __future__ import annotations

import random
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds


class DomainIndex:
    """Global item id -> domain index, from the manifest's per-domain id ranges."""

    def __init__(self, manifest: dict):
        doms = manifest["domains"]
        self.names = [d["name"] for d in doms]
        self.offsets = np.array([d["offset"] for d in doms])
        self.sizes = np.array([d["n_items"] for d in doms])
        self.ends = self.offsets + self.sizes
        self.n_items = int(self.ends[-1])

    def index(self, name: str) -> int:
        return self.names.index(name)

    def of(self, items: np.ndarray) -> np.ndarray:
        """Domain index of each id (ids must be >= 1)."""
        return np.searchsorted(self.ends, items, side="left")

    def item_domain_table(self) -> torch.Tensor:
        """``[n_items + 1]`` int64: 0 for padding, 1 + domain index for each item."""
        t = torch.zeros(self.n_items + 1, dtype=torch.long)
        for d, (o, e) in enumerate(zip(self.offsets, self.ends)):
            t[o + 1:e + 1] = d + 1
        return t


def shard_urls(manifest: dict, folder: str | Path, domain: str, split: str) -> list[str]:
    shards = manifest["shards"][domain][split]
    return [str(Path(folder) / s["path"]) for s in shards]


def split_mode(n_shards: int) -> str:
    """``shards`` when every (rank, worker) can own whole shards, else ``samples``.

    WebDataset splits whole shards across ranks and workers: with fewer shards than
    ranks x workers some reader would get nothing, so then every reader opens every shard and
    keeps every (ranks x workers)-th sample instead. Either way the readers' samples are disjoint
    and together cover the split once.
    """
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return "shards" if n_shards >= world * max(workers, 1) else "samples"


def _split_samples(src):
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    yield from islice(src, rank * workers + worker, None, world * workers)


def sample_stream(urls: list[str], *, shuffle: bool, seed: int, epoch: int, buffer: int) -> wds.DataPipeline:
    """Decoded JSON samples of this rank and worker from ``urls``; shards and samples shuffled
    by (seed, epoch), the same shard order on every rank so the split stays disjoint."""
    urls = list(urls)
    stages = []
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(urls)
    if split_mode(len(urls)) == "shards":
        stages += [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples()]
    else:
        stages += [wds.SimpleShardList(urls), wds.tarfile_to_samples(), _split_samples]
    if shuffle:
        stages.append(wds.shuffle(buffer, initial=min(buffer, 100), seed=seed * 7919 + epoch))
    stages += [wds.decode(), wds.to_tuple("json")]
    return wds.DataPipeline(*stages)


def _left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    if len(seq):
        out[-len(seq):] = seq
    return out


def train_example(sample: dict, *, dom: DomainIndex, label_domain: int, max_len: int,
                  only_domain: bool) -> dict | None:
    seq = np.asarray(sample["items"], dtype=np.int64)
    if only_domain:
        seq = seq[dom.of(seq) == label_domain]
    seq = seq[-(max_len + 1):]
    if len(seq) < 2:
        return None
    x, y = seq[:-1], seq[1:].copy()
    y[dom.of(y) != label_domain] = 0
    if not y.any():
        return None
    return {"items": _left_pad(x, max_len), "targets": _left_pad(y, max_len), "user": sample["user"]}


def eval_example(sample: dict, *, dom: DomainIndex, max_len: int, only_domain: int | None) -> dict:
    seq = np.asarray(sample["items"], dtype=np.int64)
    if only_domain is not None:
        seq = seq[dom.of(seq) == only_domain]
    return {"items": _left_pad(seq[-max_len:], max_len), "user": sample["user"],
            "target": sample["target"], "exclude": np.asarray(sample["exclude"], dtype=np.int64)}


def collate(examples: list[dict]) -> dict:
    out = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if k == "exclude":
            out[k] = vals
        elif isinstance(vals[0], np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        else:
            out[k] = torch.tensor(vals, dtype=torch.long)
    return out


def _batched(examples: Iterator[dict | None], batch_size: int) -> Iterator[dict]:
    buf = []
    for e in examples:
        if e is None:
            continue
        buf.append(e)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def train_batches(manifest: dict, folder: str | Path, domain: str, *, batch_size: int, max_len: int,
                  seed: int, epoch: int, buffer: int, only_domain: bool = False) -> Iterator[dict]:
    """One epoch of shuffled training batches of ``domain``'s train split."""
    dom = DomainIndex(manifest)
    d = dom.index(domain)
    samples = sample_stream(shard_urls(manifest, folder, domain, "train"), shuffle=True, seed=seed,
                            epoch=epoch, buffer=buffer)
    return _batched((train_example(s, dom=dom, label_domain=d, max_len=max_len, only_domain=only_domain)
                     for (s,) in samples), batch_size)


def joint_rows(batch_size: int, mix_ratio: float) -> tuple[int, int]:
    """(source rows, target rows) of a joint batch; each side keeps at least one row."""
    n_src = max(1, min(batch_size - 1, round(mix_ratio * batch_size)))
    return n_src, batch_size - n_src


def mixed_batches(manifest: dict, folder: str | Path, *, source: str, target: str, batch_size: int,
                  mix_ratio: float, max_len: int, seed: int, epoch: int, buffer: int) -> Iterator[dict]:
    """Joint-stage batches: ``round(mix_ratio * B)`` source rows + the rest target rows.

    One epoch is one pass over the target domain's training samples; the source stream restarts
    (with the next shuffle) whenever it runs out.
    """
    n_src, n_tgt = joint_rows(batch_size, mix_ratio)

    def source_forever():
        k = 0
        while True:
            n = 0
            for b in train_batches(manifest, folder, source, batch_size=n_src, max_len=max_len,
                                   seed=seed + 1, epoch=epoch * 1000 + k, buffer=buffer):
                n += 1
                yield b
            if n == 0:
                raise ValueError(f"joint stage: source domain {source!r} has no training examples")
            k += 1

    src = source_forever()
    for tb in train_batches(manifest, folder, target, batch_size=n_tgt, max_len=max_len, seed=seed,
                            epoch=epoch, buffer=buffer):
        sb = next(src)
        yield {k: torch.cat([sb[k], tb[k]]) for k in tb}


def eval_batches(manifest: dict, folder: str | Path, domain: str, split: str, *, batch_size: int,
                 max_len: int, only_domain: bool = False) -> Iterator[dict]:
    """All ``split`` users whose held-out item is in ``domain``, in shard order."""
    dom = DomainIndex(manifest)
    d = dom.index(domain) if only_domain else None
    samples = sample_stream(shard_urls(manifest, folder, domain, split), shuffle=False, seed=0, epoch=0, buffer=0)
    return _batched((eval_example(s, dom=dom, max_len=max_len, only_domain=d) for (s,) in samples), batch_size)
