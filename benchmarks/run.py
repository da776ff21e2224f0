#!/usr/bin/env python3
"""Run the benchmark suite: every (system, phase), interleaved, over several rounds.

    python benchmarks/run.py                      # full run, all systems, 3 rounds
    python benchmarks/run.py --quick              # CI smoke run: raw_asyncpg + oban_py, small N
    python benchmarks/run.py --systems pgqueuer,raw_asyncpg --phases process,latency --rounds 5

Each system gets its own venv under benchmarks/.venvs/<system> (pinned versions,
created on first use) and its own database ``oban_bench_<system>``, which is
dropped and re-created before every run.  Each run is a fresh subprocess
``python systems/<system>_bench.py --phase ... --json-out ...`` (see README.md for
the contract).  Results go to benchmarks/results/<timestamp>/ and are copied to
benchmarks/results/latest/.  Only the standard library is needed to run this file.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import report

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SYSTEMS_DIR = ROOT / "systems"
VENVS = ROOT / ".venvs"
COMMON = SYSTEMS_DIR / "common.py"

ASYNCPG = "asyncpg==0.32.0"
PSYCOPG = "psycopg[binary,pool]==3.3.9"
TOOLS_PACKAGES = ("matplotlib>=3.8,<4",)


@dataclass(frozen=True)
class SystemSpec:
    name: str
    packages: tuple[str, ...]
    min_python: tuple[int, int] = (3, 10)
    editable_repo: bool = False  # pip install -e <repo> (our own engine)

    @property
    def script(self) -> Path:
        return SYSTEMS_DIR / f"{self.name}_bench.py"


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec("raw_asyncpg", (ASYNCPG,)),
        SystemSpec("oban_py", (ASYNCPG,), editable_repo=True),
        SystemSpec("pgqueuer", ("pgqueuer==1.6.0", ASYNCPG)),
        SystemSpec("procrastinate", ("procrastinate==3.10.0", PSYCOPG, ASYNCPG)),
        SystemSpec("chancy", ("chancy==0.26.0", PSYCOPG, ASYNCPG)),
        SystemSpec("obanpy_peer", ("oban==0.7.0", ASYNCPG), min_python=(3, 12)),
    )
}
QUICK_SYSTEMS = ("raw_asyncpg", "oban_py")

PHASES_FULL: dict[str, dict[str, float]] = {
    "single_insert": {"n": 10_000},
    "single_unique_insert": {"n": 10_000},
    "bulk_insert": {"n": 10_000},
    "bulk_unique_half_dup": {"n": 10_000},
    "dup_contention": {"n": 2_000, "keys": 1_000, "procs": 8},
    "process": {"n": 20_000, "concurrency": 10},
    "process_keyed": {"n": 20_000, "concurrency": 10, "keys": 100, "key_limit": 2, "body_ms": 0},
    "process_global": {"n": 20_000, "concurrency": 10, "body_ms": 0},
    "latency": {"n": 1_000, "concurrency": 10, "pace_ms": 5},
    "retained_unique": {"n": 2_000, "retained": 1_000_000},
    "rss": {"n": 1_000_000, "concurrency": 10, "hold_s": 5},
}
PHASES_QUICK: dict[str, dict[str, float]] = {
    "single_insert": {"n": 1_000},
    "single_unique_insert": {"n": 1_000},
    "bulk_insert": {"n": 1_000},
    "bulk_unique_half_dup": {"n": 1_000},
    "dup_contention": {"n": 200, "keys": 100, "procs": 8},
    "process": {"n": 1_000, "concurrency": 10},
    "process_keyed": {"n": 1_000, "concurrency": 10, "keys": 100, "key_limit": 2, "body_ms": 0},
    "process_global": {"n": 1_000, "concurrency": 10, "body_ms": 0},
    "latency": {"n": 200, "concurrency": 10, "pace_ms": 5, "warmup_s": 0.5},
    "retained_unique": {"n": 500, "retained": 20_000},
    "rss": {"n": 20_000, "concurrency": 10, "hold_s": 5},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- interpreters and venvs


def py_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        major, minor = out.split()
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def find_python(explicit: str | None) -> str:
    """The interpreter for every venv: --python, else the newest pyenv 3.12.x,
    else python3.12 on PATH, else this interpreter."""
    if explicit:
        return explicit
    home = os.path.expanduser("~/.pyenv/versions")
    candidates = sorted(
        glob.glob(f"{home}/3.12.*/bin/python"),
        key=lambda p: [int(x) for x in p.split("/")[-3].split(".") if x.isdigit()],
    )
    if candidates:
        return candidates[-1]
    return shutil.which("python3.12") or sys.executable


def _fingerprint(spec: SystemSpec | None, packages: tuple[str, ...], python: str) -> str:
    data = {"python": os.path.realpath(python), "packages": list(packages)}
    if spec is not None and spec.editable_repo:
        pyproject = REPO / "pyproject.toml"
        data["pyproject"] = hashlib.sha256(pyproject.read_bytes()).hexdigest() if pyproject.exists() else ""
    return json.dumps(data, sort_keys=True)


def ensure_venv(
    name: str, packages: tuple[str, ...], python: str, spec: SystemSpec | None = None
) -> tuple[str | None, str]:
    """Create/refresh .venvs/<name>; return (venv python, "") or (None, reason)."""
    venv = VENVS / name
    vpy = venv / "bin" / "python"
    marker = venv / ".bench-spec.json"
    want = _fingerprint(spec, packages, python)
    if vpy.exists() and marker.exists() and marker.read_text() == want:
        return str(vpy), ""
    log(f"-- preparing venv {venv.relative_to(ROOT)} with {python}")
    if venv.exists():
        shutil.rmtree(venv)
    try:
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        cmd = [str(vpy), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages]
        if spec is not None and spec.editable_repo:
            cmd += ["-e", str(REPO)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)
        lines = [ln.strip() for ln in (exc.stderr or exc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"\w+Error: |^ERROR: ", ln)]
        return None, f"venv/pip failed: {' | '.join((errors or lines)[-2:])}"
    except subprocess.TimeoutExpired:
        shutil.rmtree(venv, ignore_errors=True)
        return None, "pip install timed out"
    marker.write_text(want)
    return str(vpy), ""


def prepare_system(spec: SystemSpec, python: str) -> tuple[str | None, str]:
    if not spec.script.exists():
        return None, (
            f"benchmarks/systems/{spec.script.name} does not exist yet "
            "(see benchmarks/README.md, 'Adding a system')"
        )
    version = py_version(python)
    if version is None or version < spec.min_python:
        need = ".".join(map(str, spec.min_python))
        return None, f"needs Python >= {need}, interpreter {python} is {version} (use --python)"
    return ensure_venv(spec.name, spec.packages, python, spec)


# --------------------------------------------------------------------------- one run


def dsn_for(base: str, system: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/oban_bench_{system}", parts.query, parts.fragment))


def phase_flags(params: dict[str, float]) -> list[str]:
    flags = []
    for key, value in params.items():
        flags += [f"--{key.replace('_', '-')}", str(int(value)) if float(value).is_integer() else str(value)]
    return flags


def run_one(
    spec: SystemSpec,
    vpy: str,
    phase: str,
    params: dict[str, float],
    dsn: str,
    rnd: int,
    outdir: Path,
    timeout: float,
) -> dict:
    logfile = outdir / "logs" / f"{spec.name}.{phase}.r{rnd}.log"
    base = {"system": spec.name, "phase": phase, "round": rnd, "log": str(logfile.relative_to(outdir))}
    reset = subprocess.run([vpy, str(COMMON), "reset-db", "--dsn", dsn], capture_output=True, text=True)
    if reset.returncode != 0:
        return {**base, "error": "database reset failed: " + reset.stderr.strip()[-300:]}
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tmp:
        json_out = tmp.name
    cmd = [
        vpy,
        str(spec.script),
        "--phase",
        phase,
        "--dsn",
        dsn,
        *phase_flags(params),
        "--json-out",
        json_out,
    ]
    t0 = time.perf_counter()
    with open(logfile, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, cwd=SYSTEMS_DIR, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    wall = round(time.perf_counter() - t0, 1)
    try:
        with open(json_out) as fh:
            text = fh.read().strip()
        result = json.loads(text) if text else None
    finally:
        os.unlink(json_out)
    if result is None:
        why = f"timed out after {timeout:.0f}s" if rc is None else f"exit code {rc}, no result"
        tail = logfile.read_text().strip().splitlines()[-1:] if logfile.exists() else []
        return {**base, "wall_s": wall, "error": f"{why}: {' '.join(tail)[-300:]}"}
    result.update(
        round=rnd, wall_s=wall, returncode=rc, log=base["log"], loadavg=round(os.getloadavg()[0], 2)
    )
    return result


def describe(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    if "unsupported" in res:
        return "unsupported: " + res["unsupported"][:90]
    metric = report.PRIMARY.get(res["phase"])
    m = res.get("metrics", {})
    shown = ", ".join(f"{k}={m[k]:g}" for k in (metric or ()) if k in m)
    return f"{shown}  ({res.get('wall_s', 0):.0f}s)"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="CI smoke run: small N, 1 round, raw_asyncpg + oban_py"
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3, or 1 with --quick)")
    p.add_argument("--systems", help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--phases", help=f"comma list from {','.join(PHASES_FULL)}")
    p.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_DSN", "postgresql://root@127.0.0.1:5432/postgres"),
        help="server to use; each system gets database oban_bench_<system> on it",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results", help="results root directory")
    p.add_argument("--python", help="interpreter for the venvs (default: newest pyenv 3.12)")
    p.add_argument("--timeout", type=float, help="seconds per run (default 1200, or 240 with --quick)")
    p.add_argument("--no-chart", action="store_true", help="skip the matplotlib chart")
    p.add_argument(
        "--keep-dbs", action="store_true", help="do not drop the oban_bench_* databases at the end"
    )
    o = p.parse_args(argv)
    o.rounds = o.rounds or (1 if o.quick else 3)
    o.timeout = o.timeout or (240.0 if o.quick else 1200.0)
    return o


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    table = PHASES_QUICK if o.quick else PHASES_FULL
    systems = o.systems.split(",") if o.systems else list(QUICK_SYSTEMS if o.quick else SYSTEMS)
    phases = o.phases.split(",") if o.phases else list(table)
    for name in systems:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    for ph in phases:
        if ph not in table:
            raise SystemExit(f"unknown phase {ph!r}; known: {', '.join(table)}")

    python = find_python(o.python)
    ready: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in systems:
        vpy, why = prepare_system(SYSTEMS[name], python)
        if vpy:
            ready[name] = vpy
        else:
            skipped[name] = why
            log(f"SKIP {name}: {why}")
    if not ready:
        log("nothing to run")
        return 1

    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = o.out / stamp
    (outdir / "logs").mkdir(parents=True)
    raw_path = outdir / "raw.jsonl"
    order = [s for s in systems if s in ready]
    meta = report.machine_meta() | {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if o.quick else "full",
        "rounds": o.rounds,
        "systems": order,
        "phases": phases,
        "skipped": skipped,
        "phase_params": {ph: table[ph] for ph in phases},
        "interpreter": python,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    log(f"== results -> {outdir}")
    t_start = time.perf_counter()
    rows: list[dict] = []
    with open(raw_path, "w") as raw:
        for rnd in range(1, o.rounds + 1):
            rotated = order[(rnd - 1) % len(order) :] + order[: (rnd - 1) % len(order)]
            for ph in phases:
                for name in rotated:
                    res = run_one(
                        SYSTEMS[name],
                        ready[name],
                        ph,
                        table[ph],
                        dsn_for(o.dsn, name),
                        rnd,
                        outdir,
                        o.timeout,
                    )
                    rows.append(res)
                    raw.write(json.dumps(res) + "\n")
                    raw.flush()
                    log(
                        f"[r{rnd}/{o.rounds} {time.perf_counter() - t_start:6.0f}s] {name:14s} {ph:22s} "
                        f"{describe(res)}"
                    )
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    meta["duration_s"] = round(time.perf_counter() - t_start)

    summary = report.summarise(rows, meta)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (outdir / "summary.md").write_text(report.render_markdown(summary))
    if not o.no_chart:
        tools_py, why = ensure_venv("_tools", TOOLS_PACKAGES, python)
        if tools_py:
            ch = subprocess.run(
                [tools_py, str(ROOT / "report.py"), "chart", str(outdir)], capture_output=True, text=True
            )
            if ch.returncode != 0:
                log("chart failed: " + ch.stderr.strip()[-500:])
        else:
            log(f"chart skipped: {why}")
    latest = o.out / ("latest-quick" if o.quick else "latest")  # a smoke run never replaces the full results
    if latest.exists():
        shutil.rmtree(latest)
    shutil.copytree(outdir, latest)
    if not o.keep_dbs:
        for name, vpy in ready.items():
            subprocess.run([vpy, str(COMMON), "drop-db", "--dsn", dsn_for(o.dsn, name)], capture_output=True)
    log(f"== done in {meta['duration_s']}s; {outdir / 'summary.md'} (copied to {latest})")
    print(report.render_markdown(summary, brief=True))
    failures = [r for r in rows if "error" in r]
    return 1 if failures and o.quick else 0


if __name__ == "__main__":
    sys.exit(main())
