"""``lukern-tune``: tune this host in one command.

    lukern-tune                      # tune every family within 60 s, write the profile
    lukern-tune --budget-s 300       # more time: more repetitions per candidate
    lukern-tune --ops embedding_bag  # one family (other ops of the profile are kept)
    lukern-tune --resume             # continue an interrupted session from its journal
    lukern-tune --dry-run            # cases, sizes, search spaces and time plan; no timing
    lukern-tune --info               # host, QoS, profile status and families as JSON
    lukern-tune --report             # print the report of the existing profile

Output: the detected topology and QoS capabilities first, a progress bar on a terminal
(stderr, absent in CI logs), one line per finished case on stderr, then the report on
stdout. Exit status: 0 done, 1 nothing could be tuned or no profile to report, 2 bad
arguments or a journal that cannot be resumed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

#: seconds kept back from the budget for writing the profile and the report
_RESERVE_FRACTION = 0.05
_RESERVE_MAX_S = 3.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lukern-tune", description="Tune lukern's kernels on this host and write a profile.")
    p.add_argument("--budget-s", type=float, default=60.0, help="wall-clock seconds for the session (default 60)")
    p.add_argument("--ops", default=None, help="comma-separated families to tune (default: all); see --info")
    p.add_argument("--dims", default=None, help="comma-separated embedding widths (default: each shape's, 64)")
    p.add_argument("--strategy", default="auto", help="search strategy: auto, brute_force, random_sample")
    p.add_argument("--resume", action="store_true", help="continue the journal of an interrupted session")
    p.add_argument("--dry-run", action="store_true", help="print cases, sizes and the time plan; measure nothing")
    p.add_argument("--info", action="store_true", help="print host, QoS, profile status and families as JSON")
    p.add_argument("--report", action="store_true", help="print the report of the existing profile and exit")
    p.add_argument("--profile", default=None, help="profile path (default: LUKERN_PROFILE, else the user cache dir)")
    p.add_argument("--journal", default=None, help="journal path (default: tune-journal.jsonl beside the profile)")
    p.add_argument("--noise", type=float, default=0.05, help="relative difference treated as noise (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of random sampling")
    return p


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    return str(obj)


def _qos():
    """(probe result or None, printable lines). The QoS ladder lives in lukern.sched."""
    try:
        from lukern.sched import qos
    except ImportError:
        return None, ["QoS: not available in this build"]
    try:
        ladder = qos.probe_ladder()
    except Exception as exc:  # a probe must not stop tuning
        return None, [f"QoS: probe failed ({type(exc).__name__}: {exc})"]
    if hasattr(ladder, "describe"):
        text = ladder.describe()
        return ladder, ["QoS:"] + ["  " + line for line in str(text).splitlines()]
    if isinstance(ladder, dict):
        return ladder, ["QoS:"] + [f"  {k}: {v}" for k, v in ladder.items()]
    if isinstance(ladder, (list, tuple)):
        return ladder, ["QoS:"] + [f"  {item}" for item in ladder]
    return ladder, [f"QoS: {ladder}"]


def _select(names_arg, FAMILIES):
    if not names_arg:
        return [FAMILIES[k] for k in FAMILIES]
    names = [n.strip() for n in names_arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(_usage_error(f"--ops: unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                                      f"known: {sorted(FAMILIES)}"))
    return [FAMILIES[n] for n in names]


def _usage_error(msg: str) -> int:
    print(f"lukern-tune: error: {msg}", file=sys.stderr)
    return 2


def _dims(arg):
    if not arg:
        return None
    try:
        dims = [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(_usage_error(f"--dims must be comma-separated integers; got {arg!r}")) from None
    if not dims or min(dims) < 1:
        raise SystemExit(_usage_error(f"--dims must be positive integers; got {arg!r}"))
    return dims


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = _parser().parse_args(argv)
    if args.budget_s <= 0:
        return _usage_error(f"--budget-s must be > 0; got {args.budget_s}")
    if not 0 <= args.noise < 1:
        return _usage_error(f"--noise must be in [0, 1); got {args.noise}")

    import lukern
    from lukern import profile as lprofile
    from lukern.topology import read_topology

    from .families import FAMILIES, Workspace
    from .journal import Journal, JournalError
    from .report import format_report
    from .strategies import STRATEGIES
    from .tuner import Tuner, build_profile

    if args.strategy not in STRATEGIES:
        return _usage_error(f"--strategy must be one of {sorted(STRATEGIES)}; got {args.strategy!r}")
    families = _select(args.ops, FAMILIES)
    dims = _dims(args.dims)
    path = Path(args.profile).expanduser() if args.profile else lprofile.default_profile_path()
    journal_path = Path(args.journal).expanduser() if args.journal else path.with_name("tune-journal.jsonl")

    if args.report:
        try:
            prof = lprofile.read_profile(path)
        except FileNotFoundError:
            print(f"lukern-tune: no profile at {path}; run lukern-tune to create one.", file=sys.stderr)
            return 1
        except (OSError, lprofile.ProfileError) as exc:
            print(f"lukern-tune: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        print(format_report(prof, path))
        here = read_topology().fingerprint()
        if prof.get("fingerprint") != here:
            print(f"\nwarning: this profile was tuned on host {prof.get('fingerprint')}; this host is {here}, "
                  "so lukern ignores it here.")
        return 0

    topo = read_topology()
    qos, qos_lines = _qos()

    if args.info:
        prof_info = {"path": str(path), "exists": path.is_file()}
        if path.is_file():
            try:
                p = lprofile.read_profile(path)
                prof_info.update(fingerprint=p["fingerprint"], matches_host=p["fingerprint"] == topo.fingerprint(),
                                 ops={op: len(e.get("buckets", [])) for op, e in p["ops"].items()})
            except (OSError, lprofile.ProfileError) as exc:
                prof_info["error"] = str(exc)
        info = {
            "lukern_version": lukern.__version__,
            "topology": topo.to_dict(),
            "qos": _jsonable(qos) if qos is not None else qos_lines[0],
            "profile": prof_info,
            "journal": str(journal_path),
            "strategies": sorted(STRATEGIES),
            "families": {f.op: {"summary": f.summary, "bucket_axes": list(f.bucket_axes),
                                "shapes": [_jsonable(s) for s in f.shapes_for(dims)]} for f in FAMILIES.values()},
        }
        print(json.dumps(info, indent=1))
        return 0

    print("lukern-tune: host")
    print(topo.describe())
    for line in qos_lines:
        print(line)
    print()

    if args.dry_run:
        _dry_run(families, dims, topo, args)
        return 0

    try:
        if args.resume:
            journal = Journal.resume(journal_path, topo.fingerprint())
            extra = " (dropped a truncated last line)" if journal.dropped_tail else ""
            print(f"resuming {journal_path}: {len(journal.records)} records{extra}", file=sys.stderr)
        else:
            journal = Journal.start(journal_path, topo.fingerprint(), lukern_version=lukern.__version__,
                                    budget_s=args.budget_s, ops=[f.op for f in families])
    except JournalError as exc:
        print(f"lukern-tune: cannot resume: {exc}", file=sys.stderr)
        return 2

    reserve = min(_RESERVE_MAX_S, _RESERVE_FRACTION * args.budget_s)
    deadline = t_start + args.budget_s - reserve
    progress = _progress(families, dims, topo)
    n_cases = sum(len(f.shapes_for(dims)) for f in families)
    done = [0]

    def on_trial(case, trial):
        progress.set_description(f"{case.op} {case.label}"[:48], refresh=False)
        progress.update(1)

    def on_case(event, info):
        if event in ("done", "resumed", "skipped"):
            done[0] += 1
            progress.write(_case_line(done[0], n_cases, event, info), file=sys.stderr)

    tuner = Tuner(families, topo, _runner(), deadline=deadline, strategy=args.strategy, journal=journal,
                  seed=args.seed, noise=args.noise, dims=dims, workspace=Workspace(args.seed),
                  on_trial=on_trial, on_case=on_case)
    try:
        results = tuner.run()
    except KeyboardInterrupt:
        progress.close()
        journal.close()
        print(f"\nlukern-tune: interrupted; finished cases and trials are in {journal_path}: "
              "run again with --resume to continue.", file=sys.stderr)
        return 130
    finally:
        progress.close()
        journal.close()

    previous = None
    if path.is_file():
        try:
            previous = lprofile.read_profile(path)
        except (OSError, lprofile.ProfileError):
            previous = None
    meta = {"budget_s": args.budget_s, "strategy": args.strategy, "noise": args.noise, "seed": args.seed,
            "dims": dims, "ops": [f.op for f in families], "wall_s": round(time.perf_counter() - t_start, 2)}
    prof = build_profile(results, topo, FAMILIES, meta, previous)
    tuned = [r for r in results if r.get("status") == "tuned"]
    if not prof["ops"]:
        print("lukern-tune: nothing could be tuned (see the notes above); no profile written.", file=sys.stderr)
        return 1
    lprofile.write_profile(prof, path)
    print(format_report(prof, path, extra_results=[r for r in results if r.get("status") != "tuned"]))
    print(f"\n{len(tuned)}/{len(results)} cases tuned in {time.perf_counter() - t_start:.1f} s; "
          f"profile written to {path}; journal {journal_path}")
    return 0


def _runner():
    from .runner import Runner

    return Runner()


def _case_line(k, n, event, info) -> str:
    from .report import format_time
    from .tuner import plan_text

    head = f"[{k}/{n}] {info.get('op')} / {info.get('case')}"
    if event == "resumed":
        return f"{head}: from the journal: {plan_text(info.get('plan'))}"
    if event == "skipped" or info.get("status") != "tuned":
        return f"{head}: {info.get('status', event)}: {info.get('note', '')}"
    sp = info.get("speedup")
    ratio = f" ({sp:.2f}x heuristic)" if sp is not None else ""
    return (f"{head}: {plan_text(info['plan'])} {format_time(info.get('median_s'))}{ratio}, "
            f"{info['n_trials']} trials in {info['seconds']:.1f} s")


def _progress(families, dims, topo):
    """tqdm on a terminal; a silent stand-in otherwise (CI logs get the per-case lines)."""
    total = 0
    for f in families:
        for s in f.shapes_for(dims):
            est = f.estimate(s) if f.estimate else {"n_items": 1}
            total += len(f.space(topo, est["n_items"])) + 1
    interactive = sys.stderr.isatty()
    try:
        from tqdm import tqdm

        import shutil

        # a pseudo-terminal may report a 0 x 0 size: tqdm would then hide the bar
        size = shutil.get_terminal_size((100, 24))
        return tqdm(total=total, unit="trial", file=sys.stderr, disable=not interactive, leave=False,
                    ncols=size.columns if size.columns > 0 else 100, nrows=size.lines if size.lines > 0 else 24)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _Silent()


class _Silent:
    def update(self, n=1):
        pass

    def set_description(self, *a, **k):
        pass

    def write(self, s, file=None):
        print(s, file=file or sys.stderr)

    def close(self):
        pass


def _dry_run(families, dims, topo, args) -> None:
    from .families import Workspace
    from .report import format_time

    reserve = min(_RESERVE_MAX_S, _RESERVE_FRACTION * args.budget_s)
    rows = []
    for f in families:
        for s in f.shapes_for(dims):
            est = f.estimate(s) if f.estimate else {}
            space = f.space(topo, est.get("n_items", 1))
            rows.append((f, s, est, space))
    n = len(rows)
    per_case = (args.budget_s - reserve) / max(1, n)
    print(f"dry run: {n} cases, budget {args.budget_s:g} s (tuning stops at {args.budget_s - reserve:g} s, "
          f"then the profile and report are written): about {per_case:.1f} s per case")
    print(f"{'op':<14} {'case':<32} {'bucket':<28} {'ids/call':>9} {'space':>6} {'strategy':<13} {'per candidate':>14} {'~call':>10}")
    widths = set()
    for f, s, est, space in rows:
        confirm = min(3.0, max(0.1, 0.15 * per_case))
        search = per_case - confirm - 0.05 * per_case
        per_cand = min(2.0, max(0.02, 0.6 * search / (len(space) + 1)))
        strategy = args.strategy
        if strategy == "auto":
            strategy = "brute_force" if len(space) <= 64 and per_cand * 1.2 * len(space) <= search else "random_sample"
        # rough single-thread rate on the reference host (DESIGN section 9): ~30 M ids/s + call overhead
        call = est.get("n_work", 0) / 30e6 + 15e-6
        widths.add((s.get("d"), s.get("dtype")))
        print(f"{f.op:<14} {s['label']:<32} {str(tuple(est.get('bucket', ()))):<28} {est.get('n_work', 0):>9} "
              f"{len(space):>6} {strategy:<13} {per_cand:>12.2f} s {format_time(call):>10}")
    ws = Workspace(args.seed)
    table_bytes = sum(ws.n_rows * d * (4 if dt == "float32" else 8) for d, dt in widths if d)
    batch_bytes = sum(est.get("batch_bytes", 0) for _, _, est, _ in rows) * ws.n_batches
    print(f"\ndata: {len(widths)} shared table(s) of {ws.n_rows} rows = {table_bytes / 2 ** 20:.0f} MiB "
          f"(larger than the {topo.cache_bytes(3) / 2 ** 20:.0f} MiB L3), rings of {ws.n_batches} batches = "
          f"{batch_bytes / 2 ** 20:.1f} MiB")
    print(f"compile: about 4-6 s per (d, dtype) for the serial and prange kernels of both families "
          f"(measured on the reference host), paid inside the first candidates' warm-ups")
    print(f"threads tried: {sorted({t for *_, sp in rows for t in sp.params['n_threads']})} "
          f"(one node first, then across nodes)")
