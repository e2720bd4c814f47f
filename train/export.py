"""``xdrec export``: consolidate a stage's best ZeRO checkpoint (any stage 0-3, any world size)
into ``model.safetensors`` + ``config.yaml`` + ``domains.json`` (+ ``item_map.json``), which
``load_exported`` (``xdrec recommend``, ``xdrec evaluate``) reads with plain torch, no DeepSpeed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from train.checkpoint import load_data, verify_data_only
from train.config import STAGES, load_config, save_config, unit_stage
from train.data.prepare import load_manifest
from train.record import RunRecord, check_same_data
from train.stages import build_model, own_domain_input, stage_domains

SCHEMA = 1


class ExportError(ValueError):
    """A checkpoint or export folder is missing or does not match; the message names the path."""


def consolidated_state_dict(ckpt_dir: Path, tag: str = "best") -> dict:
    """fp32 state dict of a DeepSpeed checkpoint, whatever its ZeRO stage and world size."""
    folder = ckpt_dir / tag
    if not folder.is_dir():
        raise ExportError(f"{folder}: no checkpoint (train the stage first)")
    if list(folder.glob("*zero_pp_rank_*")):  # ZeRO 1-3: the fp32 master weights live in the shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_data_only(folder)  # DeepSpeed's reader unpickles: proven data first
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = folder / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportError(f"{folder}: neither ZeRO shards nor {states.name}")
    return {k: v.float() for k, v in load_data(states, deepspeed_types=True)["module"].items()}


def export(run_dir: str | Path, out: str | Path, *, stage: str = "joint", domain: str | None = None) -> Path:
    """Consolidate ``stage``'s best weights (``target_only`` of several targets: ``domain``'s) into ``out``."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir / 'config.yaml'} is missing: not a run folder (runs/<name>)")
    cfg = load_config(run_dir / "config.yaml")
    stage = _unit(cfg, stage, domain)
    manifest = load_manifest(cfg.data.prepared_dir(), verify=False)
    provenance = RunRecord.load(run_dir / "metrics.json").provenance
    check_same_data(provenance, manifest, what=str(run_dir), folder=cfg.data.prepared_dir())
    state = consolidated_state_dict(run_dir / stage / "checkpoints")
    model = build_model(cfg, manifest, domains=stage_domains(stage, cfg))  # the stage's own model, views and all
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{run_dir / stage}: checkpoint does not match the model of {run_dir / 'config.yaml'}: "
                          f"missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    provenance = {**provenance, "data_fingerprint": manifest.get("fingerprint"), "run": str(run_dir)}
    (out / "domains.json").write_text(json.dumps({"schema": SCHEMA, "stage": unit_stage(stage), "unit": stage,
                                                  "domains": manifest["domains"],
                                                  "source": cfg.data.source, "target": cfg.data.target,
                                                  "evaluated": stage_domains(stage, cfg),
                                                  "input": "own_domain" if own_domain_input(stage, cfg) else "mixed",
                                                  "provenance": provenance}, indent=1))
    item_map = cfg.data.prepared_dir() / "item_map.json"
    if item_map.is_file():
        shutil.copy(item_map, out / "item_map.json")
    return out


def _unit(cfg, stage: str, domain: str | None) -> str:
    """The unit an export names: the stage, or the target-only baseline of ``domain``."""
    targets = cfg.data.targets()
    if stage != "target_only":
        if domain:
            raise ExportError(f"--domain {domain}: only --stage target_only has one model per target domain")
        return stage
    if domain is None and len(targets) > 1:
        raise ExportError(f"--stage target_only: this run has a baseline per target domain {targets}; name one with --domain")
    if domain is not None and domain not in targets:
        raise ExportError(f"--domain {domain!r} is not one of this run's target domains {targets}")
    return cfg.baseline_unit(domain or targets[0])


def load_info(folder: str | Path) -> dict:
    """An export's ``domains.json`` (stage, domains, source, target, provenance), its layout checked."""
    path = Path(folder) / "domains.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: not an xdrec export folder")
    try:
        info = json.loads(path.read_text())
        names = [str(d["name"]) for d in info["domains"]]
        [(int(d["n_items"]), int(d["offset"])) for d in info["domains"]]
        if info["stage"] not in STAGES or not names:
            raise ValueError(f"stage {info['stage']!r}")
        # exports written before these were recorded: the policy and domains their stage had then
        only = info["stage"] == "target_only"
        info.setdefault("unit", info["stage"])
        info.setdefault("evaluated", [info["target"]] if only else names)
        info.setdefault("input", "own_domain" if only else "mixed")
        if not set(info["evaluated"]) <= set(names) or info["input"] not in ("own_domain", "mixed"):
            raise ValueError(f"evaluated {info['evaluated']!r}, input {info['input']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not an xdrec export's domains.json ({type(e).__name__}: {e})") from None
    return info


def load_exported(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, domains.json) from an export folder; plain torch."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("model.safetensors", "config.yaml", "domains.json"):
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing: not an xdrec export folder")
    cfg = load_config(folder / "config.yaml")
    info = load_info(folder)
    model = build_model(cfg, {"domains": info["domains"]}, domains=info["evaluated"])
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except RuntimeError as e:
        raise ExportError(f"{folder / 'model.safetensors'} does not match {folder / 'config.yaml'}: {e}") from None
    return model.eval(), info


def _history_ids(folder: Path, history: list[str], n_total: int, internal: bool) -> list[int]:
    """xdrec ids of a history given as original ids (item_map.json) or, ``internal``, as xdrec ids."""
    if internal:
        try:
            ids = [int(h) for h in history]
        except ValueError as e:
            raise ExportError(f"--history: {e.args[0].split(': ')[-1]} is not an xdrec item id (--internal takes "
                              "integers; drop it for the data's own ids)") from None
        bad = [i for i in ids if not 1 <= i <= n_total]
        if bad:
            raise ExportError(f"--history: no xdrec item id {bad[0]} (this model has ids 1..{n_total})")
        return ids
    mapping = folder / "item_map.json"
    if not mapping.is_file():
        raise ExportError(f"{mapping} is missing: give xdrec item ids with --internal")
    to_id = json.loads(mapping.read_text())
    unknown = [h for h in history if h not in to_id]
    if unknown:
        raise ExportError(f"--history: item {unknown[0]!r} is not in {mapping} ({len(unknown)} of {len(history)} "
                          "unknown; --internal takes xdrec ids)")
    return [to_id[h] for h in history]


def recommendations(folder: str | Path, domain: str, history: list[str], *, k: int = 10, internal: bool = False,
                    include_history: bool = False) -> list[tuple[str, float]]:
    """The ``k`` best items of ``domain`` after ``history`` (oldest first) with their scores, by
    the model's scores alone; items of the history are left out unless ``include_history``. Ids
    are the data's own (``item_map.json``), or xdrec's with ``internal``."""
    folder = Path(folder)
    model, info = load_exported(folder)
    names = [d["name"] for d in info["domains"]]
    if domain not in info["evaluated"]:
        raise ExportError(f"--domain {domain!r}: this export (stage {info['stage']}) scores {info['evaluated']}"
                          + (f" of {names}" if len(names) > len(info["evaluated"]) else ""))
    hist = _history_ids(folder, history, sum(d["n_items"] for d in info["domains"]), internal)
    if info["input"] == "own_domain":  # the stage saw its domain's events alone: so does its export
        lo, hi = model.ranges[names.index(domain)]
        hist = [i for i in hist if lo <= i < hi]
    max_len = model.embedding.position.num_embeddings
    hist = hist[-max_len:]
    items = torch.zeros(1, max_len, dtype=torch.long)
    items[0, max_len - len(hist):] = torch.tensor(hist)
    top, scores = model.recommend(items, names.index(domain), k=k, exclude_history=not include_history)
    to_raw = {} if internal else {v: key for key, v in json.loads((folder / "item_map.json").read_text()).items()}
    return [(to_raw.get(i, str(i)), float(v)) for i, v in zip(top[0].tolist(), scores[0].tolist())]


def evaluate_exported(folder: str | Path, *, splits=("valid", "test"), without: str | None = None) -> dict:
    """Metrics of an exported model on its prepared data, single process, no DeepSpeed:
    ``{split: {domain: {"full": ..., "sampled999": ...}}}`` as in ``metrics.json``. ``without``
    (one of ``train.evaluate.ABLATIONS``): the same users and candidates, with that part of each
    input taken out (what does the model get from the latest event, or from the other domains)."""
    from train.evaluate import Evaluator, without as ablate

    model, info = load_exported(folder)
    cfg = load_config(Path(folder) / "config.yaml")
    manifest = load_manifest(cfg.data.prepared_dir())
    check_same_data(info.get("provenance", {}), manifest, what=f"the export {folder}", folder=cfg.data.prepared_dir())
    ev = Evaluator(manifest, cfg.data.prepared_dir(), cfg.eval, max_len=cfg.model.max_len)
    only = info["input"] == "own_domain"

    def score(items, dom, consume):
        if without:
            items = ablate(items, without, ev.vocab.offsets[dom], ev.vocab.sizes[dom])
        return model(items, domain=dom, consume=consume)

    with torch.no_grad():
        return {split: {d: ev.evaluate(score, d, split, only_domain=only, device=torch.device("cpu"))
                        for d in info["evaluated"]} for split in splits}
