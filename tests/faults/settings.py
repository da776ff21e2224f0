"""Knobs of the fault suite, read from the environment (the soak script sets them).

* ``FAULTS_SCALE`` (default 1): multiplies job counts, fault repetitions and fault durations where a
  scenario says so, and the per-test timeout.
* ``FAULTS_SOAK=1``: also run the scenarios marked soak-only (longer than the CI budget allows).
* ``FAULTS_SEED``: seed for the random choices (which runner to kill, when); default: random, printed.
* ``FAULTS_KEEP=1``: keep each scenario's directory (runner logs, ledger, TOML) after the run.
"""

from __future__ import annotations

import os
import random

import pytest

SCALE = max(1.0, float(os.environ.get("FAULTS_SCALE", "1")))
SOAK = os.environ.get("FAULTS_SOAK", "") not in ("", "0")
KEEP = os.environ.get("FAULTS_KEEP", "") not in ("", "0")
SEED = int(os.environ.get("FAULTS_SEED") or random.randrange(1 << 30))

#: A runner must exit this long after shutdown_timeout once it got SIGTERM.
EXIT_GRACE = 8.0

#: Engine settings every runner gets unless a scenario overrides them: fast heartbeats and rescue, so
#: faults play out in seconds.
FAST = {
    "heartbeat_interval": 0.5,
    "rescue_after": 3.0,
    "poll_interval": 0.5,
    "stage_interval": 0.2,
    "shutdown_timeout": 2.0,
    "log_level": "info",
}


def scaled(n: float) -> int:
    """``n`` times the scale, as an int."""
    return round(n * SCALE)


def timeout(seconds: float = 60.0) -> pytest.MarkDecorator:
    """A per-test timeout that grows with the scale (the soak runs longer scenarios, and longer faults)."""
    return pytest.mark.timeout(seconds * SCALE * (3 if SOAK else 1))


soak_only = pytest.mark.skipif(not SOAK, reason="soak-only scenario: run python -m tests.faults.soak")
