"""``xdrec`` command line: thin entry points over the library.

    xdrec prepare configs/experiment/<x>.yaml [a.b=value ...]
    xdrec train   configs/experiment/<x>.yaml [a.b=value ...] [--resume auto | --reevaluate]
    xdrec data verify|stats data/prepared/<name>
    xdrec data fetch amazon-food-kitchen [--to data/raw/amazon-food-kitchen]   a public release, sha256-checked
    xdrec export  runs/<name> [--stage joint]          -> runs/<name>/export-joint/model.safetensors
    xdrec evaluate runs/<name>/export-joint [--split test] [--json] [--without last-event|other-domains]
    xdrec recommend runs/<name>/export-joint --domain B --history <item ids, oldest first> [-k 10] [--json]
    xdrec report  runs/<name>-seed0 runs/<name>-seed1 ... [--out report.json] [--markdown] [--plots DIR]
    xdrec report  docs/results/<a>.json [<b>.json ...] [--markdown]  saved reports again (several: pooled)
    xdrec plan    configs/experiment/<x>.yaml [a.b=value ...] [--world-size N] [--memory-per-rank 80GiB]
    xdrec doctor                                       versions, CUDA/NCCL, op cache, W&B mode, launcher, Slurm
Every command takes --debug (a traceback instead of the one-line error) and shows its defaults in --help.
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, where there is one to show (not for flags, required options or None)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required or action.help is None:
            return action.help
        return super()._get_help_string(action)


def _run_commands(add) -> None:
    """``prepare`` and ``train``: an experiment and its dotted overrides."""
    for name, help_ in (("prepare", "raw interactions -> WebDataset shards + manifest.json"),
                        ("train", "run the stages the experiment lists, write runs/<name>/metrics.json")):
        s = add(name, help=help_)
        s.add_argument("config", help="experiment YAML, e.g. configs/experiment/demo.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4")
        if name == "prepare":
            s.add_argument("--engine", choices=("local", "ray"),
                           help="who prepares (data.engine): this process, or Ray Data (the same samples)")
            s.add_argument("--address", help="ray: the cluster to join (data.ray_address), e.g. auto or "
                                             "ray://head:10001; without it a local Ray sized to this machine")
        if name == "train":
            s.add_argument("--resume", choices=("auto", "never"), default="never",
                           help="auto: skip finished stages and continue the latest resume checkpoint "
                                "of runs/<name>/ (same world size); never: start afresh")
            s.add_argument("--overwrite", action="store_true",
                           help="start afresh even where runs/<name>/ holds an earlier run: it is moved aside "
                                "to runs/<name>.old-<time> (without this flag such a folder is refused)")
            s.add_argument("--reevaluate", action="store_true",
                           help="train nothing: evaluate the finished stages of runs/<name>/ again from their "
                                "best weights under this config's eval keys (e.g. a new eval.prior or "
                                "eval.transition) and rewrite their metrics, test ranks and the transfer interval")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (else argparse's one usage error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from train.protocol import ABLATIONS  # light: names only

    p = argparse.ArgumentParser(prog="xdrec", description="Cross-domain Transformer recommenders on DeepSpeed.")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="a traceback instead of the one-line error")

    def add(name: str, **kw) -> argparse.ArgumentParser:  # every command: --debug, defaults in --help
        return sub.add_parser(name, parents=[common], formatter_class=_Help, **kw)

    _run_commands(add)
    d = add("data", help="fetch a public data set; inspect a prepared folder")
    d.add_argument("action", choices=("fetch", "verify", "stats"), help="fetch: download a public release, "
                   "sha256-checked; verify: re-hash and re-count every shard, recompute every split's samples digest; stats: users/items/events per domain, "
                   "overlap, sequence lengths")
    d.add_argument("folder", help="fetch: a data set name (amazon-food-kitchen, amazon-beauty-electronics); "
                   "verify, stats: data/prepared/<name>")
    d.add_argument("--to", default=None, help="fetch: the folder to fill (default: data/raw/<name>)")
    d.add_argument("--base-url", default=None, help="fetch: a mirror of the release's data/ folder")
    e = add("export", help="best ZeRO checkpoint of a stage -> model.safetensors + config")
    e.add_argument("run_dir", help="runs/<name>")
    e.add_argument("--stage", default="joint", choices=("source", "joint", "target_only"), help="whose best weights")
    e.add_argument("--domain", default=None, help="target_only with several target domains: whose baseline")
    e.add_argument("--out", default=None, help="default: <run_dir>/export-<stage>[-<domain>]")
    v = add("evaluate", help="metrics of an exported model on its prepared data (no DeepSpeed)")
    v.add_argument("export_dir", help="runs/<name>/export-<stage> (xdrec export)")
    v.add_argument("--split", default="test", choices=("valid", "test"), help="which split to rank")
    v.add_argument("--json", action="store_true", help="print metrics.json's layout instead of the table")
    v.add_argument("--without", default=None, choices=ABLATIONS,
                   help="rank with that part of each input taken out: the latest event (at test, the valid "
                        "target), or every event outside the ranked domain")
    r = add("recommend", help="top-k items of a domain for one history (no DeepSpeed)")
    r.add_argument("export_dir", help="runs/<name>/export-<stage> (xdrec export)")
    r.add_argument("--domain", required=True, help="the domain to recommend from")
    r.add_argument("--history", nargs="+", required=True, help="the user's items, oldest first (the data's own ids)")
    r.add_argument("-k", type=_positive_int, default=10, help="how many items (>= 1)")
    r.add_argument("--internal", action="store_true", help="history and output in xdrec's item ids")
    r.add_argument("--include-history", action="store_true", help="items of the history may be recommended")
    r.add_argument("--json", action="store_true", help="print JSON: [{item, score}, ...]")
    pl = add("plan", help="parameters by part and predicted memory per rank under ZeRO 0-3")
    pl.add_argument("config", help="experiment YAML")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=1024")
    pl.add_argument("--world-size", type=_positive_int, default=1, help="ranks the model is sharded over")
    pl.add_argument("--memory-per-rank", default=None,
                    help="e.g. 80GiB; default: the GPU's memory, or this machine's RAM / world size")
    doc = add("doctor", help="versions, CUDA/NCCL, the DeepSpeed op cache, W&B mode, launcher, Slurm")
    doc.add_argument("--json", action="store_true", help="print JSON")
    rp = add("report", help="mean and std over runs (seeds) of the test metrics and transfer intervals")
    rp.add_argument("run_dirs", nargs="+", help="runs/<name> folders holding metrics.json, or reports saved "
                    "by --out (printed again; several pooled, e.g. seeds run in different sessions)")
    rp.add_argument("--out", default=None, help="also write the aggregate as JSON here")
    rp.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    rp.add_argument("--plots", default=None, metavar="DIR", help="write PNGs (loss, valid metric, transfer, "
                    "cold start) and report.md into DIR")
    rp.add_argument("--by-fraction", action="store_true", help="the reports are of several data.target_fraction "
                    "shares: one line (and with --plots, fraction.png) per share, its runs pooled")
    return p


def cmd_report(args) -> int:
    import json
    from pathlib import Path

    from train.report import ReportError, format_markdown, format_report, gather

    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ReportError(f"--out {args.out}: its folder {Path(args.out).resolve().parent} does not exist")
    if args.out and Path(args.out).is_dir():
        raise ReportError(f"--out {args.out}: is a folder; give a file name, e.g. {Path(args.out) / 'report.json'}")
    if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise ReportError(f"--plots {args.plots}: exists and is not a folder")
    if args.by_fraction:
        return _report_by_fraction(args)
    agg, saved = gather(args.run_dirs)
    if saved and args.plots:
        raise ReportError(f"{args.run_dirs[0]}: --plots draws from run folders (losses per step), not a saved report")
    plots = []
    if args.plots:
        from train.plots import draw

        plots = draw(agg, Path(args.plots))
        (Path(args.plots) / "report.md").write_text(format_markdown(agg, plots))
    print(format_markdown(agg) if args.markdown else format_report(agg))
    if args.out:
        Path(args.out).write_text(json.dumps(agg, indent=1))
    if args.plots:
        print(f"plots and report.md: {args.plots} ({', '.join(p.name for p in plots)})", file=sys.stderr)
    return 0


def _report_by_fraction(args) -> int:
    import json
    from pathlib import Path

    from train.protocol import PROTOCOLS
    from train.plots import draw_fractions
    from train.report import by_fraction, format_fractions

    curve = by_fraction(args.run_dirs)
    print("\n\n".join(format_fractions(curve, p) for p in PROTOCOLS))
    if args.plots:
        drawn = draw_fractions(curve, Path(args.plots))
        print(f"plot: {', '.join(str(p) for p in drawn)}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({"by_fraction": {f"{f:g}": agg for f, agg in curve.items()}}, indent=1))
    return 0


def cmd_doctor(args) -> int:
    import json

    from tools.doctor import format_doctor, report

    r = report()
    print(json.dumps(r, indent=1) if args.json else format_doctor(r))
    return 0


def cmd_plan(args) -> int:
    from train.config import load_config
    from tools.plan import default_memory, parse_bytes, plan, vocabulary

    cfg = load_config(args.config, args.overrides)
    memory, cpu = default_memory(args.world_size)
    if args.memory_per_rank:
        memory = parse_bytes(args.memory_per_rank)
    print(plan(cfg, vocabulary(cfg), world=args.world_size, memory=memory, cpu=cpu))
    return 0


def cmd_data(args) -> int:
    import json

    from train.data.inspect import empty_splits, stats, verify

    if args.action == "fetch":
        from train.data.fetch import ABXI, fetch

        out = fetch(args.folder, args.to or f"data/raw/{args.folder}", base_url=args.base_url or ABXI, log=_log)
        print(f"{out}: every file matches its sha256; train with data.path={out}")
        return 0
    if args.action == "verify":
        counts = verify(args.folder)
        print(f"{args.folder}: every shard matches its sha256 and sample count, every split its samples_sha256: {json.dumps(counts)}")
        for where in empty_splits(counts):
            print(f"warning: {where} holds no samples: no user's {where.split('/')[1]} event falls in that domain; "
                  "an experiment that trains, selects or reports on it is refused", file=sys.stderr)
    else:
        print(json.dumps(stats(args.folder), indent=1))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from train.export import ExportError, export

    name = args.stage + (f"-{args.domain}" if args.domain else "")
    out = args.out or f"{args.run_dir.rstrip('/')}/export-{name}"
    if Path(out).exists() and not Path(out).is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    out = export(args.run_dir, out, stage=args.stage, domain=args.domain)
    print(f"exported {name} to {out}")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from train.export import evaluate_exported

    from train.config import load_config
    from train.export import load_info
    from train.stages import format_table

    metrics = evaluate_exported(args.export_dir, splits=(args.split,), without=args.without)
    if args.json:
        print(json.dumps(metrics, indent=1))
        return 0
    info = load_info(args.export_dir)
    cfg = load_config(f"{args.export_dir}/config.yaml")
    print(f"{args.split} metrics of {args.export_dir} (stage {info['stage']}; sampled: "
          f"{cfg.eval.num_negatives} negatives" + (f"; input without {args.without}" if args.without else "") + "):")
    print(format_table({info.get("unit", info["stage"]): metrics}, info["evaluated"], [], split=args.split))
    return 0


def cmd_recommend(args) -> int:
    import json

    from train.export import recommendations

    top = recommendations(args.export_dir, args.domain, args.history, k=args.k, internal=args.internal,
                          include_history=args.include_history)
    if args.json:
        print(json.dumps([{"item": i, "score": s} for i, s in top]))
    else:
        print(f"{'rank':>4}  {'item':<24} score")
        for n, (i, s) in enumerate(top, 1):
            print(f"{n:>4}  {i:<24} {s:.4f}")
    return 0


def cmd_prepare(args) -> int:
    from train.config import load_config
    from train.data.prepare import prepare

    extra = [f"data.{k}={v}" for k, v in (("engine", args.engine), ("ray_address", args.address)) if v is not None]
    cfg = load_config(args.config, args.overrides + extra)
    prepare(cfg.data, log=_log)
    return 0


def cmd_train(args) -> int:
    from train.config import load_config
    from train.engine import teardown_distributed
    from train.loop import StageInterrupted
    from train.experiment import Experiment

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
        print_results(cfg, results, exp.run_dir)
    return 0


def print_results(cfg, results: dict, run_dir) -> None:
    """The end of a run: the test table and each target's NDCG@10, joint vs its target-only baseline."""
    from train.protocol import PROTOCOLS, protocol_label
    from train.stages import format_table

    sources, targets = cfg.data.sources(), cfg.data.targets()
    print(f"\nTest metrics ({cfg.data.name}; source {', '.join(sources)} -> target {', '.join(targets)}):")
    print(format_table(results, targets, sources))
    for t in targets:
        tj = results.get("joint", {}).get("test", {}).get(t)
        tt = results.get(cfg.baseline_unit(t), {}).get("test", {}).get(t)
        for proto in PROTOCOLS if tj and tt else ():
            a, b = tj[proto]["ndcg@10"], tt[proto]["ndcg@10"]
            print(f"{t} NDCG@10, {protocol_label(proto, cfg.eval.num_negatives)}: source-then-joint {a:.4f} vs "
                  f"target-only {b:.4f} ({'+' if a >= b else ''}{(a - b) / max(b, 1e-12) * 100:.1f}%)")
    print(f"metrics: {run_dir / 'metrics.json'}")


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "data": cmd_data, "export": cmd_export,
            "evaluate": cmd_evaluate, "recommend": cmd_recommend, "report": cmd_report, "plan": cmd_plan,
            "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here, after entry() installed the signal handler: importing torch and DeepSpeed
    # takes seconds, and a SIGUSR1 in that window would otherwise kill the process.
    from launch.env import LaunchError
    from train.checkpoint import CheckpointError, ResumeError, UnsafeCheckpoint
    from train.config import ConfigError
    from train.data.formats import DataFormatError
    from train.data.prepare import ManifestError
    from train.data.stream import ShardError
    from train.engine import LaunchConflict
    from train.data.fetch import FetchError
    from train.evaluate import NonFiniteScores
    from train.export import ExportError
    from train.files import DiskFullError, NonFiniteValue, free_space, is_disk_full
    from train.loop import NonFiniteError
    from train.record import DataMismatch, RecordError
    from train.redact import MissingSecret
    from train.report import ReportError
    from train.runlock import RunLocked

    if args.debug:  # the traceback of every error
        return COMMANDS[args.cmd](args)
    try:
        return COMMANDS[args.cmd](args)
    except (ConfigError, DataFormatError, ManifestError, LaunchConflict, LaunchError, ResumeError,
            ExportError, ReportError, ShardError, NonFiniteError, NonFiniteScores, NonFiniteValue, CheckpointError,
            DiskFullError, RunLocked, RecordError, FetchError, UnsafeCheckpoint, MissingSecret,
            DataMismatch) as e:
        # every rank raises these alike: rank 0 says it once; other errors are each rank's own
        collective = (ConfigError, LaunchConflict, ResumeError, RunLocked, NonFiniteError, NonFiniteScores,
                      CheckpointError)
        import os

        if not isinstance(e, collective) or os.environ.get("RANK", "0") == "0":
            print(f"xdrec: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints instead): whatever was half-written is gone
        print("xdrec: interrupted", file=sys.stderr)
        return 130
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
    """The error's own message on one line, URL credentials redacted: an error re-raised from a
    DataLoader worker carries the worker's traceback in its message; its last line is the original message."""
    from train.redact import redact

    text = redact(str(e))
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def entry() -> None:
    """Console-script and ``python -m train.cli`` entry point."""
    signals.install()  # first: a preemption signal during the imports must not kill the process
    code = main()
    from train.engine import exit_now_if_distributed

    exit_now_if_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
