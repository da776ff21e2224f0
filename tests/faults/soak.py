"""Soak: run the fault scenarios again and again, bigger, until the time is up.

    python -m tests.faults.soak --minutes 30            # from the repo root
    python tests/faults/soak.py --minutes 30 --scale 3 -k "sigkill or black_hole"

Each round is one ``pytest tests/faults`` process with ``FAULTS_SOAK=1`` (the soak-only scenarios run,
faults last longer: a 45 s blocked loop, a crash-style PostgreSQL restart, the mixed-faults load),
``FAULTS_SCALE`` (job counts, fault repetitions, deadlines) and a new ``FAULTS_SEED`` (which runner
is killed, when). Round logs and JUnit files go to ``--out`` (default: a new directory under /tmp).
The summary lists every scenario with its runs and failures, and the first failure message of each;
the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="keep starting rounds this long")
    parser.add_argument("--scale", type=float, default=3.0, help="FAULTS_SCALE for every round (>= 1)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (0: by time)")
    parser.add_argument("-k", dest="keyword", default="", help="pytest -k expression to pick scenarios")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first round (then +1 each)")
    parser.add_argument("--out", type=Path, default=None, help="directory for round logs")
    parser.add_argument("--keep", action="store_true", help="keep every scenario's files (FAULTS_KEEP)")
    return parser.parse_args(argv)


def run_round(args: argparse.Namespace, n: int, seed: int, out: Path) -> dict[str, tuple[str, str]]:
    """One pytest process; returns test id -> (outcome, message)."""
    junit = out / f"round-{n:03d}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "tests" / "faults"),
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        f"--junitxml={junit}",
    ]
    if args.keyword:
        cmd += ["-k", args.keyword]
    env = {**os.environ, "FAULTS_SOAK": "1", "FAULTS_SCALE": str(args.scale), "FAULTS_SEED": str(seed)}
    if args.keep:
        env["FAULTS_KEEP"] = "1"
    with open(out / f"round-{n:03d}.log", "wb") as log:
        # Run from the log directory: the engine then comes from PYTHONPATH or the installed package
        # (a snapshot on PYTHONPATH is used by the test process and the runners alike).
        subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    results: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return {"<round>": ("error", f"no JUnit report; see {out / f'round-{n:03d}.log'}")}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = child.tag, (child.get("message") or "").splitlines()[0][:300]
            elif child.tag == "skipped":
                outcome = "skipped"
        results[name] = (outcome, message)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="oban-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    first_failure: dict[str, str] = {}
    started = time.monotonic()
    print(f"soak: scale {args.scale}, {args.minutes} min, first seed {seed}, logs in {out}", flush=True)
    n = 0
    while True:
        n += 1
        began = time.monotonic()
        results = run_round(args, n, seed + n - 1, out)
        failed = sorted(name for name, (outcome, _) in results.items() if outcome in ("failure", "error"))
        for name, (outcome, message) in results.items():
            stats[name][outcome] += 1
            if outcome in ("failure", "error"):
                first_failure.setdefault(name, f"round {n} (seed {seed + n - 1}): {message}")
        print(
            f"round {n} (seed {seed + n - 1}): {len(results)} scenarios, {len(failed)} failed "
            f"in {time.monotonic() - began:.0f}s{': ' + ', '.join(failed) if failed else ''}",
            flush=True,
        )
        if args.rounds and n >= args.rounds:
            break
        if time.monotonic() - started >= args.minutes * 60:
            break
    print(f"\nsoak summary ({n} rounds, {(time.monotonic() - started) / 60:.1f} min):")
    bad = False
    for name in sorted(stats):
        counts = stats[name]
        fails = counts["failure"] + counts["error"]
        bad = bad or fails > 0
        print(f"  {'FAIL' if fails else 'ok  '} {name}: {counts['passed']} passed, {fails} failed, "
              f"{counts['skipped']} skipped")  # fmt: skip
        if name in first_failure:
            print(f"       first failure: {first_failure[name]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
