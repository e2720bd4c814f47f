"""Synthetic cross-domain interactions with planted structure, the default that needs no files.

Every user has one latent taste out of ``n_tastes``. Items of each domain are split into taste
clusters, with Zipf popularity inside a cluster and overall (``popularity: zipf``) or uniform
draws (``uniform``: every item is about equally likely, so a few events per item cover a
vocabulary of millions). An event follows the user's taste with probability ``taste_purity``
and is a popularity draw otherwise, in both domains. So the source-domain history reveals the
taste that drives the (short) target-domain history: a model that reads both domains should
beat one that reads the target domain alone.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from train.config import SyntheticConfig
from train.data.formats import Event


def _zipf_probs(n: int, a: float = 1.0) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** a
    return p / p.sum()


def generate(cfg: SyntheticConfig, n_domains: int = 2) -> Iterator[Event]:
    if len(cfg.items_per_domain) != n_domains or len(cfg.events_per_domain) != n_domains:
        raise ValueError(f"data.synthetic: items_per_domain and events_per_domain need {n_domains} entries")
    rng = np.random.default_rng(cfg.seed)
    # clusters[d][t] = item ids (raw, per domain) of taste t, most popular first
    clusters, pop = [], []
    for d, n_items in enumerate(cfg.items_per_domain):
        perm = rng.permutation(n_items)
        clusters.append([perm[t::cfg.n_tastes] for t in range(cfg.n_tastes)])
        pop.append(_zipf_probs(n_items, 0.8)[np.argsort(rng.permutation(n_items))])
    zipf = {len(c): _zipf_probs(len(c)) for cl in clusters for c in cl}  # by cluster size, computed once
    uniform = cfg.popularity == "uniform"
    for u in range(cfg.n_users):
        taste = rng.integers(cfg.n_tastes)
        events = []
        for d in range(n_domains):
            n = cfg.min_events_per_domain + rng.poisson(max(cfg.events_per_domain[d] - cfg.min_events_per_domain, 0))
            cl = clusters[d][taste]
            in_taste = rng.random(n) < cfg.taste_purity
            if uniform:
                picks = np.where(in_taste, cl[rng.integers(len(cl), size=n)], rng.integers(len(pop[d]), size=n))
            else:
                picks = np.where(in_taste, cl[rng.choice(len(cl), size=n, p=zipf[len(cl)])],
                                 rng.choice(len(pop[d]), size=n, p=pop[d]))
            events += [(d, int(i)) for i in picks]
        order = rng.permutation(len(events))
        days = np.sort(rng.integers(0, 3 * len(events), size=len(events)))
        for k, j in enumerate(order):
            d, i = events[j]
            yield Event(f"u{u}", f"d{d}-i{i}", float(days[k] * 86400), d)
