"""Readers for raw interaction files. Each yields :class:`Event` rows in file order.

- ABXI line format (``../shared/data/*/``): ``<user> <item>|<unix_ts> <item>|<unix_ts> ...`` per
  line, plus ``map_item_*.txt`` = JSON ``{asin: [item_id, domain_index]}`` giving each item's domain.
- Interaction table (CSV/TSV) with user, item, timestamp and domain columns (names configurable).

A malformed line raises :class:`DataFormatError` naming the file and the 1-based line number.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from train.config import TableConfig


class DataFormatError(ValueError):
    """Raw data does not parse; the message names the file and line."""


@dataclass(frozen=True)
class Event:
    user: str  # raw user id
    item: str  # raw item id
    ts: float
    domain: int  # index into data.domains


def _abxi_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: ABXI data folder does not exist")
    seqs = sorted(folder.glob("*_preprocessed.txt"))
    maps = sorted(folder.glob("map_item_*.txt"))
    if len(seqs) != 1:
        raise DataFormatError(f"{folder}: expected exactly one *_preprocessed.txt, found {[p.name for p in seqs]}")
    if len(maps) != 1:
        raise DataFormatError(f"{folder}: expected exactly one map_item_*.txt, found {[p.name for p in maps]}")
    return seqs[0], maps[0]


def read_abxi_item_domains(map_path: Path, n_domains: int) -> dict[str, int]:
    """``{item_id (as str): domain index}`` from an ABXI ``map_item`` JSON file."""
    try:
        raw = json.loads(map_path.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{map_path}: not valid JSON: {e}") from None
    out: dict[str, int] = {}
    for asin, val in raw.items():
        if not (isinstance(val, list) and len(val) == 2 and all(isinstance(v, int) for v in val)):
            raise DataFormatError(f"{map_path}: entry {asin!r} must be [item_id, domain], got {val!r}")
        item_id, dom = val
        if not 0 <= dom < n_domains:
            raise DataFormatError(f"{map_path}: entry {asin!r} has domain {dom}, but data.domains has {n_domains}")
        out[str(item_id)] = dom
    return out


def read_abxi(folder: str | Path, n_domains: int = 2, max_lines: int | None = None) -> Iterator[Event]:
    """Events of an ABXI folder, user by user in file order."""
    seq_path, map_path = _abxi_files(Path(folder))
    domain_of = read_abxi_item_domains(map_path, n_domains)
    with seq_path.open() as f:
        for lineno, line in enumerate(f, 1):
            if max_lines is not None and lineno > max_lines:
                return
            parts = line.split()
            if not parts:
                raise DataFormatError(f"{seq_path}:{lineno}: empty line")
            user = parts[0]
            if not user.isdigit():
                raise DataFormatError(f"{seq_path}:{lineno}: user id {user!r} is not a non-negative integer")
            if len(parts) < 2:
                raise DataFormatError(f"{seq_path}:{lineno}: user {user} has no events")
            for tok in parts[1:]:
                item, sep, ts = tok.partition("|")
                if not sep or not item.isdigit() or not ts.lstrip("-").isdigit():
                    raise DataFormatError(f"{seq_path}:{lineno}: event {tok!r} is not <item_id>|<unix_ts>")
                dom = domain_of.get(item)
                if dom is None:
                    raise DataFormatError(f"{seq_path}:{lineno}: item {item} is not in {map_path.name}")
                yield Event(user, item, float(ts), dom)


def read_table(path: str | Path, cols: TableConfig, domains: list[str]) -> Iterator[Event]:
    """Events of a CSV/TSV table with a header row naming the columns in ``cols``."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: interaction table does not exist")
    delim = cols.delimiter or ("," if path.suffix.lower() == ".csv" else "\t")
    dom_index = {d: i for i, d in enumerate(domains)}
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}:1: file is empty, expected a header row") from None
        want = {"user": cols.user, "item": cols.item, "timestamp": cols.timestamp, "domain": cols.domain}
        idx = {}
        for role, name in want.items():
            if name not in header:
                raise DataFormatError(f"{path}:1: header {header} has no column {name!r} "
                                      f"(data.table.{role})")
            idx[role] = header.index(name)
        width = len(header)
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != width:
                raise DataFormatError(f"{path}:{lineno}: expected {width} fields, got {len(row)}: {row!r}")
            try:
                ts = float(row[idx["timestamp"]])
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: timestamp {row[idx['timestamp']]!r} is not a number") from None
            d = row[idx["domain"]]
            if d not in dom_index:
                raise DataFormatError(f"{path}:{lineno}: domain {d!r} is not one of data.domains {domains}")
            user, item = row[idx["user"]], row[idx["item"]]
            if not user or not item:
                raise DataFormatError(f"{path}:{lineno}: empty user or item id")
            yield Event(user, item, ts, dom_index[d])
