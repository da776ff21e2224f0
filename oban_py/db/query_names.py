"""Query names by result kind, generated from ``sql/queries/*.sql``: do not edit.

Regenerate with ``python -m oban_py.db.codegen``. The driver method for each kind is fixed (see
``oban_py.db.sql``), so a misspelt name, or a name passed to the wrong method, fails mypy.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ManyQuery", "OneQuery", "ScalarQuery", "ExecQuery", "QueryName"]

#: Queries run with ``Driver.fetch`` (``:many``).
ManyQuery = Literal[
    "cron_states",
    "job_ack",
    "job_ack_completed",
    "job_cancel",
    "job_cancel_requested",
    "job_claims_of",
    "job_delete",
    "job_fetch",
    "job_get",
    "job_insert",
    "job_insert_one",
    "job_insert_plain",
    "job_insert_resolve",
    "job_list",
    "job_list_ids",
    "job_parked",
    "job_release_unknown",
    "job_replace",
    "job_rescue",
    "job_retry",
    "job_stage",
    "job_update",
    "limit_overview",
    "node_list",
    "queue_controls",
    "queue_names_available",
    "queue_overview",
]

#: Queries run with ``Driver.fetchrow`` (``:one``).
OneQuery = Literal[
    "job_unique_holder",
    "job_unpark",
    "job_unpark_lost",
    "jobs_dead_tuples",
]

#: Queries run with ``Driver.fetchval`` (``:scalar``).
ScalarQuery = Literal[
    "leader_elect",
    "node_heartbeat",
]

#: Queries run with ``Driver.execute`` (``:exec``).
ExecQuery = Literal[
    "cron_advance",
    "cron_pause",
    "cron_ran",
    "cron_seen",
    "job_make_due",
    "job_plan_custom",
    "job_prune",
    "job_unique_sweep",
    "jobs_vacuum",
    "leader_resign",
    "node_delete",
    "notify",
    "queue_control_upsert",
]

QueryName = Literal[ManyQuery, OneQuery, ScalarQuery, ExecQuery]
