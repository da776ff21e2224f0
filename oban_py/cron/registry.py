"""The recurring tasks of a process: ``[cron.<name>]`` tables plus ``cron=`` on ``@worker``/``@job``.

A decorator's task is named after its worker. When a table and a decorator use the same name, the
table wins (the deployment's config overrides the code's default). Like the worker registry this one
is filled by the decorators and only read afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .task import CronTask, CronTaskConfig, build_task

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["load_tasks", "register_cron", "registered_cron", "unregister_cron"]

_DECORATED: dict[str, CronTaskConfig] = {}


def register_cron(worker: str, config: CronTaskConfig) -> None:
    """Record the ``cron=`` task of ``worker`` (a later definition of the worker replaces it)."""
    _DECORATED[worker] = config


def unregister_cron(worker: str) -> None:
    """Forget ``worker``'s task (it was redefined without ``cron=``)."""
    _DECORATED.pop(worker, None)


def registered_cron() -> dict[str, CronTaskConfig]:
    return dict(_DECORATED)


def load_tasks(config: Config) -> dict[str, CronTask]:
    """Every task this process knows, by name, each checked against the worker registry."""
    configs = {**_DECORATED, **config.cron}
    return {name: build_task(name, task) for name, task in sorted(configs.items())}
