"""``xdrec`` command line: thin entry points over the library.

    xdrec prepare configs/experiment/<x>.yaml [a.b=value ...]
    xdrec train   configs/experiment/<x>.yaml [a.b=value ...] [--resume auto | --reevaluate]
    xdrec data verify|stats data/prepared/<name>
    xdrec export  runs/<name> [--stage joint]          -> runs/<name>/export-joint/model.safetensors
    xdrec evaluate runs/<name>/export-joint [--split test]
    xdrec recommend runs/<name>/export-joint --domain B --history 3 17 42 [-k 10]
    xdrec report  runs/<name>-seed0 runs/<name>-seed1 ... [--out report.json]
    xdrec plan    configs/experiment/<x>.yaml [a.b=value ...] [--world-size N] [--memory-per-rank 80GiB]
"""
from __future__ import annotations

import argparse
import functools
import shlex
import sys

from launch import signals

# Exit status of a run stopped by SIGUSR1 after writing its resume checkpoint (EX_TEMPFAIL:
# "try again"); slurm/job.sh requeues the job on it. A run stopped by train.stop_after_steps
# exits 0: the user asked for that stop.
EXIT_PREEMPTED = 75

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
            s.add_argument("--overwrite", action="store_true",
                           help="start afresh even where runs/<name>/ holds an earlier run: it is moved aside "
                                "to runs/<name>.old-<time> (without this flag such a folder is refused)")
            s.add_argument("--reevaluate", action="store_true",
                           help="train nothing: evaluate the finished stages of runs/<name>/ again from their "
                                "best weights under this config's eval keys (e.g. a new eval.prior or "
                                "eval.transition) and rewrite their metrics, test ranks and the transfer interval")
    d = sub.add_parser("data", help="inspect a prepared folder")
    d.add_argument("action", choices=("verify", "stats"), help="verify: re-hash and re-count every shard; "
                   "stats: users/items/events per domain, overlap, sequence lengths")
    d.add_argument("folder", help="data/prepared/<name>")
    e = sub.add_parser("export", help="best ZeRO checkpoint of a stage -> model.safetensors + config")
    e.add_argument("run_dir", help="runs/<name>")
    e.add_argument("--stage", default="joint", choices=("source", "joint", "target_only"))
    e.add_argument("--out", default=None, help="default: <run_dir>/export-<stage>")
    v = sub.add_parser("evaluate", help="metrics of an exported model on its prepared data (no DeepSpeed)")
    v.add_argument("export_dir")
    v.add_argument("--split", default="test", choices=("valid", "test"))
    r = sub.add_parser("recommend", help="top-k items of a domain for one history (no DeepSpeed)")
    r.add_argument("export_dir")
    r.add_argument("--domain", required=True)
    r.add_argument("--history", nargs="+", required=True, help="item ids, oldest first (raw ids with --raw)")
    r.add_argument("--raw", action="store_true", help="history and output use the raw ids of item_map.json")
    r.add_argument("-k", type=int, default=10)
    pl = sub.add_parser("plan", help="parameters by part and predicted memory per rank under ZeRO 0-3",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("config", help="experiment YAML")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=1024")
    pl.add_argument("--world-size", type=int, default=1, help="ranks the model is sharded over")
    pl.add_argument("--memory-per-rank", default=None,
                    help="e.g. 80GiB; default: the GPU's memory, or this machine's RAM / world size")
    rp = sub.add_parser("report", help="mean and std over runs (seeds) of the test metrics and transfer intervals")
    rp.add_argument("run_dirs", nargs="+", help="runs/<name> folders holding metrics.json")
    rp.add_argument("--out", default=None, help="also write the aggregate as JSON here")
    return p


def cmd_report(args) -> int:
    import json
    from pathlib import Path

    from train.report import aggregate, format_report

    agg = aggregate(args.run_dirs)
    print(format_report(agg))
    if args.out:
        Path(args.out).write_text(json.dumps(agg, indent=1))
    return 0


def cmd_plan(args) -> int:
    from train.config import load_config
    from train.plan import default_memory, parse_bytes, plan, vocabulary

    cfg = load_config(args.config, args.overrides)
    memory, cpu = default_memory(args.world_size)
    if args.memory_per_rank:
        memory = parse_bytes(args.memory_per_rank)
    print(plan(cfg, vocabulary(cfg), world=args.world_size, memory=memory, cpu=cpu))
    return 0


def cmd_data(args) -> int:
    import json

    from train.data.inspect import empty_splits, stats, verify

    if args.action == "verify":
        counts = verify(args.folder)
        print(f"{args.folder}: every shard matches its sha256 and sample count: {json.dumps(counts)}")
        for where in empty_splits(counts):
            print(f"warning: {where} holds no samples: no user's {where.split('/')[1]} event falls in that domain; "
                  "an experiment that trains, selects or reports on it is refused", file=sys.stderr)
    else:
        print(json.dumps(stats(args.folder), indent=1))
    return 0


def cmd_export(args) -> int:
    from train.export import export

    out = export(args.run_dir, args.out or f"{args.run_dir.rstrip('/')}/export-{args.stage}", stage=args.stage)
    print(f"exported {args.stage} to {out}")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from train.export import evaluate_exported

    print(json.dumps(evaluate_exported(args.export_dir, splits=(args.split,)), indent=1))
    return 0


def cmd_recommend(args) -> int:
    import json
    from pathlib import Path

    import torch

    from train.export import ExportError, load_exported

    model, info = load_exported(args.export_dir)
    names = [d["name"] for d in info["domains"]]
    if args.domain not in names:
        raise ExportError(f"--domain {args.domain!r} is not one of {names}")
    to_id, to_raw = {}, {}
    if args.raw:
        to_id = json.loads((Path(args.export_dir) / "item_map.json").read_text())
        to_raw = {v: k for k, v in to_id.items()}
    try:
        hist = [to_id[h] if args.raw else int(h) for h in args.history]
    except (KeyError, ValueError) as e:
        raise ExportError(f"--history item {e} is not a known item id") from None
    max_len = model.embedding.position.num_embeddings
    items = torch.zeros(1, max_len, dtype=torch.long)
    hist = hist[-max_len:]
    items[0, max_len - len(hist):] = torch.tensor(hist)
    top = model.recommend(items, names.index(args.domain), k=args.k)[0].tolist()
    print(" ".join(str(to_raw.get(i, i)) if args.raw else str(i) for i in top))
    return 0


def cmd_prepare(args) -> int:
    from train.config import load_config
    from train.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, log=_log)
    return 0


def cmd_train(args) -> int:
    from train.config import load_config
    from train.engine import teardown_distributed
    from train.loop import StageInterrupted
    from train.evaluate import PROTOCOLS, protocol_label
    from train.experiment import Experiment
    from train.stages import format_table

    signals.install_interrupts()  # Ctrl-C / SIGTERM from here on: checkpoint at the next step
    cfg = load_config(args.config, args.overrides)
    exp = Experiment(cfg, log=_log, resume=args.resume == "auto", reevaluate=args.reevaluate,
                     overwrite=args.overwrite)
    # On a clean end (finished or stopped on request) every rank tears the process group down
    # together: left to exit-time destructors, a gloo rank sometimes aborted ("terminate called
    # without an active exception"). On an error no barrier is attempted: the launcher stops the rest.
    try:
        results = exp.run()
    except StageInterrupted as e:
        teardown_distributed()
        if exp.env.is_main:
            again = shlex.join(["xdrec", "train", args.config, *args.overrides, "--resume", "auto"])
            print(f"{e}\nstopped; resume with: {again}", flush=True)
        return EXIT_PREEMPTED if e.preempted else (128 + e.signal if e.signal else 0)
    finally:
        exp.close()
    teardown_distributed()
    if exp.env.is_main:
        print(f"\nTest metrics ({cfg.data.name}; source {cfg.data.source} -> target {cfg.data.target}):")
        print(format_table(results, cfg.data.target, cfg.data.source))
        tj = results.get("joint", {}).get("test", {}).get(cfg.data.target)
        tt = results.get("target_only", {}).get("test", {}).get(cfg.data.target)
        if tj and tt:
            for proto in PROTOCOLS:
                a, b = tj[proto]["ndcg@10"], tt[proto]["ndcg@10"]
                label = protocol_label(proto, cfg.eval.num_negatives)
                print(f"{cfg.data.target} NDCG@10, {label}: source-then-joint {a:.4f} vs target-only {b:.4f}"
                      f" ({'+' if a >= b else ''}{(a - b) / max(b, 1e-12) * 100:.1f}%)")
        print(f"metrics: {exp.run_dir / 'metrics.json'}")
    return 0


def _exit_now_if_distributed(code: int) -> None:
    """Under a multi-process launcher, leave without running C++ static destructors: gloo's
    background threads made a rank abort at interpreter exit ("terminate called without an
    active exception", SIGABRT) about once in ten runs even after the process group was
    destroyed, turning a finished run into a failed one. Output is flushed first; files and the
    W&B run are closed by then."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here, after entry() installed the signal handler: importing torch and DeepSpeed
    # takes seconds, and a SIGUSR1 in that window would otherwise kill the process.
    from launch.env import LaunchError
    from train.checkpoint import CheckpointError, ResumeError
    from train.config import ConfigError
    from train.data.formats import DataFormatError
    from train.data.prepare import ManifestError
    from train.data.stream import ShardError
    from train.engine import LaunchConflict
    from train.evaluate import NonFiniteScores
    from train.export import ExportError
    from train.files import DiskFullError, NonFiniteValue, free_space, is_disk_full
    from train.loop import NonFiniteError
    from train.record import RecordError
    from train.report import ReportError
    from train.runlock import RunLocked

    try:
        return {"prepare": cmd_prepare, "train": cmd_train, "data": cmd_data, "export": cmd_export,
                "evaluate": cmd_evaluate,
                "recommend": cmd_recommend, "report": cmd_report, "plan": cmd_plan}[args.cmd](args)
    except (ConfigError, DataFormatError, ManifestError, LaunchConflict, LaunchError, ResumeError,
            ExportError, ReportError, ShardError, NonFiniteError, NonFiniteScores, NonFiniteValue, CheckpointError,
            DiskFullError, RunLocked, RecordError) as e:
        # every rank raises these alike: rank 0 says it once; other errors are each rank's own
        collective = (ConfigError, LaunchConflict, ResumeError, RunLocked, NonFiniteError, NonFiniteScores,
                      CheckpointError)
        import os

        if not isinstance(e, collective) or os.environ.get("RANK", "0") == "0":
            print(f"xdrec: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"xdrec: error: no space left on device writing {e.filename} ({free_space(e.filename or '.')} free "
              "there)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        import os

        print(f"xdrec: error: rank {os.environ.get('RANK', '0')} ran out of memory ({one_line(e)[:200]}); "
              f"`xdrec plan {getattr(args, 'config', '<experiment>')} --world-size N` predicts the memory per rank "
              "of each ZeRO stage", file=sys.stderr)
        return 2


def out_of_memory(e: BaseException) -> bool:
    """An allocation failed: Python's MemoryError, torch's CPU allocator or a CUDA out-of-memory."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def one_line(e: Exception) -> str:
    """The error's own message on one line: an error re-raised from a DataLoader worker carries the
    worker's traceback in its message; its last line is the original message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def entry() -> None:
    """Console-script and ``python -m train.cli`` entry point."""
    signals.install()  # first: a preemption signal during the imports must not kill the process
    code = main()
    _exit_now_if_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
