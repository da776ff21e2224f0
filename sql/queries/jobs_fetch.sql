-- The producer's cycle: claiming jobs, acking them, and reconciling this node's claims.

-- name: job_ack :many
-- Final (or interim) state for a batch of executed jobs, one statement per flush. The guard
-- `state = 'executing' AND attempted_at = claim` makes a late ack from a node that was presumed dead
-- a no-op: once the job was rescued or claimed again, the claim time no longer matches.
-- Rows that re-enter their unique group (a snooze into the `scheduled` group, for one) come back
-- flagged `parked` so the caller can try to take their key back. A job whose cancel was requested
-- while it ran is cancelled rather than retried, snoozed, discarded or returned to the queue: the
-- request is read from the row as updated (`j.meta`), so a cancel that commits while this waits on
-- the row lock is seen.
WITH a AS (
    SELECT *
    FROM unnest(:ids::bigint[], :claims::timestamptz[], :states::text[], :delays::float8[],
                :errors::text[], :results::text[], :metas::text[], :attempt_deltas::smallint[])
         AS a(id, claim, state, delay, error, result, meta, attempt_delta)
    ORDER BY a.id
)
UPDATE __prefix__.oban_jobs AS j SET
    state = CASE WHEN j.meta ? 'cancel_requested' AND a.state IN ('retryable', 'scheduled', 'available', 'discarded')
                 THEN 'cancelled' ELSE a.state END::__prefix__.oban_job_state,
    completed_at = CASE WHEN a.state = 'completed' THEN now() ELSE j.completed_at END,
    cancelled_at = CASE WHEN a.state = 'cancelled' OR (j.meta ? 'cancel_requested' AND a.state <> 'completed')
                        THEN now() ELSE j.cancelled_at END,
    discarded_at = CASE WHEN a.state = 'discarded' AND NOT j.meta ? 'cancel_requested' THEN now()
                        ELSE j.discarded_at END,
    scheduled_at = CASE WHEN a.delay IS NULL OR j.meta ? 'cancel_requested' THEN j.scheduled_at
                        ELSE now() + make_interval(secs => a.delay) END,
    errors = CASE WHEN a.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(a.error::jsonb) END,
    result = COALESCE(a.result::jsonb, j.result),
    meta = CASE WHEN a.meta IS NULL THEN j.meta ELSE j.meta || a.meta::jsonb END,
    attempt = j.attempt + a.attempt_delta,
    claimed_by = CASE WHEN a.state = 'available' AND NOT j.meta ? 'cancel_requested' THEN NULL
                      ELSE j.claimed_by END,
    unique_states = __prefix__.oban_unique_next(j.unique_states, j.state,
        (CASE WHEN j.meta ? 'cancel_requested' AND a.state IN ('retryable', 'scheduled', 'available', 'discarded')
              THEN 'cancelled' ELSE a.state END)::__prefix__.oban_job_state)
FROM a
WHERE j.id = a.id AND j.state = 'executing' AND j.attempted_at = a.claim
RETURNING j.id, (j.unique_states & __parked__ <> 0) AS parked

-- name: job_ack_completed :many
-- The common flush: every job in the batch simply completed. A leaner statement than job_ack.
UPDATE __prefix__.oban_jobs AS j SET
    state = 'completed',
    completed_at = now(),
    unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing', 'completed')
FROM unnest(:ids::bigint[], :claims::timestamptz[]) AS a(id, claim)
WHERE j.id = a.id AND j.state = 'executing' AND j.attempted_at = a.claim
RETURNING j.id, (j.unique_states & __parked__ <> 0) AS parked

-- name: job_cancel_requested :many
-- Jobs this node runs that a cancel_job asked to stop (the fallback for a missed interrupt NOTIFY).
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE j.state = 'executing' AND j.claimed_by = :instance AND j.meta ? 'cancel_requested'

-- name: job_claims_of :many
-- Ids of the jobs this node has claimed (executing), to compare with what its producers hold.
SELECT j.id FROM __prefix__.oban_jobs AS j WHERE j.state = 'executing' AND j.claimed_by = :instance

-- name: job_fetch :many
-- Complete the acked jobs and claim the next ones for a producer: see oban_fetch_v1
-- (sql/functions/oban_fetch_v1.sql, created by migration 004) for how each limit is enforced.
SELECT * FROM __prefix__.oban_fetch_v1(
    :queues::text[], :global_limits::integer[], :rate_allowed::integer[], :rate_periods::float8[],
    :rate_by::text[], :demand::integer, :node::text, :instance::uuid, :scan::integer,
    :ack_ids::bigint[], :ack_claims::timestamptz[])

-- name: job_release_unknown :many
-- Put back every job this node claimed but none of its producers holds (a fetch whose reply was lost),
-- as if the claim never happened. The node runs it only while no producer cycle is in flight, so
-- `known` covers every claim a producer has seen: another producer's fresh claims are never touched.
-- One whose cancel was requested meanwhile is cancelled instead.
UPDATE __prefix__.oban_jobs AS j SET
    state = CASE WHEN j.meta ? 'cancel_requested' THEN 'cancelled' ELSE 'available' END::__prefix__.oban_job_state,
    cancelled_at = CASE WHEN j.meta ? 'cancel_requested' THEN now() ELSE j.cancelled_at END,
    attempt = greatest(j.attempt - 1, 0),
    claimed_by = NULL,
    unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing',
        CASE WHEN j.meta ? 'cancel_requested' THEN 'cancelled' ELSE 'available' END::__prefix__.oban_job_state)
WHERE j.state = 'executing' AND j.claimed_by = :instance
  AND NOT EXISTS (SELECT 1 FROM unnest(:known::bigint[]) AS k(id) WHERE k.id = j.id)
RETURNING j.id, j.queue, (j.unique_states & __parked__ <> 0) AS parked
