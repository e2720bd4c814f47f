"""Ranking evaluation per domain: full ranking and the ABXI sampled protocol.

- ``full``: the held-out item is ranked against every item of its domain (no sampling); with
  ``eval.exclude_history`` (the default, as HSTU reports) the items of the user's own history are
  left out of the candidates (never the held-out item itself, should it repeat one).
- ``sampled999``: against ``num_negatives`` items drawn uniformly, without replacement, from its
  domain, excluding every item of the user's sequence (ABXI, WWW'25). Negatives depend only on
  (eval seed, split, user), so every model and stage is ranked against the same ones.

With ``eval.prior`` = w > 0, both rank by score + w * log(1 + n_i), n_i the events of item i
observed before the split's targets (:func:`observed_counts`): a popularity prior added after the
model, never seen by training or by epoch selection. With ``eval.transition`` = v > 0 they also add
v * log(1 + n_{j -> i}), n_{j -> i} how often item i directly followed item j in a user's events of
the domain observed before the split's targets (:func:`observed_transitions`), j the user's last
item of the domain: a first-order Markov term beside the sequence model, likewise eval only.

Rank 1 = best; ties count against the target (a constant scorer gets the worst rank).
HR@k = [rank <= k], NDCG@k = 1/log2(rank + 1) if rank <= k, MRR = 1/rank, averaged over users.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from train.config import EvalConfig
from train.data.stream import vocabulary, ReaderOptions, eval_batches, eval_samples
from train.engine import gather_arrays, max_over_ranks, world_size
from train.progress import bar
from train.protocol import ABLATIONS, PROTOCOLS, SAMPLED


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of 1-based ranks: 1/log2(rank + 1) within the top k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, ks: list[int]) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict = {"n_users": int(len(ranks))}
    if not len(ranks):
        return out
    for k in ks:
        out[f"hr@{k}"] = float((ranks <= k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at(ranks, k).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def ranks_of_targets(scores: torch.Tensor, target_cols: torch.Tensor,
                     neg_cols: torch.Tensor | None = None) -> torch.Tensor:
    """scores: [B, N]; target_cols: [B]; neg_cols: [B, K] or None (rank among all N columns).

    Returns [B] ranks (1 = best), ties counted against the target.
    """
    t = scores.gather(1, target_cols[:, None])  # (B, 1)
    # ~(s < t), not s >= t: a NaN anywhere counts against the target (a NaN target ranks last)
    if neg_cols is None:
        return (~(scores < t)).sum(1)  # includes the target itself: rank >= 1
    return 1 + (~(scores.gather(1, neg_cols) < t)).sum(1)


class Terms:
    """The evaluation-time terms of one batch (``eval.prior``, ``eval.transition``) for any range
    of a domain's items: ``columns(a, b)`` ``[B, b - a]`` or None when there are none, and
    ``at(cols)`` ``[B, K]`` at each row's own columns (0-based within the domain)."""

    def __init__(self, prior: torch.Tensor | None, markov=None):
        self.prior, self.markov = prior, markov  # markov(a, b) -> [B, b - a]; markov.at(cols) -> [B, K]

    def columns(self, a: int, b: int) -> torch.Tensor | None:
        out = self.prior[a:b] if self.prior is not None else None
        if self.markov is not None:
            rows = self.markov.columns(a, b)
            out = rows if out is None else out + rows
        return out

    def at(self, cols: torch.Tensor) -> torch.Tensor | None:
        out = self.prior[cols] if self.prior is not None else None
        if self.markov is not None:
            rows = self.markov.at(cols)
            out = rows if out is None else out + rows
        return out


class MatrixScorer:
    """The scorer protocol (``n_items``, ``columns(a, b)``, ``at(cols)``) over a ready ``[B, n]``
    score matrix: for scorers that are not models (tests, baselines)."""

    def __init__(self, scores: torch.Tensor):
        self.scores, self.n_items = scores, scores.shape[1]

    def columns(self, a: int, b: int) -> torch.Tensor:
        return self.scores[:, a:b]

    def at(self, cols: torch.Tensor) -> torch.Tensor:
        return self.scores.gather(1, cols[:, None])[:, 0]


def _add(scores: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
    return scores if terms is None else scores + terms


def rank_in_chunks(scorer, target_cols: torch.Tensor, neg_cols: torch.Tensor, terms: Terms | None,
                   chunk: int, hist_cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full and sampled ranks (as :func:`ranks_of_targets`, ties against the target, a NaN never
    in its favour) of each row's target, scoring ``chunk`` items at a time: memory ``B x chunk``
    whatever the vocabulary, the same ranks as scoring every item at once. Returns ``(full [B],
    sampled [B], rows with a non-finite score)``. ``hist_cols`` ``[B, H]`` (-1 = none): items the
    full ranking leaves out of row r's candidates (its history, never its target).

    The target's score is taken first from a ``[B, B]`` product (the same matrix product, so on
    the same kernels the same bits) and, exactly, from its own chunk during the pass; a row where
    the two differ is counted again against the exact one."""
    terms = terms or Terms(None)
    at_target = terms.at(target_cols[:, None])
    first = _add(scorer.at(target_cols).float(), None if at_target is None else at_target[:, 0])
    exact, negs = torch.empty_like(first), torch.empty(neg_cols.shape, dtype=first.dtype, device=first.device)
    hist_cols = neg_cols.new_full((len(first), 0), -1) if hist_cols is None else hist_cols
    hist = torch.full(hist_cols.shape, float("-inf"), dtype=first.dtype, device=first.device)
    full = torch.zeros(len(first), dtype=torch.long, device=first.device)
    nonfinite = torch.zeros(len(first), dtype=torch.bool, device=first.device)
    for a in range(0, scorer.n_items, chunk):
        b = min(a + chunk, scorer.n_items)
        s = _add(scorer.columns(a, b).float(), terms.columns(a, b))
        nonfinite |= ~torch.isfinite(s).all(1)
        full += (~(s < first[:, None])).sum(1)
        mine = (target_cols >= a) & (target_cols < b)
        exact[mine] = s[mine].gather(1, (target_cols[mine] - a)[:, None])[:, 0]
        inside = (neg_cols >= a) & (neg_cols < b)
        negs[inside] = s.gather(1, (neg_cols - a).clamp(0, b - a - 1))[inside]
        inside = (hist_cols >= a) & (hist_cols < b)
        hist[inside] = s.gather(1, (hist_cols - a).clamp(0, b - a - 1))[inside]
    again = (exact != first) & ~(exact.isnan() & first.isnan())
    if again.any():  # the [B, B] product rounded differently: count those rows against the exact score
        full[again] = 0
        for a in range(0, scorer.n_items, chunk):
            b = min(a + chunk, scorer.n_items)
            s = _add(scorer.columns(a, b).float(), terms.columns(a, b))[again]
            full[again] += (~(s < exact[again][:, None])).sum(1)
    full -= ((hist_cols >= 0) & ~(hist < exact[:, None])).sum(1)  # history items counted above the target
    sampled = 1 + (~(negs < exact[:, None])).sum(1)
    return full, sampled, int(nonfinite.sum())


def sample_negatives(*, n_items: int, offset: int, exclude: np.ndarray, k: int, seed: int, split: int,
                     user: int) -> np.ndarray:
    """``k`` distinct global ids in ``(offset, offset + n_items]``, none of them in ``exclude``."""
    rng = np.random.default_rng([seed, split, user])
    local = exclude[(exclude > offset) & (exclude <= offset + n_items)] - offset - 1
    allowed = n_items - len(np.unique(local))
    if allowed < k:
        raise ValueError(f"user {user}: only {allowed} items of the domain are not in the user's "
                         f"sequence, fewer than eval.num_negatives={k}")
    cand = rng.choice(n_items, size=min(n_items, k + len(local)), replace=False)
    cand = cand[~np.isin(cand, local)][:k]
    return cand + offset + 1


def _observed_inputs(manifest: dict, folder, split: str, reader: ReaderOptions):
    """The input items (global ids, in time order) of every ``split`` sample of every domain in
    this process's share of the shards. A user has one valid and one test sample, whose inputs are
    its events before that target: every event but the last two for valid, but the last one for test."""
    for d in manifest["domains"]:
        for sample in eval_samples(manifest, folder, d["name"], split, reader):
            yield np.asarray(sample["items"], np.int64)


def observed_counts(manifest: dict, folder, split: str, reader: ReaderOptions = ReaderOptions()) -> np.ndarray:
    """``[n_items + 1]`` int64 (by global id, 0 = padding): each item's events among the inputs of
    every ``split`` sample of every domain (:func:`_observed_inputs`). Summed over ranks (each
    reads its share of the shards)."""
    counts = np.zeros(vocabulary(manifest).n_items + 1, np.int64)
    for items in _observed_inputs(manifest, folder, split, reader):
        np.add.at(counts, items, 1)
    return gather_arrays({"c": counts})["c"].reshape(world_size(), -1).sum(0)


class Transitions:
    """Counts of item j -> item i: i directly followed j among a user's events of their domain
    (events of other domains in between are skipped), over the inputs of every ``split`` sample
    (:func:`_observed_inputs`, so never a split's target). Stored sparse: the sorted pair keys
    ``j * (n_items + 1) + i`` with their counts, and where each j's row starts."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, n_items: int):
        self.base = n_items + 1
        self.keys, self.counts = keys, counts
        self.starts = np.searchsorted(keys, np.arange(self.base + 1, dtype=np.int64) * self.base)

    def count(self, prev: int, item: int) -> int:
        lo, hi = self.starts[prev], self.starts[prev + 1]
        k = lo + np.searchsorted(self.keys[lo:hi], prev * self.base + item)
        return int(self.counts[k]) if k < hi and self.keys[k] == prev * self.base + item else 0

    def log_rows(self, prev: np.ndarray, offset: int, n_items: int) -> torch.Tensor:
        """``[len(prev), n_items]`` float: log(1 + count(prev[r] -> item)) for the domain's items
        (global ids offset + 1 ... offset + n_items); prev 0 (no item of the domain yet) gives 0."""
        out = np.zeros((len(prev), n_items), np.float32)
        for r, j in enumerate(prev.tolist()):
            lo, hi = self.starts[j], self.starts[j + 1]
            cols = self.keys[lo:hi] % self.base - offset - 1
            keep = (cols >= 0) & (cols < n_items)
            out[r, cols[keep]] = np.log1p(self.counts[lo:hi][keep])
        return torch.from_numpy(out)


    def log_at(self, prev: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """``[B, K]`` float: log(1 + count(prev[r] -> items[r, k])) for global item ids ``items``
        (prev 0: 0), the values :meth:`log_rows` puts in those columns."""
        keys = prev[:, None].astype(np.int64) * self.base + items
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = (self.keys[at] == keys) & (prev[:, None] > 0) if len(self.keys) else np.zeros(keys.shape, bool)
        out = np.zeros(keys.shape, np.float32)
        out[found] = np.log1p(self.counts[at[found]])
        return torch.from_numpy(out)


def observed_transitions(manifest: dict, folder, split: str, reader: ReaderOptions = ReaderOptions()) -> Transitions:
    """The :class:`Transitions` of ``split``'s inputs, the pairs of every rank's share of the shards."""
    dom = vocabulary(manifest)
    base, pairs = dom.n_items + 1, []
    for items in _observed_inputs(manifest, folder, split, reader):
        of = dom.of_ids(items)
        for d in np.unique(of):
            seq = items[of == d]
            pairs.append(seq[:-1] * base + seq[1:])
    local = np.concatenate(pairs) if pairs else np.zeros(0, np.int64)
    keys, counts = np.unique(gather_arrays({"k": local})["k"], return_counts=True)
    return Transitions(keys, counts, dom.n_items)


def last_of_domain(items: torch.Tensor, offset: int, n_items: int) -> np.ndarray:
    """``[B]``: each row's last item (global id) of the domain with ids offset + 1 ... offset +
    n_items, 0 where the row holds none (rows are left-padded, time order)."""
    inside = ((items > offset) & (items <= offset + n_items)).cpu()
    pos = inside.shape[1] - 1 - inside.flip(1).to(torch.int8).argmax(1)
    last = items.cpu().gather(1, pos[:, None])[:, 0]
    return torch.where(inside.any(1), last, 0).numpy()


def history_columns(histories: list[np.ndarray], targets: torch.Tensor, offset: int, n_items: int) -> torch.Tensor:
    """``[B, H]`` int64: each row's history items of the domain (global ids offset + 1 ...
    offset + n_items) as 0-based columns, its target left out, padded with -1."""
    rows = [h[(h > offset) & (h <= offset + n_items) & (h != int(t))] - offset - 1
            for h, t in zip(histories, targets.tolist())]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
    for r, cols in enumerate(rows):
        out[r, :len(cols)] = cols
    return torch.from_numpy(out)


def without(items: torch.Tensor, what: str, offset: int, n_items: int) -> torch.Tensor:
    """``[B, L]`` left-padded rows with ``what`` taken out: ``last-event``, each row's latest event
    (at test: the valid target); ``other-domains``, every event outside the domain with ids
    offset + 1 ... offset + n_items (the rest keep their order, packed to the right)."""
    if what == "last-event":
        return torch.cat([torch.zeros_like(items[:, :1]), items[:, :-1]], 1)
    if what != "other-domains":
        raise ValueError(f"without={what!r}: one of {', '.join(ABLATIONS)}")
    keep = (items > offset) & (items <= offset + n_items)
    # a stable sort of keep (False first) moves the kept events right, in their order
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    return torch.where(keep, items, 0).gather(1, order)


class NonFiniteScores(RuntimeError):
    """The model scored some users with NaN or infinity: ranking them would report nonsense."""


class Markov:
    """``eval.transition`` x log(1 + count(last -> item)) of a batch, for any range of a domain's
    items (``columns``) or each row's own items (``at``); see :class:`Transitions`."""

    def __init__(self, transitions: Transitions, prev: np.ndarray, offset: int, weight: float, device):
        self.t, self.prev, self.offset, self.weight, self.device = transitions, prev, offset, weight, device

    def columns(self, a: int, b: int) -> torch.Tensor:
        return (self.weight * self.t.log_rows(self.prev, self.offset + a, b - a)).to(self.device)

    def at(self, cols: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.t.log_at(self.prev, cols.cpu().numpy() + self.offset + 1)).to(self.device)


def matrix_score_fn(scores_of):
    """``score_fn`` for :meth:`Evaluator.ranks` from ``scores_of(items, domain) -> [B, n_items]``."""
    return lambda items, domain, consume: consume(MatrixScorer(scores_of(items, domain)))


class Evaluator:
    """Evaluates one prepared dataset; caches sampled negatives across calls."""

    def __init__(self, manifest: dict, folder, cfg: EvalConfig, *, max_len: int, reader: ReaderOptions = ReaderOptions()):
        self.manifest, self.folder, self.cfg, self.max_len, self.reader = manifest, folder, cfg, max_len, reader
        self.vocab = vocabulary(manifest)
        self._negatives: dict = {}
        self._log_counts: dict = {}
        self._transitions: dict = {}

    def prior(self, domain: str, split: str, device) -> torch.Tensor:
        """``[n_items of domain]``: ``eval.prior * log(1 + observed count)`` of its items for ``split``."""
        if split not in self._log_counts:
            counts = observed_counts(self.manifest, self.folder, split, self.reader)
            self._log_counts[split] = torch.from_numpy(np.log1p(counts)).float()
        lo, hi = self.vocab.ranges[self.vocab.index(domain)]
        return (self.cfg.prior * self._log_counts[split][lo:hi]).to(device)

    def terms(self, domain: str, split: str, items: torch.Tensor, device) -> Terms | None:
        """The batch's evaluation-time terms (None when ``eval.prior`` and ``eval.transition`` are 0)."""
        prior = self.prior(domain, split, device) if self.cfg.prior else None
        markov = self._markov(domain, split, items, device) if self.cfg.transition > 0 else None
        return Terms(prior, markov) if prior is not None or markov is not None else None

    def _markov(self, domain: str, split: str, items: torch.Tensor, device) -> "Markov":
        if split not in self._transitions:
            self._transitions[split] = observed_transitions(self.manifest, self.folder, split, self.reader)
        k = self.vocab.index(domain)
        offset, n = self.vocab.offsets[k], self.vocab.sizes[k]
        return Markov(self._transitions[split], last_of_domain(items, offset, n), offset,
                      self.cfg.transition, device)

    def _negs(self, domain: str, split: str, users, excludes) -> np.ndarray:
        k = self.vocab.index(domain)
        cache = self._negatives.setdefault((domain, split), {})
        rows = []
        for u, ex in zip(users.tolist(), excludes):
            if u not in cache:
                cache[u] = sample_negatives(n_items=self.vocab.sizes[k], offset=self.vocab.offsets[k], exclude=ex,
                                            k=self.cfg.num_negatives, seed=self.cfg.seed,
                                            split=("valid", "test").index(split), user=u)
            rows.append(cache[u])
        return np.stack(rows)

    @torch.no_grad()
    def ranks(self, score_fn, domain: str, split: str, *, only_domain: bool, device, eval_terms: bool = True) -> dict:
        """Per-user ranks ``{"user", "full", SAMPLED, "n_train", "last_domain"}`` (numpy, by user id;
        ``n_train``: the user's training events in ``domain``; ``last_domain``: the domain of the
        user's latest input event, read off the whole history) for ``split`` users of
        ``domain``: each rank scores its own users, then all ranks gather every user's ranks, so
        the metrics equal a single-process evaluation (never an average of per-rank metrics).

        ``score_fn(items [B, L], domain index, consume)`` returns ``consume(scorer)`` for the
        batch's scorer (``Recommender.forward(..., consume=)``; :func:`matrix_score_fn` for a ready
        matrix); items are scored ``eval.item_chunk`` at a time (:func:`rank_in_chunks`).
        ``eval_terms``: add ``eval.prior``'s and ``eval.transition``'s terms to the scores (where
        they are > 0), False ranks by the scores alone.
        """
        k = self.vocab.index(domain)
        users, full, sampled, n_train, last = [], [], [], [], []
        batches = iter(eval_batches(self.manifest, self.folder, domain, split, batch_size=self.cfg.batch_size,
                                    max_len=self.max_len, only_domain=only_domain, reader=self.reader))
        bad = 0  # users of this rank whose scores were not finite, so far
        shown = bar(f"evaluating {domain} {split}", -(-self.manifest["counts"][domain][split]["samples"] // world_size()),
                    "user")
        while True:
            b = next(batches, None)
            if shown is not None:
                shown.update(len(b["user"]) if b is not None else 0)
            # Ranks hold about equal user counts; one with none left still runs the forward (on a
            # padding row) while others work, since ZeRO-3 gathers parameters collectively.
            more, nonfinite = max_over_ranks([int(b is not None), bad])
            if nonfinite:
                raise NonFiniteScores(f"evaluating {domain} {split}: the model's scores are not finite (NaN or "
                                      "infinite) for some users: its weights have diverged; nothing is ranked")
            if not more:
                break
            if b is None:
                score_fn(torch.zeros(1, self.max_len, dtype=torch.long, device=device), k, lambda s: None)
                continue
            tcol = self.vocab.columns(k, b["target"]).to(device)
            negs = torch.from_numpy(self.vocab.columns(k, self._negs(domain, split, b["user"], b["exclude"]))).to(device)
            terms = self.terms(domain, split, b["items"], device) if eval_terms else None
            hist = history_columns(b["history"], b["target"], self.vocab.offsets[k], self.vocab.sizes[k]).to(device) \
                if self.cfg.exclude_history else None
            f, s, n_bad = score_fn(b["items"].to(device), k,
                                   partial(rank_in_chunks, target_cols=tcol, neg_cols=negs, terms=terms,
                                           chunk=self.cfg.item_chunk, hist_cols=hist))
            bad += n_bad
            full.append(f.cpu())
            sampled.append(s.cpu())
            users.append(b["user"])
            n_train.append(b["n_train"])
            last.append(b["last_domain"])
        if shown is not None:
            shown.close()
        cat = (lambda xs: torch.cat(xs).numpy()) if users else (lambda xs: np.zeros(0, dtype=np.int64))
        out = gather_arrays({"user": cat(users), "full": cat(full), SAMPLED: cat(sampled), "n_train": cat(n_train),
                             "last_domain": cat(last)})
        order = np.argsort(out["user"], kind="stable")
        return {k: v[order] for k, v in out.items()}

    def evaluate(self, score_fn, domain: str, split: str, *, only_domain: bool, device, eval_terms: bool = True) -> dict:
        """``{"full": {...metrics}, "sampled999": {...}}`` for one domain and split."""
        return self.metrics(self.ranks(score_fn, domain, split, only_domain=only_domain, device=device, eval_terms=eval_terms))

    def metrics(self, r: dict) -> dict:
        """``{"full": {...}, "sampled999": {...}}`` of per-user ranks from :meth:`ranks`."""
        return {p: metrics_from_ranks(r[p], self.cfg.ks) for p in PROTOCOLS}

    def by_history(self, r: dict) -> dict:
        """Metrics of users bucketed by their training events in the domain (``eval.cold_start``
        edges, e.g. [5, 10] -> "0", "1-5", "6-10", ">10")."""
        out = {}
        for name, lo, hi in history_buckets(self.cfg.cold_start):
            sel = (r["n_train"] >= lo) & (r["n_train"] <= hi)
            out[name] = self.metrics({p: r[p][sel] for p in PROTOCOLS})
        return out

    def by_last_input(self, r: dict) -> dict:
        """Metrics of users grouped by the domain of their latest input event (``{domain name: ...}``,
        domains no user's history ends in left out): where a cross-domain model gains or loses
        against a target-only one, which reads only the target's events."""
        return {name: self.metrics({p: r[p][r["last_domain"] == k] for p in PROTOCOLS})
                for k, name in enumerate(self.vocab.names) if (r["last_domain"] == k).any()}


def history_buckets(edges: list[int]) -> list[tuple[str, int, float]]:
    """[5, 10] -> [("0", 0, 0), ("1-5", 1, 5), ("6-10", 6, 10), (">10", 11, inf)]."""
    out, lo = [("0", 0, 0)], 1
    for e in edges:
        out.append((f"{lo}-{e}" if e > lo else f"{e}", lo, e))
        lo = e + 1
    out.append((f">{lo - 1}", lo, float("inf")))
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int, seed: int) -> dict:
    """Paired bootstrap over users of mean(a) - mean(b) (a, b: per-user values, same users):
    the observed difference, its 95% percentile interval and the share of resamples <= 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for k in range(0, resamples, 100):  # 100 resamples at a time keeps memory small
        n = min(100, resamples - k)
        means[k:k + n] = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "share_le_0": float((means <= 0).mean()), "n_users": int(len(diff)), "resamples": resamples}
