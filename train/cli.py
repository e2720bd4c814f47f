"""``xdrec`` command line: thin entry points over the library.

    xdrec prepare configs/experiment/<x>.yaml [a.b=value ...]
    xdrec train   configs/experiment/<x>.yaml [a.b=value ...]
"""
from __future__ import annotations

import argparse
import functools
import sys

from train.config import ConfigError, load_config
from train.data.formats import DataFormatError
from train.data.prepare import ManifestError
from train.checkpoint import ResumeError
from train.engine import LaunchConflict


_log = functools.partial(print, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdrec", description="Cross-domain Transformer recommenders on DeepSpeed.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("prepare", "raw interactions -> WebDataset shards + manifest.json"),
                        ("train", "run the stages the experiment lists, write runs/<name>/metrics.json")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="experiment YAML, e.g. configs/experiment/demo.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4")
        if name == "train":
            s.add_argument("--resume", choices=("auto", "never"), default="never",
                           help="auto: skip finished stages and continue the latest resume checkpoint "
                                "of runs/<name>/ (same world size); never: start afresh (default)")
    return p


def cmd_prepare(args) -> int:
    from train.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, log=_log)
    return 0


def cmd_train(args) -> int:
    from train.loop import StageInterrupted
    from train.stages import Experiment, format_table

    cfg = load_config(args.config, args.overrides)
    exp = Experiment(cfg, log=_log, resume=args.resume == "auto")
    try:
        results = exp.run()
    except StageInterrupted as e:
        if exp.env.is_main:
            print(f"{e}\ncontinue with: xdrec train {args.config} ... --resume auto", flush=True)
        return 0
    if exp.env.is_main:
        print(f"\nTest metrics ({cfg.data.name}; source {cfg.data.source} -> target {cfg.data.target}):")
        print(format_table(results, cfg.data.target, cfg.data.source))
        tj = results.get("joint", {}).get("test", {}).get(cfg.data.target)
        tt = results.get("target_only", {}).get("test", {}).get(cfg.data.target)
        if tj and tt:
            for proto in ("full", "sampled999"):
                a, b = tj[proto]["ndcg@10"], tt[proto]["ndcg@10"]
                print(f"{cfg.data.target} NDCG@10 ({proto}): source-then-joint {a:.4f} vs target-only {b:.4f}"
                      f" ({'+' if a >= b else ''}{(a - b) / max(b, 1e-12) * 100:.1f}%)")
        print(f"metrics: {exp.run_dir / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"prepare": cmd_prepare, "train": cmd_train}[args.cmd](args)
    except (ConfigError, DataFormatError, ManifestError, LaunchConflict, ResumeError) as e:
        print(f"xdrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
