"""Columnar event table and the filters of ``xdrec prepare``.

Events are collected into compact arrays (user and item codes as int32, time as float64, domain
as int8, rating as float32: about 30 bytes an event with the sort) plus one dict per distinct
raw id, so memory grows with the number of events at array cost, not Python-object cost
(10M events: see the README's data section for the measured peak RSS). Filters are vectorised
numpy passes over a keep-mask; each reports how many users, items and events it removed.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from train.config import FilterConfig
from train.data.formats import DataFormatError, Event


@dataclass
class EventTable:
    user: np.ndarray  # int32 code (codes follow first appearance; ids follow raw id order)
    item: np.ndarray  # int32 code
    ts: np.ndarray  # float64
    domain: np.ndarray  # int8
    rating: np.ndarray  # float32 (nan: none)
    users: list[str]  # code -> raw id
    items: list[str]
    item_domain: np.ndarray  # item code -> domain

    def __len__(self) -> int:
        return len(self.user)


def collect(events: Iterable[Event], n_domains: int) -> EventTable:
    """Intern raw ids and pack every event into arrays (input order is the array order)."""
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    item_dom = array("b")
    u, i, t, d, r = array("i"), array("i"), array("d"), array("b"), array("f")
    for ev in events:
        uc = user_code.setdefault(ev.user, len(user_code))
        ic = item_code.get(ev.item)
        if ic is None:
            ic = item_code[ev.item] = len(item_code)
            item_dom.append(ev.domain)
        elif item_dom[ic] != ev.domain:
            raise DataFormatError(f"item {ev.item!r} appears in domain {item_dom[ic]} and domain {ev.domain}")
        u.append(uc)
        i.append(ic)
        t.append(ev.ts)
        d.append(ev.domain)
        r.append(ev.rating)
    if item_dom and max(item_dom) >= n_domains:
        raise DataFormatError(f"an event has domain {max(item_dom)}, but data.domains has {n_domains}")
    return EventTable(np.frombuffer(u, np.int32), np.frombuffer(i, np.int32), np.frombuffer(t, np.float64),
                      np.frombuffer(d, np.int8), np.frombuffer(r, np.float32), list(user_code), list(item_code),
                      np.frombuffer(item_dom, np.int8))


def _report(name: str, t: EventTable, before: np.ndarray, after: np.ndarray, **extra) -> dict:
    def n_distinct(codes, mask, size):
        return int(np.count_nonzero(np.bincount(codes[mask], minlength=size)))

    out = {"filter": name, "events_removed": int(before.sum() - after.sum()),
           "users_removed": n_distinct(t.user, before, len(t.users)) - n_distinct(t.user, after, len(t.users)),
           "items_removed": n_distinct(t.item, before, len(t.items)) - n_distinct(t.item, after, len(t.items))}
    return {**out, **extra}


def k_core(user: np.ndarray, item: np.ndarray, domain: np.ndarray, keep: np.ndarray, *, n_users: int, n_items: int,
           n_domains: int, user_core: int, item_core: int, min_domains: int) -> tuple[np.ndarray, int]:
    """Iterate to a fixed point: within each domain a user keeps its events there only with
    >= ``user_core`` of them, an item only with >= ``item_core`` events; a user with events in
    fewer than ``min_domains`` domains loses all. Returns (keep mask, passes)."""
    keep = keep.copy()
    ud = user.astype(np.int64) * n_domains + domain
    passes = 0
    while True:
        passes += 1
        before = int(keep.sum())
        uc = np.bincount(ud[keep], minlength=n_users * n_domains)
        ic = np.bincount(item[keep], minlength=n_items)
        keep &= (uc[ud] >= user_core) & (ic[item] >= item_core)
        if min_domains > 1:
            active = (np.bincount(ud[keep], minlength=n_users * n_domains).reshape(n_users, n_domains) > 0).sum(1)
            keep &= active[user] >= min_domains
        if int(keep.sum()) == before:
            return keep, passes


def _first_or_last(t: EventTable, keep: np.ndarray, order: np.ndarray, which: str) -> np.ndarray:
    """Keep only the earliest (or latest) event of each repeated (user, item) pair."""
    idx = np.flatnonzero(keep)
    pos = np.empty(len(t), np.int64)
    pos[order] = np.arange(len(t))  # chronological rank of each event
    o = idx[np.lexsort((pos[idx], t.item[idx], t.user[idx]))]
    pair = t.user[o].astype(np.int64) * len(t.items) + t.item[o]
    lead = np.ones(len(o), bool)  # the first (or last) event of each run of one pair
    if which == "first":
        lead[1:] = pair[1:] != pair[:-1]
    else:
        lead[:-1] = pair[:-1] != pair[1:]
    out = np.zeros(len(t), bool)
    out[o[lead]] = True
    return out


def _id_rank(raw_ids: list[str]) -> np.ndarray:
    """code -> position of its raw id in id order (so ids do not depend on the input order)."""
    rank = np.empty(len(raw_ids), np.int64)
    rank[sorted(range(len(raw_ids)), key=lambda c: id_sort_key(raw_ids[c]))] = np.arange(len(raw_ids))
    return rank


def chronological(t: EventTable, tie_break: str) -> np.ndarray:
    """Event indices sorted by user (raw id order), time, then input order or item id."""
    pos = np.arange(len(t))
    user = _id_rank(t.users)[t.user]
    if tie_break == "item":
        return np.lexsort((pos, _id_rank(t.items)[t.item], t.ts, user))
    return np.lexsort((pos, t.ts, user))


def id_sort_key(raw: str):
    """Numeric ids in numeric order first, then the rest as strings."""
    return (0, int(raw), "") if raw.isdigit() and raw.isascii() else (1, 0, raw)


def filter_plan(f: FilterConfig) -> list[tuple[str, str]]:
    """The filters ``f`` turns on, in the order they run: (kind, the name its report carries).
    Both prepare engines run this plan and report under these names."""
    plan = []
    if f.min_rating is not None:
        plan.append(("rating", f"rating >= {f.min_rating:g}"))
    if f.duplicates != "keep":
        plan.append(("duplicates", f"duplicate (user, item): keep {f.duplicates}"))
    if f.user_core > 1 or f.item_core > 1 or f.min_domains > 1:
        plan.append(("k_core", f"k-core per domain (user >= {f.user_core}, item >= {f.item_core}), "
                               f"users in >= {f.min_domains} domains"))
    if f.last_n:
        plan.append(("last_n", f"last {f.last_n} events per user"))
    plan.append(("min_events", f"users with < {f.min_events} events"))
    return plan


def apply_filters(t: EventTable, f: FilterConfig, n_domains: int) -> tuple[np.ndarray, list[dict]]:
    """Keep-mask after every filter of ``f`` (:func:`filter_plan`) and one report per filter."""
    keep = np.ones(len(t), bool)
    reports = []
    order = chronological(t, f.tie_break)
    for kind, name in filter_plan(f):
        extra = {}
        if kind == "rating":
            new = keep & (t.rating >= f.min_rating)  # nan (no rating) fails the test
        elif kind == "duplicates":
            new = keep & _first_or_last(t, keep, order, f.duplicates)
        elif kind == "k_core":
            new, extra["passes"] = k_core(t.user, t.item, t.domain, keep, n_users=len(t.users),
                                          n_items=len(t.items), n_domains=n_domains, user_core=f.user_core,
                                          item_core=f.item_core, min_domains=f.min_domains)
        elif kind == "last_n":
            o = order[keep[order]]
            new = np.zeros(len(t), bool)
            new[o[_rank_from_end(t.user[o]) < f.last_n]] = True
        else:
            counts = np.bincount(t.user[keep], minlength=len(t.users))
            new = keep & (counts[t.user] >= f.min_events)
        reports.append(_report(name, t, keep, new, **extra))
        keep = new
    return keep, reports


def _rank_from_end(group: np.ndarray) -> np.ndarray:
    """For a grouped (contiguous) key array: 0 for the last element of each group, 1 before it, ..."""
    n = len(group)
    if n == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(np.r_[group[1:] != group[:-1], True])
    group_end = np.repeat(ends, np.diff(np.r_[-1, ends]))
    return group_end - np.arange(n)


def no_events(name: str, source) -> str:
    """Both engines' error when nothing was read."""
    return f"data '{name}': no events read from {source or 'synthetic'}"


def nothing_kept(name: str, reports: list[dict]) -> str:
    """Both engines' error when the filters removed every event."""
    return f"data '{name}': the filters removed every event ({summary(reports)})"


def summary(reports: list[dict]) -> str:
    return "; ".join(f"{r['filter']}: -{r['events_removed']} events, -{r['users_removed']} users, "
                     f"-{r['items_removed']} items" for r in reports if r["events_removed"]) or "nothing filtered"

