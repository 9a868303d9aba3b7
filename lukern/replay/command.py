"""``lukern replay``: argument parsing and the command body (wired into :mod:`lukern.cli`).

Contract read by other tools: ``lukern replay [--data PATH] [--format FMT] [--json REPORT.json]
[--plot PLOT.png] [--seed N] [--mode sim|live] [--windows N] ...``; the report goes to
stdout, the progress bar to stderr, the JSON (rewritten after every window, atomically)
to ``--json``. Exit status 0, 2 for bad input, 130 after Ctrl-C (the report then holds
the windows finished so far).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_replay_parser", "run_command"]


class _DefaultsOfValues(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for options that take a value only: a flag's default (True for a
    --no-... flag) reads as if the flag were on."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def add_replay_parser(sub) -> argparse.ArgumentParser:
    from .runner import ALL_STRATEGIES, ReplayConfig
    from .streams import FORMATS
    from .synthetic import DEFAULT_EVENTS

    d = ReplayConfig()
    p = sub.add_parser(
        "replay", help="replay a click stream: lukern's in-place updates vs shipping parameters",
        description="Train a small DLRM on the start of a time-ordered click stream, then serve the rest "
                    "prequentially (score each batch, then learn from it) under several refresh strategies: "
                    "stale, full sync, delta, priority delta and lukern (co-located LoRA trainer). "
                    "Without --data a seeded synthetic stream with drift is used.",
        formatter_class=_DefaultsOfValues)
    g = p.add_argument_group("input")
    g.add_argument("--data", metavar="PATH", help="log file (plain or .gz); default: the synthetic stream")
    g.add_argument("--format", choices=FORMATS, help="format of --data (inferred from the name or first line)")
    g.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines instead of failing")
    g.add_argument("--max-rows", type=int, metavar="N", help="read only the first N rows of --data")
    g.add_argument("--hash-rows", type=int, metavar="N",
                   help="rows of each hashed (open-vocabulary) table; default: 2x distinct values, power of 2")
    g.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="length of the synthetic stream")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="REPORT.json", help="write the report as JSON (updated after every window)")
    g.add_argument("--plot", metavar="PLOT.png", help="draw AUC over stream time (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group("replay")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic stream, the models and the "
                   "bootstrap: the same seed gives the same report (sim mode)")
    g.add_argument("--mode", choices=("sim", "live"), default="sim",
                   help="sim: deterministic simulation; live: lukern's real co-located trainer beside a serving "
                        "loop, adds inference P50/P99 with the trainer on and off")
    g.add_argument("--windows", type=int, default=d.windows, help="evaluation windows over the served part")
    g.add_argument("--train-frac", type=float, default=d.train_frac, help="share of the stream for the initial model")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="serving batch (rows scored together)")
    g.add_argument("--train-batch", type=int, default=d.train_batch,
                   help="rows per trainer step, for the training side and lukern alike")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs of initial training; 0: early stopping on the last 10%% of the training rows (at most 4)")
    g.add_argument("--dim", type=int, default=d.dim, help="embedding width")
    g.add_argument("--strategies", default=",".join(ALL_STRATEGIES), help="comma-separated subset to run")
    g = p.add_argument_group("shipping strategies")
    g.add_argument("--every", "-T", type=int, default=d.every, metavar="T", help="sync every T windows")
    g.add_argument("--priority-pct", type=float, default=d.priority_pct,
                   help="priority delta ships this %% of the changed rows (largest updates)")
    g.add_argument("--prod-table-tb", type=float, default=d.prod_table_tb,
                   help="production table size the bandwidth model is scaled to (TB)")
    g.add_argument("--prod-link-gbps", type=float, default=d.prod_link_gbps,
                   help="production link speed (Gb/s); a whole table ships in table/link seconds of stream time")
    g.add_argument("--rows-per-second", type=float, default=d.rows_per_second,
                   help="clock of streams without timestamps (Criteo, single-hour Avazu)")
    g = p.add_argument_group("lukern strategy")
    g.add_argument("--rank", type=int, default=d.rank, help="initial LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank); default = rank")
    g.add_argument("--lr-a", type=float, default=d.lr_a, help="learning rate of the adapter rows A")
    g.add_argument("--lr-b", type=float, default=d.lr_b, help="learning rate of the shared factor B")
    g.add_argument("--budget-pct", type=float, default=d.budget_pct, help="adapter memory budget, %% of the tables")
    g.add_argument("--no-rank-control", action="store_true", help="fixed rank (no lukern.RankController)")
    g.add_argument("--rank-every-windows", type=float, default=d.rank_every_windows,
                   help="the rank controllers decide every this many windows' worth of trainer steps")
    g.add_argument("--min-rows-for-adapter", type=int, default=d.min_rows_for_adapter,
                   help="tables with fewer rows get no adapter")
    g.add_argument("--no-prior-acc", dest="prior_acc", action="store_false",
                   help="start new adapter slots from zero Adagrad history, not their rows' history (ablation)")
    g.add_argument("--qos", default=d.qos, choices=("auto", "none", "sched_idle", "nice", "cgroup", "cooperative"),
                   help="live mode: CPU priority of the trainer thread")
    g.add_argument("--trainer", choices=("thread", "process"), default=d.trainer,
                   help="live mode: the trainer as a thread (evicted rows fold into the served tables) or as "
                        "LiveUpdater's sidecar process (no folding: rows without a free slot are dropped)")
    g.add_argument("--target-p99-ms", type=float, default=None,
                   help="live mode: inference P99 the trainer's controller steers against")
    g = p.add_argument_group("replicas (lukern.distributed)")
    g.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="also split the stream over N replicas: isolated vs exchanging compact factors")
    g.add_argument("--exchange-every", type=float, default=1, metavar="T",
                   help="replicas exchange every T windows (T < 1: 1/k of a window)")
    g.add_argument("--split", choices=("user", "random"), default="user", help="how rows are assigned to replicas")
    g.add_argument("--backend", choices=("inproc", "ray"), default="inproc",
                   help="replicas in this process, or as Ray actors on a local Ray (pip install 'lukern[ray]')")
    p.set_defaults(func=run_command)
    return p


def _config(args):
    from .runner import ReplayConfig

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    return ReplayConfig(windows=args.windows, train_frac=args.train_frac, batch_size=args.batch_size,
                        train_batch=args.train_batch,
                        epochs=args.epochs, dim=args.dim, seed=args.seed, every=args.every,
                        priority_pct=args.priority_pct, prod_table_tb=args.prod_table_tb,
                        prod_link_gbps=args.prod_link_gbps, rows_per_second=args.rows_per_second, rank=args.rank,
                        alpha=args.alpha, lr_a=args.lr_a, lr_b=args.lr_b, budget_pct=args.budget_pct,
                        rank_control=not args.no_rank_control, rank_every_windows=args.rank_every_windows,
                        min_rows_for_adapter=args.min_rows_for_adapter, strategies=strategies, qos=args.qos,
                        target_p99_ms=args.target_p99_ms, prior_acc=args.prior_acc, trainer=args.trainer)


def _run_replicas(stream, cfg, args, single=None):
    from ..distributed.replay import print_replicated, run_replicated

    try:
        rep = run_replicated(stream, cfg, replicas=args.replicas, exchange_every=args.exchange_every,
                             split=args.split, backend=args.backend, progress=not args.no_progress)
    except (ImportError, ValueError, RuntimeError) as e:
        print(f"lukern replay: error: {e}", file=sys.stderr)
        return None
    print_replicated(rep, single=single)
    return rep


def run_command(args) -> int:
    from .report import format_report, plot_report, write_json
    from .runner import run_replay
    from .streams import StreamFormatError, read_stream
    from .synthetic import synthetic_stream

    try:
        cfg = _config(args)
        cfg.check()
        if args.data:
            kw = {"skip_bad": args.skip_bad, "max_rows": args.max_rows}
            if args.hash_rows is not None:
                kw["hash_rows"] = args.hash_rows
            fmt = args.format
            from .streams import infer_format

            fmt = fmt or infer_format(args.data)
            if fmt in ("movielens", "ml-100k") and "hash_rows" in kw:
                del kw["hash_rows"]  # closed vocabularies: nothing is hashed
            print(f"reading {args.data} ...", file=sys.stderr)
            stream = read_stream(args.data, fmt, **kw)
        else:
            stream = synthetic_stream(args.events, seed=args.seed)
    except (StreamFormatError, ValueError, FileNotFoundError) as e:
        print(f"lukern replay: error: {e}", file=sys.stderr)
        return 2
    print(stream.describe(), file=sys.stderr)
    if stream.n_skipped:
        first = ", ".join(f"line {ln}: {msg}" for ln, msg in stream.skipped[:3])
        print(f"skipped {stream.n_skipped} bad lines ({first}{', ...' if stream.n_skipped > 3 else ''})",
              file=sys.stderr)

    def on_window(report):
        if args.json:
            write_json(report, args.json)

    command = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if args.mode == "live":
        try:
            from .. import LiveUpdater  # noqa: F401
        except ImportError:
            print("lukern replay: error: --mode live needs lukern.LiveUpdater (the co-located trainer), which "
                  "this build does not have yet; run --mode sim.", file=sys.stderr)
            return 2
    try:
        if args.mode == "live":
            from .live import run_live

            report = run_live(stream, cfg, progress=not args.no_progress, on_window=on_window, command=command)
        else:
            report = run_replay(stream, cfg, progress=not args.no_progress, on_window=on_window, command=command)
    except (ValueError, RuntimeError) as e:
        print(f"lukern replay: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.replicas and not report.get("interrupted"):
        report["replicas"] = _run_replicas(stream, cfg, args, report)
        if report["replicas"] is None:
            return 2
    if args.json:
        write_json(report, args.json)
        print(f"report: {os.path.abspath(args.json)}", file=sys.stderr)
    if args.plot:
        if report.get("windows_done", 0) and plot_report(report, args.plot):
            print(f"plot: {os.path.abspath(args.plot)}", file=sys.stderr)
        elif report.get("windows_done", 0):
            print("plot skipped: matplotlib is not installed (pip install 'lukern[plot]')", file=sys.stderr)
    return 130 if report.get("interrupted") else 0
