"""``oban-py version``."""

from __future__ import annotations

import argparse

from .._version import __version__
from .common import Sub

__all__ = ["register"]


def register(sub: Sub) -> None:
    sub.add_parser("version", help="print the version").set_defaults(handler=run)


def run(_args: argparse.Namespace) -> int:
    print(f"oban-py {__version__}")
    return 0
