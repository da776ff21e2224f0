"""Bits of ``oban_jobs.unique_states`` that are flags, not states, shared by Python and SQL.

The low seven bits are the states a row holds its unique key in (``oban_py.unique.STATE_BITS``). A
flag lives here, below the package's other modules, so both ``oban_py.unique`` and the SQL loader
(which writes it into queries as ``__parked__``) can import it without an import cycle.
"""

from __future__ import annotations

__all__ = ["PARKED"]

#: The row is in a state of its group but does not hold the key yet: it re-entered the group (a
#: snooze, a retry, a return to the queue) and must take the key back, or lose it to the holder.
#: Migration 001 documents the bit layout; ``oban_jobs_unique_parked_idx`` indexes the flag.
PARKED = 128
