"""``oban-py demo``: insert example jobs and run them with live progress."""

from __future__ import annotations

import argparse
import asyncio

from .common import Sub

__all__ = ["register"]


def register(sub: Sub) -> None:
    demo = sub.add_parser("demo", help="insert example jobs and run them with live progress")
    demo.add_argument("--dsn", help="PostgreSQL DSN (default: OBAN_DSN or embedded PostgreSQL)")
    demo.add_argument("--jobs", type=int, default=40, help="how many example jobs (default: 40)")
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return asyncio.run(run_demo(dsn=args.dsn, jobs=args.jobs))
