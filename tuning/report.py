"""Human-readable reports of a profile (``lukern-tune`` and ``lukern-tune --report``)."""

from __future__ import annotations

from .tuner import plan_text

__all__ = ["format_report", "format_time"]


def format_time(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.2f} s"


def _bucket_text(bucket, axes) -> str:
    if list(axes) == ["dtype", "d", "log2_pooling", "log2_bags"] and len(bucket) == 4:
        return f"{bucket[0]} d={bucket[1]} ids/bag~2^{bucket[2]} bags~2^{bucket[3]}"
    return ", ".join(f"{a}={b}" for a, b in zip(axes, bucket)) if axes else str(tuple(bucket))


def format_report(profile: dict, path=None, extra_results=()) -> str:
    """The per-bucket table of ``profile``: tuned plan, its median, the heuristic's plan
    and median, and the measured speed-up (heuristic time / tuned time, interleaved)."""
    host = profile.get("host", {}) or {}
    cpu = host.get("cpu", {}) or {}
    tuner = profile.get("tuner", {}) or {}
    lines = [
        f"profile {path}" if path else "profile",
        f"  host {profile.get('fingerprint')} ({cpu.get('brand', '?')}, CPUs {host.get('online_cpus', '?')}, "
        f"{len(host.get('nodes', []))} NUMA node(s), numba {host.get('numba', '?')} {host.get('threading_layer', '')})",
        f"  created {profile.get('created', '?')} by lukern {profile.get('lukern_version', '?')}"
        + (f", budget {tuner.get('budget_s')} s, strategy {tuner.get('strategy')}, wall {tuner.get('wall_s', 0):.1f} s"
           if tuner else ""),
        "",
    ]
    head = f"{'op':<14} {'case':<32} {'bucket':<34} {'tuned plan':<26} {'median':>10}   {'heuristic plan':<26} {'median':>10} {'speed-up':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    notes = []
    for op, entry in (profile.get("ops") or {}).items():
        axes = entry.get("bucket_axes", [])
        for b in entry.get("buckets", []):
            h = b.get("heuristic", {}) or {}
            sp = b.get("speedup")
            sp_text = f"{sp:.2f}x" if sp is not None else "-"
            lines.append(f"{op:<14} {b.get('case', ''):<32} {_bucket_text(b['bucket'], axes):<34} "
                         f"{plan_text(b.get('plan')):<26} {format_time(b.get('median_s')):>10}   "
                         f"{plan_text(h.get('plan')):<26} {format_time(h.get('median_s')):>10} {sp_text:>9}")
            extra = []
            if b.get("note"):
                extra.append(b["note"])
            if b.get("n_failed"):
                extra.append(f"{b['n_failed']} candidate(s) failed: {b['failures'][0]['error'] if b.get('failures') else ''}")
            if extra:
                notes.append(f"  {op} / {b.get('case', '')}: " + "; ".join(extra))
        if entry.get("best"):
            notes.append(f"  {op}: best overall (used for untuned shapes without a near bucket): {plan_text(entry['best'])}")
    for r in extra_results:
        if r.get("status") != "tuned":
            notes.append(f"  {r['op']} / {r['case']}: {r.get('status')}: {r.get('note', '')}")
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(notes)
    lines.append("")
    lines.append("speed-up = heuristic median / tuned median, timed interleaved; noise band "
                 f"{100 * float(tuner.get('noise', 0.05)):.0f}% or wider (see each bucket's \"noise\").")
    return "\n".join(lines)
