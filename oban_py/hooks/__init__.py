"""Hooks: process lifecycle hooks, job callbacks, and ``on_error`` for the engine's own failures.

* :mod:`.lifecycle`: ``on_start``, ``on_stop``, ``on_worker_start``, ``on_worker_stop`` (settings).
* :mod:`.callbacks`: ``before_process``, ``after_process``, ``on_success``, ``on_failure``,
  ``on_discard`` on a worker class, and the :class:`Outcome` ``after_process`` receives.
* :mod:`.reporting`: ``on_error(error, context)`` (a setting) and its :class:`ErrorContext`.
* :mod:`.calling`: how the engine calls any of them: bounded in time, contained, off the loop if sync.

See docs/hooks.md.
"""

from __future__ import annotations

from .callbacks import CALLBACK_TIMEOUT, Outcome, WorkerCallbacks, callbacks_for
from .calling import call_contained
from .lifecycle import (
    HOOK_KEYS,
    LIFECYCLE_TIMEOUT,
    HookSpec,
    call_hooks,
    child_config,
    normalize_hooks,
    resolve_hook,
    resolve_hooks,
    run_hooks,
    run_worker_start,
    run_worker_stop,
)
from .reporting import HANDLER_TIMEOUT, ErrorContext, ErrorReporter

__all__ = [
    "CALLBACK_TIMEOUT",
    "HANDLER_TIMEOUT",
    "HOOK_KEYS",
    "LIFECYCLE_TIMEOUT",
    "ErrorContext",
    "ErrorReporter",
    "HookSpec",
    "Outcome",
    "WorkerCallbacks",
    "call_contained",
    "call_hooks",
    "callbacks_for",
    "child_config",
    "normalize_hooks",
    "resolve_hook",
    "resolve_hooks",
    "run_hooks",
    "run_worker_start",
    "run_worker_stop",
]
