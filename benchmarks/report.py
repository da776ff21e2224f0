"""Aggregate raw.jsonl into summary.json / summary.md, and draw chart.png.

    python benchmarks/report.py DIR          # (re)build summary.json + summary.md from DIR/raw.jsonl
    python benchmarks/report.py chart DIR    # chart.png from DIR/summary.json (needs matplotlib)

Everything except ``chart`` uses only the standard library (run.py imports it).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BASELINE = "raw_asyncpg"

# (phase, metric, label, kind).  kind: "rate" (higher is better), "lower" (lower is
# better), "count" (a correctness count, no ratio).  Ratios are median / raw median.
ROWS: list[tuple[str, str, str, str]] = [
    ("single_insert", "jobs_per_s", "jobs/s", "rate"),
    ("single_unique_insert", "jobs_per_s", "jobs/s", "rate"),
    ("single_unique_insert", "rows_landed", "rows landed (want n)", "count"),
    ("bulk_insert", "jobs_per_s", "jobs/s", "rate"),
    ("bulk_unique_half_dup", "items_per_s", "input items/s", "rate"),
    ("bulk_unique_half_dup", "rows_landed", "new rows (want n/2)", "count"),
    ("bulk_unique_half_dup", "raised", "call raised (1 = yes, whole batch)", "count"),
    ("dup_contention", "calls_per_s", "calls/s (8 procs)", "rate"),
    ("dup_contention", "rows_landed", "rows landed (want keys)", "count"),
    ("dup_contention", "dup_signals", "duplicate exceptions raised", "count"),
    ("dup_contention", "none_returned", "None returned", "count"),
    ("dup_contention", "unexpected_errors", "unexpected errors", "count"),
    ("dup_contention", "distinct_ids_returned", "distinct ids returned", "count"),
    ("process", "jobs_per_s", "jobs/s (durable)", "rate"),
    ("process", "max_in_flight", "max bodies in flight", "count"),
    ("process_keyed", "jobs_per_s", "jobs/s (durable)", "rate"),
    ("process_keyed", "max_key_overlap", "max running per key (limit 2)", "count"),
    ("process_global", "jobs_per_s", "jobs/s (durable)", "rate"),
    ("latency", "p50_ms", "p50 ms", "lower"),
    ("latency", "p95_ms", "p95 ms", "lower"),
    ("latency", "p99_ms", "p99 ms", "lower"),
    ("latency", "max_ms", "max ms", "lower"),
    ("retained_unique", "empty_jobs_per_s", "unique jobs/s, empty", "rate"),
    ("retained_unique", "retained_jobs_per_s", "unique jobs/s, retained rows", "rate"),
    ("retained_unique", "ratio", "retained / empty", "count"),
    ("rss", "rss_mb", "worker RSS MB", "lower"),
    ("rss", "rss_before_worker_mb", "RSS before worker start MB", "lower"),
]
# metric(s) printed on the progress line of run.py
PRIMARY: dict[str, tuple[str, ...]] = {
    "single_insert": ("jobs_per_s",),
    "single_unique_insert": ("jobs_per_s", "rows_landed"),
    "bulk_insert": ("jobs_per_s",),
    "bulk_unique_half_dup": ("items_per_s", "rows_landed"),
    "dup_contention": ("calls_per_s", "rows_landed", "unexpected_errors"),
    "process": ("jobs_per_s", "max_in_flight"),
    "process_keyed": ("jobs_per_s", "max_key_overlap"),
    "process_global": ("jobs_per_s",),
    "latency": ("p50_ms", "p99_ms"),
    "retained_unique": ("empty_jobs_per_s", "retained_jobs_per_s", "ratio"),
    "rss": ("rss_mb",),
}
DETAIL_KEYS = {"bulk_unique_half_dup": "dup_reported", "dup_contention": "outcomes"}


def machine_meta() -> dict[str, Any]:
    meta: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "host_python": sys.version.split()[0],
    }
    try:
        with open("/proc/meminfo") as fh:
            meta["mem_gib"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        repo = Path(__file__).resolve().parent.parent
        meta["repo_commit"] = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        meta["repo_commit"] = None
    return meta


def summarise(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    systems = list(meta.get("systems") or dict.fromkeys(r["system"] for r in rows))
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    unsupported: dict[str, dict[str, str]] = {}
    details: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    failures = []
    values: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        s, ph = r["system"], r["phase"]
        if "error" in r:
            failures.append({k: r.get(k) for k in ("system", "phase", "round", "error", "log")})
            continue
        info.setdefault(
            s,
            {
                "version": r.get("version"),
                "python": r.get("python"),
                "postgres": r.get("postgres"),
                "notes": r.get("notes", ""),
            },
        )
        if "unsupported" in r:
            unsupported.setdefault(ph, {})[s] = r["unsupported"]
            continue
        for k, v in r.get("metrics", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault((ph, k, s), []).append(float(v))
        key = DETAIL_KEYS.get(ph)
        if key and key in r.get("details", {}):
            details.setdefault(ph, {}).setdefault(s, r["details"][key])
    for (ph, k, s), vals in values.items():
        stats.setdefault(ph, {}).setdefault(k, {})[s] = {
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "runs": len(vals),
        }
    return {
        "meta": meta,
        "systems": systems,
        "system_info": info,
        "results": stats,
        "unsupported": unsupported,
        "details": details,
        "failures": failures,
    }


def fmt(v: float) -> str:
    if v != v:  # nan
        return "nan"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else f"{int(v)}"


def cell(st: dict[str, Any] | None) -> str:
    if not st:
        return ""
    if st["runs"] == 1 or st["min"] == st["max"]:
        return fmt(st["median"])
    return f"{fmt(st['median'])} ({fmt(st['min'])}..{fmt(st['max'])})"


def render_markdown(summary: dict[str, Any], brief: bool = False) -> str:
    meta, systems, res = summary["meta"], summary["systems"], summary["results"]
    unsup = summary["unsupported"]
    others = [s for s in systems if s != BASELINE] if BASELINE in systems else []
    out: list[str] = []
    if not brief:
        out.append(f"# Benchmark results ({meta.get('mode')}, {meta.get('rounds')} round(s))\n")
        out.append(
            f"Started {meta.get('started')}, took {meta.get('duration_s')} s. Machine: "
            f"{meta.get('cpus')} CPUs, {meta.get('mem_gib')} GiB, kernel {meta.get('kernel')}; "
            f"load average {meta.get('loadavg_start', 0):.2f} at start, {meta.get('loadavg_end', 0):.2f} at end. "
            f"Repo commit: {meta.get('repo_commit')}.\n"
        )
        out.append(
            "Cells: median (min..max) over rounds. Ratio columns: system median / raw_asyncpg "
            "median (for rates higher is better; for latency and RSS lower is better). "
            "`n/a` = the system cannot do the phase (see below); `raised` = the timed call raised, so "
            "it has no rate; empty = not run or failed.\n"
        )
        vers = ", ".join(f"{s} {i.get('version')}" for s, i in summary["system_info"].items())
        out.append(
            f"Versions: {vers}. Python {next(iter(summary['system_info'].values()), {}).get('python')}, "
            f"PostgreSQL {next(iter(summary['system_info'].values()), {}).get('postgres')}.\n"
        )
        out.append("![chart](chart.png)\n")
        if meta.get("skipped"):
            out.append(
                "Skipped systems: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped"].items()) + "\n"
            )
    header = ["phase", "metric", *systems, *(f"{s} / raw" for s in others)]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    phases = meta.get("phases") or list(dict.fromkeys(p for p, *_ in ROWS))
    for ph, metric, label, kind in ROWS:
        if ph not in phases:
            continue
        per = res.get(ph, {}).get(metric, {})
        raised = res.get(ph, {}).get("raised", {})
        cells = [
            "n/a"
            if s in unsup.get(ph, {})
            else cell(per.get(s)) or ("raised" if raised.get(s, {}).get("max") else "")
            for s in systems
        ]
        ratios = []
        base = per.get(BASELINE, {}).get("median")
        for s in others:
            v = per.get(s, {}).get("median")
            ratios.append(f"{v / base:.2f}x" if kind != "count" and v is not None and base else "")
        out.append("| " + " | ".join([f"`{ph}`", label, *cells, *ratios]) + " |")
    if brief:
        return "\n".join(out) + "\n"
    if unsup:
        out.append("\n## Unsupported\n")
        for ph, per in unsup.items():
            for s, why in per.items():
                out.append(f"- `{ph}` / **{s}**: {why}")
    if summary["details"]:
        out.append("\n## How duplicates came back (first run)\n")
        for ph, per in summary["details"].items():
            for s, d in per.items():
                out.append(f"- `{ph}` / **{s}**: {json.dumps(d) if not isinstance(d, str) else d}")
    out.append("\n## Per-system settings\n")
    for s, i in summary["system_info"].items():
        out.append(f"- **{s}** {i.get('version')}: {i.get('notes')}")
    if summary["failures"]:
        out.append("\n## Failed runs\n")
        for f in summary["failures"]:
            out.append(f"- {f['system']} `{f['phase']}` round {f['round']}: {f['error']} (log: {f['log']})")
    params = meta.get("phase_params", {})
    if params:
        out.append("\n## Phase parameters\n")
        for ph, p in params.items():
            out.append(
                f"- `{ph}`: "
                + ", ".join(
                    f"{k}={int(v):,}" if float(v).is_integer() else f"{k}={v:g}" for k, v in p.items()
                )
            )
    return "\n".join(out) + "\n"


def chart(outdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads((outdir / "summary.json").read_text())
    systems, res = summary["systems"], summary["results"]
    rate_rows = [(ph, m, lbl) for ph, m, lbl, kind in ROWS if kind == "rate" and ph in res and m in res[ph]]
    lat_rows = [(ph, m, lbl) for ph, m, lbl, kind in ROWS if ph == "latency" and m in res.get(ph, {})]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [5, 2, 1.3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def bars(ax: Any, rows: list[tuple[str, str, str]], normalise: bool) -> None:
        width = 0.8 / max(1, len(systems))
        for j, s in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for i, (ph, m, _) in enumerate(rows):
                st = res[ph][m].get(s)
                base = res[ph][m].get(BASELINE, {}).get("median") if normalise else 1.0
                if not st or not base:
                    continue
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(st["median"] / base)
                lo.append((st["median"] - st["min"]) / base)
                hi.append((st["max"] - st["median"]) / base)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=s, color=colors[j % len(colors)])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{ph}\n{m}" for ph, m, _ in rows], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)

    bars(axes[0], rate_rows, normalise=True)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_title("Throughput relative to raw asyncpg (= 1, log scale; higher is better)")
    axes[0].legend(fontsize=8)
    bars(axes[1], lat_rows, normalise=False)
    axes[1].set_title("Insert-commit → body-start latency, ms (log)")
    rss_rows = [("rss", "rss_mb", "")] if "rss_mb" in res.get("rss", {}) else []
    bars(axes[2], rss_rows, normalise=False)
    axes[2].set_yscale("linear")
    axes[2].set_title("Worker RSS, MB")
    meta = summary["meta"]
    fig.suptitle(
        f"oban_py benchmarks: medians of {meta.get('rounds')} round(s), whiskers min..max "
        f"({meta.get('mode')} run, {meta.get('started')})"
    )
    fig.tight_layout()
    fig.savefig(outdir / "chart.png", dpi=110)


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "chart":
        chart(Path(argv[1]))
        return
    if len(argv) != 1:
        raise SystemExit(__doc__)
    outdir = Path(argv[0])
    rows = [json.loads(line) for line in (outdir / "raw.jsonl").read_text().splitlines() if line.strip()]
    old = outdir / "summary.json"
    meta = json.loads(old.read_text())["meta"] if old.exists() else {}
    summary = summarise(rows, meta)
    old.write_text(json.dumps(summary, indent=1) + "\n")
    (outdir / "summary.md").write_text(render_markdown(summary))
    print(render_markdown(summary, brief=True))


if __name__ == "__main__":
    main(sys.argv[1:])
