"""Fault-injection suite: real runner processes against a PostgreSQL this suite starts itself.

Layout:

* ``pgserver.py``: the embedded PostgreSQL of this suite (its own data directory, started once per
  session), a database for the suite and a fresh schema per scenario; restart for the restart fault.
* ``proxy.py``: a TCP proxy (in a thread of the test process) between runners and PostgreSQL that can
  be switched to a black hole (accept, forward nothing, never close) and back.
* ``cluster.py``: ``oban-py start`` runner processes (one TOML file each), SIGKILL / SIGSTOP / SIGCONT
  / SIGTERM with the times recorded, backend termination, output files.
* ``fault_workers.py``: the worker module the runners import; every body appends ``start`` / ``tick``
  / ``end`` lines to a ledger file opened with O_APPEND, so the record survives database outages.
* ``ledger.py``: reads the ledger into runs and checks them: concurrent double runs, limits per node,
  per queue and per key.
* ``checks.py``: what the jobs table must say: every job final within a deadline (0 lost), at most one
  holder per unique key (sampled while the scenario runs); finding and terminating runner backends.
* ``common.py``: the mixed load, the verdict every chaos scenario ends with, SIGTERM exit checks, and
  database faults recorded as cluster events (shown next to a broken invariant).
* ``conftest.py`` / ``scenario.py`` / ``settings.py``: the fixtures (one server per session, a schema,
  directory, cluster, client and assertion connection per scenario) and the environment knobs.
* ``test_*.py``: the scenarios (chaos basics, poison outcomes, network faults, hostile bodies, nodes
  presumed dead).
* ``soak.py``: runs the same scenarios repeatedly with bigger numbers (``FAULTS_SCALE``) and the
  soak-only scenarios (``FAULTS_SOAK=1``).
"""
