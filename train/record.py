"""A run's record, ``runs/<name>/metrics.json``, read and written through one typed object.

On disk (schema 2; schema 1, the files written before the schema was recorded, read the same)::

    {"<stage>": {"valid": {domain: {protocol: metrics}}, "test": {...}}, ...,
     "transfer": {...paired bootstrap...},
     "_meta": {"schema": 2, "world_size": N, "launcher": "...", "eval": {protocol fields},
               "provenance": {"run_id", "git_commit", "config_sha256", "data_fingerprint"},
               "<stage>": {"done": true, "best_epoch": ..., "steps": ..., "epoch_losses": [...],
                           "wall_s": ..., "nonfinite_skipped": ..., "init_from": "..."},
               "stopped": {...}, "wall_s": ..., "reevaluated_s": ...}}

Written atomically and as strict JSON (a NaN or infinity is an error naming its key).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from train.config import STAGES, unit_stage
from train.protocol import recorded_protocol
from train.files import finite_json, write_atomic

SCHEMA = 2


class RecordError(ValueError):
    """A metrics.json cannot be read; the message names it."""


def transfer_entries(transfer: dict | None) -> list[dict]:
    """A record's (or report's) transfer as a list of per-domain entries: one target records its
    entry itself, several a ``{domain: entry}`` dict."""
    if not transfer:
        return []
    return [transfer] if "domain" in transfer else list(transfer.values())


class DataMismatch(ValueError):
    """Weights or results made on one prepared data set were about to be used with another; the
    message names both data fingerprints."""


def check_same_data(recorded: dict, manifest: dict, *, what: str, folder) -> None:
    """DataMismatch when ``recorded`` (a provenance: metrics.json's or an export's) names another
    data fingerprint than the prepared data's ``manifest`` in ``folder``; records made before
    provenance was recorded are not checked."""
    theirs, ours = recorded.get("data_fingerprint"), manifest.get("fingerprint")
    if theirs and theirs != ours:
        raise DataMismatch(f"{what} was made on data with fingerprint {theirs}, but {folder} holds data with "
                           f"fingerprint {ours}: its item ids would mean other items; use the data it was made on")


@dataclass
class StageRecord:
    """One stage: its metrics (``valid``/``test`` per domain) and its training record (``meta``:
    ``done``, ``best_epoch``, ``steps``, ``epoch_losses``, ``wall_s``, ...)."""

    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return bool(self.meta.get("done"))


@dataclass
class RunRecord:
    stages: dict[str, StageRecord] = field(default_factory=dict)
    transfer: dict | None = None
    world_size: int | None = None
    launcher: str | None = None
    protocol: dict | None = None  # the evaluation protocol the metrics were measured under
    stopped: dict | None = None
    times: dict = field(default_factory=dict)  # wall_s, reevaluated_s
    # where the results come from: run_id (one per run, kept across resumes), git_commit,
    # config_sha256 (of config.yaml), data_fingerprint (the prepared data's manifest)
    provenance: dict = field(default_factory=dict)
    schema: int = SCHEMA

    def stage(self, name: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord())

    def finished(self) -> list[str]:
        """The finished units, in run order."""
        return [u for u in self.units() if self.stages[u].done]

    def units(self) -> list[str]:
        """The units recorded, in run order (by stage, then name)."""
        return sorted(self.stages, key=lambda u: (STAGES.index(unit_stage(u)), u))

    def recorded_protocol(self) -> dict | None:
        """The protocol with every field (one recorded after the run was made counts as its default)."""
        return recorded_protocol(self.protocol) if self.protocol else None

    def to_json(self) -> dict:
        meta = {"schema": self.schema, "world_size": self.world_size, "launcher": self.launcher, "eval": self.protocol,
                "provenance": self.provenance or None, **{s: r.meta for s, r in self.stages.items() if r.meta},
                **self.times}
        if self.stopped:
            meta["stopped"] = self.stopped
        out = {s: r.metrics for s, r in self.stages.items() if r.metrics}
        if self.transfer:
            out["transfer"] = self.transfer
        return {**out, "_meta": {k: v for k, v in meta.items() if v is not None}}

    @classmethod
    def from_json(cls, d: dict) -> "RunRecord":
        meta = d.get("_meta", {})
        keys = [k for k in {**d, **meta} if unit_stage(k) in STAGES]  # stages, and target_only-<domain> units
        stages = {s: StageRecord(d.get(s, {}), meta.get(s, {})) for s in keys}
        return cls(stages=stages, transfer=d.get("transfer"), world_size=meta.get("world_size"),
                   launcher=meta.get("launcher"), protocol=meta.get("eval"), stopped=meta.get("stopped"),
                   times={k: meta[k] for k in ("wall_s", "reevaluated_s") if k in meta},
                   provenance=dict(meta.get("provenance") or {}), schema=meta.get("schema", 1))

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        """The record at ``path`` (an empty one when absent); RecordError naming it when unreadable."""
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise RecordError(f"{path}: not valid JSON ({e}); it cannot be resumed or reported") from None
        if not isinstance(d, dict) or d.get("_meta", {}).get("schema", 1) > SCHEMA:
            raise RecordError(f"{path}: not a metrics.json this xdrec reads (schema {SCHEMA} or older)")
        return cls.from_json(d)

    def save(self, path: Path) -> None:
        write_atomic(path, finite_json(self.to_json(), what=str(path)), point="metrics.json")
