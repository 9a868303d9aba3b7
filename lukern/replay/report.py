"""Rendering the replay report: the printed table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import math
import os

from .._io import atomic_write

__all__ = ["format_report", "plot_report", "to_json", "write_json"]


def _clean(x):
    """JSON has no NaN / inf: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and hasattr(x, "dtype"):  # numpy scalar
        return _clean(x.item())
    return x


def to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=1, sort_keys=False, allow_nan=False)


def write_json(report: dict, path) -> None:
    """Write the report atomically (temp file + rename): a reader never sees half a file."""
    text = to_json(report) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False, make_folder=True)  # a CLI output path


def _fmt_bytes(b):
    if b is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return str(b)


def _f(x, spec=".4f"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _time(t, clock):
    if clock != "timestamps":
        return f"{t:.0f}s"
    import numpy as np

    return str(np.datetime64(int(t), "s")).replace("T", " ")[:16]


def format_report(report: dict) -> str:
    """The human-readable summary printed by ``lukern replay``."""
    lines = []
    st = report["stream"]
    lines.append(f"lukern replay ({report['mode']}, seed {report['seed']}): {st['name']} [{st['format']}], "
                 f"{st['rows']} rows, initial model on the first {st['train_rows']}, "
                 f"{report.get('windows_done', 0)} windows served")
    bw = report.get("bandwidth")
    if bw:
        lines.append(f"bandwidth model: shipping a whole table takes {bw['seconds_per_table'] / 3600:.2f} h of stream "
                     f"time ({bw['prod_table_bytes'] / 1e12:g} TB over {bw['prod_link_bps'] / 1e9:g} Gb/s; 10% = "
                     f"{bw['seconds_per_10pct'] / 60:.1f} min)")
    strategies = report["strategies"]
    names = list(strategies)
    if not names:
        lines.append("no window finished.")
        return "\n".join(lines)
    k = report.get("windows_done", 0)
    clock = st.get("clock", "timestamps")
    lines.append("")
    lines.append("AUC per window")
    head = f"{'window':>6} {'stream time':>17} {'rows':>7} {'pos':>6} " + " ".join(f"{n:>9}" for n in names)
    lines.append(head)
    for w in report["windows"][:k]:
        row = f"{w['index']:>6} {_time(w['t_start'], clock):>17} {w['rows']:>7} {w['positives']:>6} "
        row += " ".join(f"{_f(strategies[n]['windows']['auc'][w['index']]):>9}" for n in names)
        lines.append(row)
    lines.append("")
    lines.append(f"{'strategy':<9} {'AUC':>7} {'logloss':>8} {'shipped':>10} {'update CPU-s':>13} "
                 f"{'adapter mem':>12}  notes")
    for n in names:
        s = strategies[n]
        mem = s.get("adapter_mem_pct_max")
        note = ""
        if n == "lukern":
            ranks = [r for r in s["windows"]["rank"] if r]
            if ranks:
                note = f"rank per table {ranks[-1]}"
            n_dec = sum(len(d) for d in s["windows"]["rank_decisions"])
            if n_dec:
                note += f", {n_dec} rank decisions"
        elif s.get("syncs"):
            arr = [x["transfer_s"] for x in s["syncs"]]
            note = f"{len(arr)} syncs, transfer {min(arr) / 60:.1f}-{max(arr) / 60:.1f} min"
        lines.append(f"{n:<9} {_f(s['auc']):>7} {_f(s['logloss']):>8} {_fmt_bytes(s['bytes_shipped']):>10} "
                     f"{_f(s['update_cpu_s'], '.2f'):>13} {(_f(mem, '.3f') + ' %') if mem is not None else '-':>12}  {note}")
    comps = report.get("comparisons") or {}
    if comps:
        lines.append("")
        lines.append("lukern vs others: overall AUC difference [95% CI, bootstrap over windows]; mean per-window "
                     "AUC difference [its 95% CI]; update cost ratio (other / lukern)")
        for key, c in comps.items():
            other = key.split("_vs_")[1]
            br = c.get("bytes_ratio")
            br_s = "inf" if br == float("inf") else (_f(br, ".1f") + "x" if br is not None else "-")
            cr = c.get("cpu_ratio")
            if not strategies[other]["update_cpu_s"]:
                cr = None  # the other strategy does not update: no ratio
            wci = c.get("window_ci95") or [float("nan")] * 2
            lines.append(f"  vs {other:<9} {c['auc_diff']:+.4f} [{_f(c['ci95'][0], '+.4f')}, {_f(c['ci95'][1], '+.4f')}]"
                         f"   per window {_f(c['window_auc_diff_mean'], '+.4f')} "
                         f"[{_f(wci[0], '+.4f')}, {_f(wci[1], '+.4f')}]   bytes {br_s}   "
                         f"CPU {(_f(cr, '.1f') + 'x') if cr is not None else '-'}")
    bars = report.get("bars") or {}
    if bars:
        lines.append("")
        lines.append("bars: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in bars.items()))
    live = report.get("live")
    if live:
        lines.append("")
        lines.append(f"live inference latency (ms): trainer off p50 {_f(live['off']['p50_ms'], '.3f')} "
                     f"p99 {_f(live['off']['p99_ms'], '.3f')}; trainer on p50 {_f(live['on']['p50_ms'], '.3f')} "
                     f"p99 {_f(live['on']['p99_ms'], '.3f')}")
    for p in report.get("pending") or []:
        lines.append(f"pending: {p}")
    if report.get("interrupted"):
        lines.append(f"interrupted: the report holds the {k} windows finished before Ctrl-C.")
    lines.append(f"elapsed {report.get('elapsed_s', 0.0):.1f} s")
    return "\n".join(lines)


def plot_report(report: dict, path) -> bool:
    """Draw AUC over stream time, one line per strategy, to ``path`` (PNG).

    Returns False (and draws nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    k = report.get("windows_done", 0)
    wins = report["windows"][:k]
    clock = report["stream"].get("clock", "timestamps")
    mid = np.array([(w["t_start"] + w["t_end"]) / 2 for w in wins], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if clock == "timestamps" and len(mid):
        x = mid.astype("int64").astype("datetime64[s]")
        ax.set_xlabel("stream time (window midpoint)")
    else:
        x = mid
        ax.set_xlabel("stream time, s (window midpoint)")
    styles = {"stale": ("0.55", "--"), "full": ("tab:purple", ":"), "delta": ("tab:blue", "-."),
              "priority": ("tab:orange", "-."), "lukern": ("tab:red", "-")}
    for name, s in report["strategies"].items():
        color, ls = styles.get(name, (None, "-"))
        y = np.array([np.nan if v is None else v for v in s["windows"]["auc"][:k]], dtype=np.float64)
        ax.plot(x, y, ls, color=color, marker="o", ms=3, lw=2 if name == "lukern" else 1.3,
                label=f"{name} (AUC {s['auc']:.4f})" if s["auc"] is not None and math.isfinite(s["auc"]) else name)
    st = report["stream"]
    ax.set_title(f"lukern replay: {st['name']} [{st['format']}], T = {report['config']['every']} window(s)")
    ax.set_ylabel("AUC per window")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return True
