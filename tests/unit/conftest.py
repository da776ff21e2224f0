"""Tests in this folder need no database: they run on a machine with only Python.

Asking for the server here fails at once, so a test that needs PostgreSQL cannot slip in.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server_dsn() -> str:
    raise RuntimeError("tests/unit needs no database: move a test that uses one to tests/")
