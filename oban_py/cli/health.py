"""``oban-py health``: a probe for containers (Kubernetes exec probes, Docker HEALTHCHECK).

Exit 0 when the database answers and the schema is current, and with ``--node NAME`` when that node's
last heartbeat is younger than ``rescue_after`` (the age at which other nodes would rescue its jobs:
past it, the node is as good as dead to the cluster). Otherwise exit 1 with one line saying why.

Fast and light on purpose: one connection (no pool of ``pool_size``), a 5 s connect timeout and a
10 s budget for the whole check, so a probe never hangs past its own timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ..errors import MigrationError, ObanError
from .common import Sub, add_common, config_from, one_line, print_json

__all__ = ["CONNECT_TIMEOUT", "TOTAL_TIMEOUT", "register"]

#: Seconds to wait for a connection, and for the whole check.
CONNECT_TIMEOUT = 5.0
TOTAL_TIMEOUT = 10.0


def register(sub: Sub) -> None:
    health = sub.add_parser(
        "health", help="exit 0 if the database answers, the schema is current (and a node lives)"
    )
    add_common(health)
    health.add_argument("--node", help="also require this node's heartbeat to be fresh (< rescue_after)")
    health.add_argument("--json", action="store_true", help="print the result as JSON")
    health.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    try:
        report = asyncio.run(asyncio.wait_for(check(config, args.node), TOTAL_TIMEOUT))
    except asyncio.TimeoutError:
        report = {"ok": False, "error": f"health check took longer than {TOTAL_TIMEOUT:g}s"}
    except ObanError as exc:
        if args.json:
            print_json({"ok": False, "error": one_line(exc)})  # masked, like every CLI error line
            return 1
        raise
    if args.json:
        print_json(report)
    elif report["ok"]:
        print(f"ok: {report['summary']}")
    else:
        print(f"oban-py: {report['error']}", file=sys.stderr)
    return 0 if report["ok"] else 1


async def check(config: Any, node: str | None) -> dict[str, Any]:
    """The probe's findings (``ok``, and ``error`` when not); an unreachable database raises
    DatabaseUnavailable and an old schema MigrationError, which ``main`` prints as one line."""
    from ..db.connect import create_pool
    from ..db.driver import Driver
    from ..db.migrate import current_version, latest_version
    from ..oban import resolve_dsn

    dsn, _ = await asyncio.to_thread(resolve_dsn, config)
    pool = await create_pool(
        dsn, min_size=1, max_size=1, application_name="oban_py:health", connect_timeout=CONNECT_TIMEOUT
    )
    try:
        async with pool.acquire() as conn:
            version = await current_version(conn, config.prefix)
        latest = latest_version()
        if version < latest:
            raise MigrationError(
                f"schema {config.prefix!r} is at version {version}, this oban_py needs {latest}: "
                f"run `oban-py migrate`"
            )
        report: dict[str, Any] = {"ok": True, "prefix": config.prefix, "version": version}
        summary = f"schema {config.prefix!r} at version {version}"
        if node is not None:
            rows = await Driver(pool, config.prefix).fetch("node_list")
            ages = [r["age"] for r in rows if r["node"] == node]
            if not ages:
                report.update(ok=False, error=f"node {node!r} has no heartbeat in schema {config.prefix!r}")
                return report
            age = min(ages)
            report["node"] = {
                "name": node,
                "heartbeat_age": round(age, 3),
                "rescue_after": config.rescue_after,
            }
            if age >= config.rescue_after:
                limit = f"rescue_after {config.rescue_after:g}s"
                report.update(ok=False, error=f"node {node!r} last heartbeat {age:.1f}s ago ({limit})")
                return report
            summary += f", node {node!r} heartbeat {age:.1f}s ago"
        report["summary"] = summary
        return report
    finally:
        await pool.close()
