"""Readers for raw interaction files. Each yields :class:`Event` rows in file order.

- ABXI line format (``../shared/data/*/``): ``<user> <item>|<unix_ts> <item>|<unix_ts> ...`` per
  line, plus ``map_item_*.txt`` = JSON ``{asin: [item_id, domain_index]}`` giving each item's domain.
- Interaction tables: CSV, TSV (``.gz`` too), Parquet (read in record batches) and JSON lines
  (``.jsonl``/``.json``/``.ndjson``, ``.gz`` too), columns named by ``data.table``; the domain
  comes from a column (one table for every domain) or from the file (``data.files``).
- Amazon review JSON lines (2014/2018 releases): ``reviewerID``, ``asin``, ``unixReviewTime``,
  ``overall``; one file per category = domain.

A malformed line raises :class:`DataFormatError` naming the file and the 1-based line number
(the row number for Parquet).
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Iterator, NamedTuple

from train.config import DataConfig, TableConfig

_DIGITS = re.compile(r"[0-9]+")
AMAZON_COLUMNS = TableConfig(user="reviewerID", item="asin", timestamp="unixReviewTime", rating="overall")


class DataFormatError(ValueError):
    """Raw data does not parse; the message names the file and line."""


class Event(NamedTuple):
    user: str  # raw user id
    item: str  # raw item id
    ts: float
    domain: int  # index into data.domains
    rating: float = math.nan


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
        raw = json.loads(map_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{map_path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{map_path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{map_path}: expected a JSON object {{asin: [item_id, domain]}}, got a "
                              f"{type(raw).__name__}")
    out: dict[str, int] = {}
    for asin, val in raw.items():
        if not (isinstance(val, list) and len(val) == 2 and all(isinstance(v, int) for v in val)):
            raise DataFormatError(f"{map_path}: entry {asin!r} must be [item_id, domain], got {val!r}")
        item_id, dom = val
        if not 0 <= dom < n_domains:
            raise DataFormatError(f"{map_path}: entry {asin!r} has domain {dom}, but data.domains has {n_domains}")
        out[str(item_id)] = dom
    return out


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    yield from enumerate(_text_lines(path), 1)


def read_abxi(folder: str | Path, n_domains: int = 2, max_lines: int | None = None) -> Iterator[Event]:
    """Events of an ABXI folder, user by user in file order."""
    seq_path, map_path = _abxi_files(Path(folder))
    domain_of = read_abxi_item_domains(map_path, n_domains)
    for lineno, line in _guarded(seq_path, _numbered_lines(seq_path)):
        if max_lines is not None and lineno > max_lines:
            return
        parts = line.split()
        if not parts:
            raise DataFormatError(f"{seq_path}:{lineno}: empty line")
        user = parts[0]
        if not _DIGITS.fullmatch(user):
            raise DataFormatError(f"{seq_path}:{lineno}: user id {user!r} is not a non-negative integer")
        if len(parts) < 2:
            raise DataFormatError(f"{seq_path}:{lineno}: user {user} has no events")
        for tok in parts[1:]:
            item, sep, ts = tok.partition("|")
            if not sep or not _DIGITS.fullmatch(item) or not _DIGITS.fullmatch(ts.removeprefix("-")):
                raise DataFormatError(f"{seq_path}:{lineno}: event {tok!r} is not <item_id>|<unix_ts>")
            dom = domain_of.get(item)
            if dom is None:
                raise DataFormatError(f"{seq_path}:{lineno}: item {item} is not in {map_path.name}")
            yield Event(user, item, float(ts), dom)


def expand_files(patterns: list[str], what: str) -> list[Path]:
    """Paths of ``patterns`` (plain paths or globs), each pattern matching at least one file."""
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if Path(pat).is_file() else [])
        if not hits:
            raise DataFormatError(f"{what}: {pat} matches no file")
        out += [Path(h) for h in hits]
    return out


def table_files(cfg: DataConfig) -> list[tuple[Path, int | None]]:
    """(file, domain index or None = read the domain column) of a table/amazon config."""
    if cfg.files:
        return [(p, cfg.domains.index(dom)) for dom, pats in cfg.files.items()
                for p in expand_files(pats, f"data.files.{dom}")]
    return [(p, None) for p in expand_files([cfg.path], "data.path")]


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for kind, ends in (("csv", (".csv",)), ("tsv", (".tsv", ".txt")), ("parquet", (".parquet", ".pq")),
                       ("jsonl", (".jsonl", ".json", ".ndjson"))):
        if name.endswith(ends):
            return kind
    raise DataFormatError(f"{path}: unknown table type (expected .csv, .tsv, .txt, .parquet, .jsonl, .json, "
                          ".ndjson, optionally .gz)")


def _text_lines(path: Path) -> Iterator[str]:
    """Lines of a text file (``.gz`` too), decoded one by one so a bad byte names its line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not in the header
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}:{lineno}: not UTF-8 text") from None


def _guarded(path: Path, rows: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """Turn decoding failures of a text table (bad UTF-8, NUL bytes, a cut .gz) into named errors."""
    lineno = 0
    try:
        for lineno, row in rows:
            yield lineno, row
    except csv.Error as e:
        raise DataFormatError(f"{path}:{lineno + 1}: unreadable CSV row: {e}") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataFormatError(f"{path}: after line {lineno}: unreadable compressed file: {e}") from None


def _csv_rows(path: Path, delim: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(_text_lines(path), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}:1: file is empty, expected a header row") from None
    width = len(header)
    for row in reader:
        if not row:
            continue
        if len(row) != width:
            raise DataFormatError(f"{path}:{reader.line_num}: expected {width} fields, got {len(row)}: {row!r}")
        yield reader.line_num, dict(zip(header, row))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: not a JSON object: {e.msg}") from None
        except RecursionError:
            raise DataFormatError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(f"{path}: not a readable Parquet file: {e}") from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataFormatError(f"{path}: columns {pf.schema_arrow.names} lack {missing}")
    row = 0
    for batch in pf.iter_batches(batch_size=65536, columns=columns):  # bounded memory
        cols = batch.to_pydict()
        for k in range(batch.num_rows):
            row += 1
            yield row, {c: cols[c][k] for c in columns}


def _timestamp(v) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        ts = float(v)
    elif isinstance(v, str):
        try:
            ts = float(v)
        except ValueError:
            ts = datetime.fromisoformat(v.strip()).timestamp()
    elif isinstance(v, datetime):
        ts = v.timestamp()
    else:
        raise ValueError(v)
    if not math.isfinite(ts):
        raise ValueError(v)
    return ts


def read_table(path: str | Path, cols: TableConfig, domains: list[str], domain: int | None = None) -> Iterator[Event]:
    """Events of one table file; ``domain`` fixes every row's domain, else the domain column is read."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: interaction table does not exist")
    kind = _kind(path)
    want = {"user": cols.user, "item": cols.item, "timestamp": cols.timestamp}
    if domain is None:
        want["domain"] = cols.domain
    if cols.rating:
        want["rating"] = cols.rating
    if kind == "parquet":
        rows = _parquet_rows(path, list(want.values()))
    elif kind == "jsonl":
        rows = _guarded(path, _jsonl_rows(path))
    else:
        rows = _guarded(path, _csv_rows(path, cols.delimiter or ("," if kind == "csv" else "\t")))
    dom_index = {d: i for i, d in enumerate(domains)}
    where = "line" if kind != "parquet" else "row"
    for lineno, row in rows:
        for role, name in want.items():
            if name not in row:
                raise DataFormatError(f"{path}:{lineno}: no field {name!r} (data.table.{role}); {where} has "
                                      f"{sorted(map(str, row))[:12]}")
        user, item = row[want["user"]], row[want["item"]]
        if isinstance(user, bool) or isinstance(item, bool) or not isinstance(user, (str, int)) \
                or not isinstance(item, (str, int)) or user == "" or item == "":
            raise DataFormatError(f"{path}:{lineno}: user {user!r} / item {item!r} must be non-empty strings or integers")
        try:
            ts = _timestamp(row[want["timestamp"]])
        except (ValueError, TypeError, OverflowError, OSError):
            raise DataFormatError(f"{path}:{lineno}: timestamp {row[want['timestamp']]!r} is not a number "
                                  "or an ISO-8601 time") from None
        d = domain
        if d is None:
            d = dom_index.get(str(row[want["domain"]]))
            if d is None:
                raise DataFormatError(f"{path}:{lineno}: domain {row[want['domain']]!r} is not one of "
                                      f"data.domains {domains}")
        rating = math.nan
        if "rating" in want:
            try:
                rating = float(row[want["rating"]])
            except (ValueError, TypeError):
                raise DataFormatError(f"{path}:{lineno}: rating {row[want['rating']]!r} is not a number") from None
        yield Event(str(user), str(item), ts, d, rating)


def read_files(cfg: DataConfig) -> Iterator[Event]:
    """Every event of a ``table`` or ``amazon`` config, file after file."""
    cols = AMAZON_COLUMNS if cfg.format == "amazon" else cfg.table
    for path, dom in table_files(cfg):
        yield from read_table(path, cols, cfg.domains, dom)
