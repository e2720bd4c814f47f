"""Where each user's chronological sequence is cut into training, validation and test samples.

``leave_one_out`` (the default, the ABXI protocol): the last event is the test target, the one
before it the validation target, the rest trains. ``temporal``: every user is cut at the same
two times (``data.split_quantiles`` of the kept events' times, or ``data.split_times``): events
before the valid cut train; a user's first event in [valid cut, test cut) is their validation
target and their first event at or after the test cut their test target, each with every event
before it as history. No model then trains on an event later than a test target, which
leave-one-out allows ("Time to Split", 2025; Yambda-5B uses a global temporal split)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Cut:
    """One user's cut: the first ``n_train`` events train; ``valid``/``test`` index the targets
    (None: this user has none); ``exclude_all``: ``exclude`` holds the whole sequence (the ABXI
    sampled protocol's), else the history and the target."""

    n_train: int
    valid: int | None
    test: int | None
    exclude_all: bool


def leave_one_out(n: int) -> Cut:
    return Cut(n - 2, n - 2, n - 1, True)


def temporal(times: np.ndarray, valid_at: float, test_at: float) -> Cut:
    """The cut of one user's ascending ``times``; a target needs at least one event before it."""
    n_train = int(np.searchsorted(times, valid_at, side="left"))
    k_test = int(np.searchsorted(times, test_at, side="left"))
    return Cut(n_train, n_train if 0 < n_train < k_test else None, k_test if 0 < k_test < len(times) else None, False)


def cut_times(kept_times: np.ndarray, quantiles: list[float], times: list[float]) -> tuple[float, float]:
    """The (valid, test) cut times: ``times`` when given, else those quantiles of the kept events' times."""
    if times:
        return float(times[0]), float(times[1])
    valid, test = np.quantile(kept_times, quantiles)
    return float(valid), float(test)


def user_samples(user: int, seq: list[int], doms: list[int], cut: Cut, drop: int | None = None
                 ) -> Iterator[tuple[int, str, dict]]:
    """``(domain, split, sample)`` of one user. train: the training events, once per domain that
    has a training target (positions 1..); valid/test: ``items`` (the events before the target),
    ``target``, ``exclude``. ``drop``: a domain whose events leave this user's training samples
    (``data.target_fraction``); valid and test keep the whole history."""
    train, tdoms = seq[:cut.n_train], doms[:cut.n_train]
    if drop is not None:
        train, tdoms = [i for i, d in zip(train, tdoms) if d != drop], [d for d in tdoms if d != drop]
    for d in sorted(set(tdoms[1:])):
        yield d, "train", {"user": user, "items": train}
    for split, k in (("valid", cut.valid), ("test", cut.test)):
        if k is not None:
            exclude = sorted(set(seq if cut.exclude_all else seq[:k + 1]))
            yield doms[k], split, {"user": user, "items": seq[:k], "target": seq[k], "exclude": exclude}
