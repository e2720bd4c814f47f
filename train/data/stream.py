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
    history list[np.ndarray] eval only: the distinct items before the target (eval.exclude_history)
"""
from __future__ import annotations

import json
import random
import re
import shlex
import sys
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import braceexpand
import torch
import webdataset as wds

from model.config import Vocabulary
from train.redact import expand_env, redact


def vocabulary(manifest: dict) -> Vocabulary:
    """The manifest's item id ranges (:class:`model.Vocabulary`, their one description)."""
    return Vocabulary.of(manifest["domains"])


class ShardError(ValueError):
    """A shard cannot be read or holds a malformed sample; the message names the shard (and key)."""


@dataclass(frozen=True)
class ReaderOptions:
    """How shards are read (``data.remote``, ``data.on_error``, ``train.num_workers``, ``train.resampled``)."""

    remote: str = ""  # base URL or pattern with {path}; "" = the local prepared folder
    on_error: str = "raise"  # "raise": stop naming the shard/key; "skip": skip it, count and report
    num_workers: int = 0  # DataLoader worker processes per rank (training streams)
    resampled: bool = False  # draw shards with replacement forever; the caller bounds the epoch

    @classmethod
    def of(cls, cfg) -> "ReaderOptions":
        return cls(cfg.data.remote, cfg.data.on_error, cfg.train.num_workers, cfg.train.resampled)


def expand_urls(spec: str | list[str]) -> list[str]:
    """A list of shard URLs, or one string with brace patterns, e.g. ``data/A/train-{000000..000009}.tar``
    (several patterns may be joined with ``::``)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [u for sp in specs for part in sp.split("::") for u in braceexpand.braceexpand(part)]


# The only shard paths xdrec writes (``<domain>/<split>-NNNNNN.tar``): a manifest naming any other
# path (absolute, with '..', with shell characters) is refused before anything is opened.
SHARD_PATH = re.compile(r"(?P<domain>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<split>train|valid|test)-\d{6}\.tar")


def bad_shard_path(path, domain: str, split: str) -> str | None:
    """Why ``path`` is not a shard path xdrec writes for (domain, split); None when it is."""
    m = SHARD_PATH.fullmatch(path) if isinstance(path, str) else None
    if m is None or m["domain"] in (".", ".."):
        return f"shard path {path!r} is not of the form <domain>/<split>-NNNNNN.tar"
    if (m["domain"], m["split"]) != (domain, split):
        return f"shard path {path!r} is listed under {domain}/{split}"
    return None


def shard_urls(manifest: dict, folder: str | Path, domain: str, split: str, remote: str = "") -> list[str]:
    """URLs of a (domain, split)'s shards: in ``folder``, or under ``remote`` (a base URL such as
    ``https://host/x`` or ``file:///mnt/x``, or a pattern with ``{path}`` such as
    ``pipe:aws s3 cp s3://bucket/x/{path} -``, where each path goes in shell-quoted). A base URL's
    ``${VAR}`` references are filled in from the environment here (``train.redact``); a ``pipe:``
    command's are left to its shell."""
    paths = [s["path"] for s in manifest["shards"][domain][split]]
    for p in paths:
        if bad_shard_path(p, domain, split):
            raise ShardError(f"manifest of {folder}: {bad_shard_path(p, domain, split)}; refused")
    if not remote:
        return [str(Path(folder) / p) for p in paths]
    if remote.startswith("pipe:"):
        return [remote.replace("{path}", shlex.quote(p)) for p in paths]
    remote = expand_env(remote)
    if "{path}" in remote:
        return [remote.replace("{path}", p) for p in paths]
    return [remote.rstrip("/") + "/" + p for p in paths]


def shard_sizes(manifest: dict, domain: str, split: str) -> list[int]:
    """Samples per shard of a (domain, split), aligned with :func:`shard_urls`."""
    return [s["samples"] for s in manifest["shards"][domain][split]]


def split_mode(n_shards: int, num_workers: int = 0) -> str:
    """``shards`` when every (rank, worker) can own whole shards, else ``samples``.

    WebDataset splits whole shards across ranks and workers: with fewer shards than
    ranks x workers some reader would get nothing, so then every reader opens every shard and
    keeps every (ranks x workers)-th sample instead. Either way the readers' samples are disjoint
    and together cover the split once.
    """
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return "shards" if n_shards >= world * max(num_workers, 1) else "samples"


def _split_samples(src):
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    yield from islice(src, rank * workers + worker, None, world * workers)


def _reader_seed(*parts) -> random.Random:
    """An RNG seeded by ``parts`` plus this reader's (rank, worker): string seeds hash the same in
    every process."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return random.Random("-".join(map(str, (*parts, rank, worker))))


def _buffer_shuffle(buffer: int, seed: int, epoch: int):
    """Shuffle within a ``buffer``-sample window, seeded by (seed, epoch, rank, worker)."""
    def stage(src):
        rng = _reader_seed("shuffle", seed, epoch)
        buf = []
        for s in src:
            buf.append(s)
            if len(buf) >= buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf
    return stage


def _resampled_shards(urls: list[str], seed: int, epoch: int):
    """Endless shard URLs drawn with replacement, seeded per (seed, epoch, rank, worker)."""
    def stage(*_):  # the source stage of its pipeline: called without an input
        rng = _reader_seed("resample", seed, epoch)
        while True:
            yield {"url": rng.choice(urls)}
    return stage


class _Errors:
    """wds exception handler and sample checker for ``data.on_error``: raise a :class:`ShardError`
    naming the shard (and key), or skip, count and report on stderr."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped = {"shards": 0, "samples": 0}

    def _skip(self, kind: str, what: str) -> None:
        self.skipped[kind] += 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        print(f"[data] rank {rank} worker {worker}: skipped {what} (data.on_error=skip; this reader has skipped "
              f"{self.skipped['shards']} shard(s), {self.skipped['samples']} sample(s))", file=sys.stderr, flush=True)

    def shard(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a not in str(exn.args[:1])), None)
        what = redact(f"{where or 'a shard'}: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        if self.policy == "skip":
            self._skip("shards", f"the rest of {what}")
            return True
        raise ShardError(redact(f"{what} (set data.on_error=skip to skip and count bad shards)")) from None

    def count_check(self, expected: dict[str, int]):
        """Stage over whole shards: a shard ending with fewer samples than the manifest lists
        (a tar cut at a member boundary reads as a clean end) is an error, not a silent loss."""
        def stage(src):
            url, n = None, 0
            for s in src:
                if s.get("__url__") != url:
                    self._short(url, n, expected)
                    url, n = s.get("__url__"), 0
                n += 1
                yield s
            self._short(url, n, expected)
        return stage

    def _short(self, url, n: int, expected: dict[str, int]) -> None:
        want = expected.get(url)
        if url is None or not want or n % want == 0:  # resampled: the same shard may come twice in a row
            return
        what = redact(f"{url}: ended after {n % want} of its {want} samples (truncated?)")
        if self.policy == "skip":
            self._skip("shards", what)
            return
        raise ShardError(what + " (set data.on_error=skip to skip and count bad shards)")

    def sample(self, sample: dict, problem: str) -> None:
        what = redact(f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')!r}: {problem}")
        if self.policy == "skip":
            self._skip("samples", what)
            return
        raise ShardError(what + " (set data.on_error=skip to skip and count bad samples)")


_FIELDS = {"user": int, "items": list}
_EVAL_FIELDS = {**_FIELDS, "target": int, "exclude": list}


def _decode(errors: _Errors, fields: dict, n_items: int):
    """Parse each sample's ``.json`` member and check its fields and item ids (0 < id <= n_items)."""
    def stage(src):
        for s in src:
            raw = s.get("json")
            if raw is None:
                errors.sample(s, f"no .json member (has {sorted(k for k in s if not k.startswith('__'))})")
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                errors.sample(s, f".json does not parse: {e}")
                continue
            bad = None
            if not isinstance(obj, dict):
                bad = f".json is a {type(obj).__name__}, not an object"
            else:
                for k, tp in fields.items():
                    v = obj.get(k)
                    if not isinstance(v, tp) or isinstance(v, bool):
                        bad = f"field {k!r} must be {tp.__name__}, got {v!r:.60}"
                        break
            if bad is None:
                items = obj["items"]
                try:  # builtins are C loops over the list: a str/None/list raises, a float makes the sum a float
                    ok = not items or (min(items) >= 1 and max(items) <= n_items and type(sum(items)) is int)
                    if "target" in fields:
                        ok = ok and 1 <= obj["target"] <= n_items
                except TypeError:
                    ok = False
                if not ok:
                    bad = f"item ids must be integers in 1..{n_items}"
            if bad is not None:
                errors.sample(s, bad)
                continue
            obj["__url__"] = s.get("__url__")  # its shard: whose domain labels a training row
            yield obj
    return stage


def sample_stream(urls: list[str] | str, *, shuffle: bool, seed: int, epoch: int, buffer: int,
                  reader: ReaderOptions = ReaderOptions(), n_items: int = 2**62, eval_fields: bool = False,
                  sizes: list[int] | None = None) -> wds.DataPipeline:
    """Decoded, checked JSON samples of this rank and worker from ``urls`` (a list or a brace
    pattern). Shard order shuffled by (seed, epoch), the same on every rank so the split stays
    disjoint; samples shuffled in a window seeded by (seed, epoch, rank, worker). ``resampled``:
    shards drawn with replacement per reader, without end. ``sizes`` (samples per URL, from the
    manifest) turns a shard that ends early into an error too."""
    urls = expand_urls(urls)
    errors = _Errors(reader.on_error)
    check = errors.count_check(dict(zip(urls, sizes or [])))
    read = wds.tarfile_to_samples(handler=errors.shard)
    if reader.resampled:
        stages = [_resampled_shards(urls, seed, epoch), read, check]
    else:
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(urls)
        stages = [wds.SimpleShardList(urls)]
        if split_mode(len(urls), reader.num_workers) == "shards":
            stages += [wds.split_by_node, wds.split_by_worker, read, check]
        else:
            stages += [read, check, _split_samples]
    if shuffle:
        stages.append(_buffer_shuffle(buffer, seed, epoch))
    stages.append(_decode(errors, _EVAL_FIELDS if eval_fields else _FIELDS, n_items))
    return wds.DataPipeline(*stages)


def _left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    if len(seq):
        out[-len(seq):] = seq
    return out


def train_rows(samples: list[dict], *, dom: Vocabulary, label_domain: int | list[int], max_len: int,
               only_domain: bool, cloze: bool = False, latest_target: bool = True) -> dict[str, np.ndarray]:
    """One training row per sample, in order, its targets in ``label_domain`` (one domain for
    every row, or each row's own: a stream over several domains' shards). A sample whose
    window holds no target there (its sequence trimmed, or reduced to the domain, past its last
    target) keeps an all-zero row that adds nothing to the loss: every sample is one row, so each
    rank's batches per epoch follow from the manifest (:func:`batches_per_rank`).

    Each sequence (first reduced to the domain's items when ``only_domain``) is trimmed to its
    last ``max_len + 1`` events and right-aligned in one matrix, then inputs, next-item targets
    and the domain mask are computed for the whole chunk at once. Returns ``items``/``targets``
    ``[n, max_len]`` (left padded: the last column is the latest event) and ``user`` ``[n]``.
    ``cloze`` (masked-item objective): inputs are the last ``max_len`` events and each position's
    target is its own item where it belongs to the label domain (the model picks what to mask).
    ``latest_target`` false: the row's latest event (its last column, after the reduction to the
    domain) is never a target; it stays an input (``train.latest_target``).
    """
    labels = np.broadcast_to(np.asarray(label_domain, np.int64), (len(samples),))
    # each row's label domain's ids are lo+1..hi, as [n, 1] columns against the matrix below
    lo, hi = (np.asarray(dom.offsets, np.int64)[labels][:, None], np.asarray(dom.ends, np.int64)[labels][:, None])
    width = max_len if cloze else max_len + 1
    mat = np.zeros((len(samples), width), np.int64)
    for r, sample in enumerate(samples):
        seq = np.asarray(sample["items"], dtype=np.int64)
        if only_domain:
            seq = seq[(seq > lo[r, 0]) & (seq <= hi[r, 0])]
        seq = seq[-width:]
        if len(seq):
            mat[r, width - len(seq):] = seq
    if cloze:
        x = mat
        targets = np.where((x > lo) & (x <= hi), x, 0)
    else:
        x, y = mat[:, :-1], mat[:, 1:]
        targets = np.where((x > 0) & (y > lo) & (y <= hi), y, 0)  # no target for a padded input
    if not latest_target:
        targets[:, -1] = 0
    user = np.fromiter((s["user"] for s in samples), np.int64, len(samples))
    return {"items": x, "targets": targets, "user": user}


def train_example(sample: dict, **kw) -> dict:
    """One sample's training row (see :func:`train_rows`)."""
    return {k: v[0] for k, v in train_rows([sample], **kw).items()}


def batches_per_rank(manifest: dict, domain: str | list[str], *, batch_size: int, seed: int, epoch: int, world: int,
                     num_workers: int = 0, epoch_batches: int | None = None) -> list[int]:
    """The batches :func:`train_batches` yields on each of ``world`` ranks in ``epoch`` (one row a
    sample, whole shards or every R-th sample per reader as :func:`split_mode` chooses, the shard
    order of :func:`sample_stream`), from the manifest alone; ``epoch_batches`` for a resampled
    stream. The training loop takes the smallest of them on every rank, with no per-step agreement."""
    if epoch_batches is not None:
        return [epoch_batches] * world
    sizes = [n for d in _domains(domain) for n in shard_sizes(manifest, d, "train")]
    order = list(range(len(sizes)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)  # as sample_stream shuffles the shard list
    workers = max(num_workers, 1)
    readers = world * workers
    out = []
    for rank in range(world):
        n = 0
        for worker in range(workers):
            if len(sizes) >= readers:  # whole shards: split_by_node, then split_by_worker
                samples = sum(sizes[i] for i in order[rank::world][worker::workers])
            else:  # every reader keeps every readers-th sample of all shards
                samples = len(range(rank * workers + worker, sum(sizes), readers))
            n += -(-samples // batch_size)
        out.append(n)
    return out


def _domains(domain: str | list[str]) -> list[str]:
    return [domain] if isinstance(domain, str) else list(domain)


def _train_batches_stage(batch_size: int, buckets: int = 0, seed: int = 0, epoch: int = 0,
                         labels: dict[str, int] | None = None, **kw):
    """Samples -> batches of exactly ``batch_size`` rows (the last may be short), rows computed
    a chunk at a time (:func:`train_rows`).

    ``buckets`` > 0: each run of ``buckets x batch_size`` samples is ordered by sequence length,
    cut into batches and those batches shuffled (seeded per reader), and each batch is trimmed
    to its longest row (:func:`trim_batch`): rows of like length train together and the encoder
    runs on few padding columns. A reader still yields ceil(its samples / batch_size) batches."""
    def stage(src):
        rng = _reader_seed("buckets", seed, epoch)
        pending: list[dict] = []
        n = 0
        for chunk in _chunks(src, batch_size * max(buckets, 1)):
            if labels is not None:  # several domains' shards: each row is labelled by its shard's domain
                kw["label_domain"] = [labels[s["__url__"]] for s in chunk]
            rows = train_rows(chunk, **kw)
            if buckets:
                yield from _bucketed(rows, batch_size, rng)
                continue
            if len(rows["user"]):
                pending.append(rows)
                n += len(rows["user"])
            while n >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                yield {k: torch.from_numpy(v[:batch_size]) for k, v in merged.items()}
                pending, n = [{k: v[batch_size:] for k, v in merged.items()}], n - batch_size
        if n:
            yield {k: torch.from_numpy(np.concatenate([p[k] for p in pending])) for k in pending[0]}
    return stage


def _bucketed(rows: dict[str, np.ndarray], batch_size: int, rng: random.Random) -> Iterator[dict]:
    """One bucket's rows as batches of like length (longest first within the bucket, then the
    batches shuffled), each trimmed to its longest row."""
    length = (rows["items"] != 0).sum(1) + (rows["targets"][:, -1] != 0)
    order = np.argsort(-length, kind="stable")
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    full, last = (batches[:-1], batches[-1:]) if len(order) % batch_size else (batches, [])
    rng.shuffle(full)  # a short batch (the reader's last) stays last, as without buckets
    for idx in full + last:
        yield trim_batch({k: torch.from_numpy(v[np.sort(idx)]) for k, v in rows.items()})


def trim_batch(batch: dict) -> dict:
    """The batch without its leading columns of padding in every row (``items``, ``targets``,
    left padded; at least one column kept). The model places positions from the right
    (``model.embeddings``), so a trimmed row is encoded exactly as the padded one."""
    used = (batch["items"] != 0).any(0) | (batch["targets"] != 0).any(0)
    first = int(used.to(torch.int8).argmax()) if bool(used.any()) else batch["items"].shape[1] - 1
    return {k: v[:, first:] if k in ("items", "targets") else v for k, v in batch.items()}


def pad_left(batch: dict, width: int) -> dict:
    """``items``/``targets`` left padded with 0 to ``width`` columns."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0)) if t.shape[1] < width else t
    return {k: pad(v) if k in ("items", "targets") else v for k, v in batch.items()}


def _chunks(src, size: int):
    buf = []
    for s in src:
        buf.append(s)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def eval_example(sample: dict, *, dom: Vocabulary, max_len: int, only_domain: int | None, domain: int = 0,
                 history_tail: int = 0) -> dict:
    """``n_train``: the user's training events in ``domain`` (the history minus its last
    ``history_tail`` events: 1 for test samples, whose history ends with the valid event);
    ``last_domain``: the domain index of the user's latest event before the target, whatever the
    model reads (-1: no event)."""
    seq = np.asarray(sample["items"], dtype=np.int64)
    doms = dom.of_ids(seq)  # each event's domain, read once
    n_train = int((doms[:len(seq) - history_tail] == domain).sum())
    last_domain = int(doms[-1]) if len(seq) else -1
    history = np.unique(seq)  # every item before the target, whatever the model's window
    if only_domain is not None:
        seq = seq[doms == only_domain]
    return {"items": _left_pad(seq[-max_len:], max_len), "user": sample["user"], "n_train": n_train,
            "last_domain": last_domain, "target": sample["target"],
            "exclude": np.asarray(sample["exclude"], dtype=np.int64), "history": history}


def collate(examples: list[dict]) -> dict:
    out = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if k in ("exclude", "history"):  # one array per row, of its own length
            out[k] = vals
        elif isinstance(vals[0], np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        else:
            out[k] = torch.tensor(vals, dtype=torch.long)
    return out


def _eval_batches_stage(make_example, batch_size: int):
    return lambda src: (collate([make_example(s) for s in chunk]) for chunk in _chunks(src, batch_size))


def _loader(pipe: wds.DataPipeline, reader: ReaderOptions, epoch_batches: int | None):
    """Batches of ``pipe``, decoded in ``reader.num_workers`` DataLoader workers (batches come
    back round-robin in worker order, so the sequence is deterministic and a resume can skip to
    an exact position); ``epoch_batches`` bounds an endless (resampled) stream (``with_epoch``)."""
    if reader.resampled and epoch_batches is None:
        raise ValueError("a resampled stream is endless: give epoch_batches")
    loader = pipe
    if reader.num_workers:
        loader = wds.WebLoader(pipe, batch_size=None, num_workers=reader.num_workers, prefetch_factor=4)
    if epoch_batches is not None:
        loader = loader.with_epoch(epoch_batches)
    return loader


def train_batches(manifest: dict, folder: str | Path, domain: str | list[str], *, batch_size: int, max_len: int,
                  seed: int, epoch: int, buffer: int, only_domain: bool = False, cloze: bool = False,
                  reader: ReaderOptions = ReaderOptions(), epoch_batches: int | None = None, buckets: int = 0,
                  latest_target: bool = True):
    """One epoch of shuffled training batches of ``domain``'s train split (this rank's share):
    one domain, or several (their shards read as one stream, each row labelled by its shard's
    domain); ``buckets`` > 0: batches of like length, trimmed (:func:`_train_batches_stage`)."""
    dom, domains = vocabulary(manifest), _domains(domain)
    per = [shard_urls(manifest, folder, d, "train", reader.remote) for d in domains]
    urls = [u for us in per for u in us]
    labels = {u: dom.index(d) for d, us in zip(domains, per) for u in us} if len(domains) > 1 else None
    pipe = sample_stream(urls, shuffle=True, seed=seed, epoch=epoch, buffer=buffer, reader=reader, n_items=dom.n_items,
                         sizes=[n for d in domains for n in shard_sizes(manifest, d, "train")])
    pipe.append(_train_batches_stage(batch_size, buckets, seed, epoch, labels, dom=dom, label_domain=dom.index(domains[0]),
                                     max_len=max_len, only_domain=only_domain, cloze=cloze,
                                     latest_target=latest_target))
    return _loader(pipe, reader, epoch_batches)


def joint_rows(batch_size: int, mix_ratio: float) -> tuple[int, int]:
    """(source rows, target rows) of a joint batch; each side keeps at least one row."""
    n_src = max(1, min(batch_size - 1, round(mix_ratio * batch_size)))
    return n_src, batch_size - n_src


def mixed_batches(manifest: dict, folder: str | Path, *, source: str | list[str], target: str | list[str], batch_size: int,
                  mix_ratio: float, max_len: int, seed: int, epoch: int, buffer: int, only_domain: bool = False,
                  cloze: bool = False, reader: ReaderOptions = ReaderOptions(), epoch_batches: int | None = None,
                  buckets: int = 0, latest_target: bool = True) -> Iterator[dict]:
    """Joint-stage batches: ``round(mix_ratio * B)`` source rows + the rest target rows (each
    side one domain or several, :func:`train_batches`).

    One epoch is one pass over the target domains' training samples (``epoch_batches`` batches
    when resampled); the source stream restarts (with the next shuffle) whenever it runs out.
    """
    n_src, n_tgt = joint_rows(batch_size, mix_ratio)

    def source_forever():
        k = 0
        while True:
            n = 0
            for b in train_batches(manifest, folder, source, batch_size=n_src, max_len=max_len,
                                   seed=seed + 1, epoch=epoch * 1000 + k, buffer=buffer, reader=reader,
                                   epoch_batches=epoch_batches, only_domain=only_domain, cloze=cloze,
                                   buckets=buckets, latest_target=latest_target):
                n += 1
                yield b
            if n == 0:
                raise ValueError(f"joint stage: source domain(s) {source!r} have no training examples")
            k += 1

    src = source_forever()
    for tb in train_batches(manifest, folder, target, batch_size=n_tgt, max_len=max_len, seed=seed,
                            epoch=epoch, buffer=buffer, reader=reader, epoch_batches=epoch_batches,
                            only_domain=only_domain, cloze=cloze, buckets=buckets, latest_target=latest_target):
        sb = next(src)
        width = max(sb["items"].shape[1], tb["items"].shape[1])
        sb, tb = pad_left(sb, width), pad_left(tb, width)
        yield {k: torch.cat([sb[k], tb[k]]) for k in tb}


def eval_samples(manifest: dict, folder: str | Path, domain: str, split: str,
                 reader: ReaderOptions = ReaderOptions()) -> wds.DataPipeline:
    """The decoded ``split`` samples of ``domain`` (held-out item in it) of this process, in shard order."""
    reader = ReaderOptions(remote=reader.remote, on_error=reader.on_error)
    return sample_stream(shard_urls(manifest, folder, domain, split, reader.remote), shuffle=False, seed=0, epoch=0,
                         buffer=0, reader=reader, n_items=vocabulary(manifest).n_items, eval_fields=True,
                         sizes=shard_sizes(manifest, domain, split))


def eval_batches(manifest: dict, folder: str | Path, domain: str, split: str, *, batch_size: int,
                 max_len: int, only_domain: bool = False, reader: ReaderOptions = ReaderOptions()):
    """All ``split`` users whose held-out item is in ``domain``, in shard order (in this process)."""
    dom = vocabulary(manifest)
    d = dom.index(domain) if only_domain else None
    pipe = eval_samples(manifest, folder, domain, split, reader)
    pipe.append(_eval_batches_stage(partial(eval_example, dom=dom, max_len=max_len, only_domain=d,
                                            domain=dom.index(domain), history_tail=int(split == "test")), batch_size))
    return pipe
