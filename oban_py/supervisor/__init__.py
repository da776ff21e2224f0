"""The multi-process supervisor of ``oban-py start --processes N``, and the runner's pidfile.

* :mod:`.supervisor`: :class:`Supervisor`, which starts, restarts and stops the worker processes.
* :mod:`.child`: what each worker process runs (``python -m oban_py.supervisor.child``).
* :mod:`.pidfile`: :class:`Pidfile`, used with and without a supervisor.

See docs/operations.md.
"""

from __future__ import annotations

from .pidfile import Pidfile, PidfileHeld
from .supervisor import Supervisor

__all__ = ["Pidfile", "PidfileHeld", "Supervisor"]
