-- Jobs by id, for the Oban facade: get, cancel, delete, retry, and making a queue due. Cancel, delete
-- and retry also take the filter of their filtered form (job_filter's match_*, all NULL when called by
-- id): the ids were selected by that filter beforehand, and a row that has stopped matching since (a
-- completed job retried and started meanwhile) must be left alone. Their locking read re-checks it.

-- name: job_cancel :many
-- Cancel jobs that have not finished. A running job is not moved at once: its body may still run, so
-- it keeps its claim and its limit slot. It gets a cancel request (meta.cancel_requested), its node is
-- told to stop it (the caller sends the interrupt), and its ack, or its rescue when the node is gone,
-- makes it cancelled; it is never retried. Rows are locked in (unique_key, id) order, the order
-- inserts and replaces take keys in, so overlapping cancels, replaces and inserts cannot wait on each
-- other in a cycle.
WITH t AS (
    SELECT j.id, j.state AS was, j.claimed_by
    FROM __prefix__.oban_jobs AS j
    WHERE j.id = ANY(:ids::bigint[]) AND j.state NOT IN ('completed', 'discarded', 'cancelled')
      AND NOT (j.state = 'executing' AND j.meta ? 'cancel_requested') AND {{job_filter}}
    ORDER BY j.unique_key, j.id
    FOR UPDATE
)
UPDATE __prefix__.oban_jobs AS j SET
    state = CASE WHEN t.was = 'executing' THEN j.state ELSE 'cancelled' END,
    cancelled_at = CASE WHEN t.was = 'executing' THEN j.cancelled_at ELSE now() END,
    meta = CASE WHEN t.was = 'executing'
                THEN j.meta || jsonb_build_object('cancel_requested', jsonb_build_object('at', now()))
                ELSE j.meta END,
    errors = CASE WHEN :reason::text IS NULL THEN j.errors
                  ELSE j.errors || jsonb_build_array(jsonb_build_object(
                      'attempt', j.attempt, 'at', now(), 'kind', 'cancelled', 'error', :reason::text)) END,
    unique_states = CASE WHEN t.was = 'executing' THEN j.unique_states
                         ELSE __prefix__.oban_unique_next(j.unique_states, t.was, 'cancelled') END
FROM t
WHERE j.id = t.id
RETURNING j.id, t.was::text AS was, t.claimed_by, (j.unique_states & __parked__ <> 0) AS parked

-- name: job_delete :many
-- Delete jobs in any state; executing ones are returned so their process can stop the task.
DELETE FROM __prefix__.oban_jobs AS j
WHERE j.id = ANY(:ids::bigint[]) AND {{job_filter}}
RETURNING j.id, j.state::text AS was, j.claimed_by

-- name: job_get :many
SELECT {{job_columns}}
FROM __prefix__.oban_jobs AS j
WHERE j.id = ANY(:ids::bigint[])

-- name: job_make_due :exec
-- drain_queue(with_scheduled=True): make the queue's scheduled and retryable jobs due now.
UPDATE __prefix__.oban_jobs SET scheduled_at = now()
WHERE state IN ('scheduled', 'retryable') AND queue = :queue

-- name: job_retry :many
-- Make jobs available again now (manual retry). A manual retry is an insert of the job again: it gets
-- its own unique options back (unique_group, even if it had given up its key: lost to another holder,
-- released when it started, or past its period) and a fresh window from now (unique_period). It takes
-- its key directly: if another job holds it, the statement fails with 23505 and the caller reports that
-- holder instead of retrying (nothing is changed). Holders of those keys whose period is over give up
-- their key first, as an insert would make them. A job that does not take its key when available (the
-- `scheduled` group) comes back with `holder`, a live holder of its key if there is one: the caller
-- raises for it as well. Rows without unique_group (inserted before migration 003) keep the old rule.
WITH t AS (
    SELECT j.id, j.state AS was, j.unique_key
    FROM __prefix__.oban_jobs AS j
    WHERE j.id = ANY(:ids::bigint[]) AND j.state NOT IN ('available', 'executing') AND {{job_filter}}
    ORDER BY j.unique_key, j.id
    FOR UPDATE
),
stale AS (
    SELECT h.id
    FROM __prefix__.oban_jobs AS h
    WHERE h.unique_key IN (SELECT t.unique_key FROM t)
      AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
      AND h.unique_expires_at <= now() AND h.id <> ALL(:ids::bigint[])
    ORDER BY h.unique_key, h.id
    FOR UPDATE OF h
),
released AS (
    UPDATE __prefix__.oban_jobs AS h SET unique_states = 0
    FROM stale
    WHERE h.id = stale.id
    RETURNING h.id
)
UPDATE __prefix__.oban_jobs AS j SET
    state = 'available',
    scheduled_at = now(),
    completed_at = NULL, cancelled_at = NULL, discarded_at = NULL,
    max_attempts = greatest(j.max_attempts, j.attempt + 1),
    meta = j.meta - 'cancel_requested',  -- a cancel request was for the attempt it ended
    unique_states = CASE WHEN j.unique_group IS NULL
                         THEN __prefix__.oban_unique_next(j.unique_states, t.was, 'available') & ~__parked__
                         ELSE j.unique_group END,
    unique_expires_at = CASE WHEN j.unique_period IS NULL THEN j.unique_expires_at
                             ELSE now() + make_interval(secs => j.unique_period) END
FROM t, (SELECT count(*) FROM released) AS r
WHERE j.id = t.id
RETURNING j.id, j.queue, (
    SELECT h.id
    FROM __prefix__.oban_jobs AS h
    WHERE j.unique_key IS NOT NULL AND NOT __prefix__.oban_unique_holds(j.unique_states, j.state)
      AND h.unique_key = j.unique_key
      AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
      AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now())
      AND h.id NOT IN (SELECT t.id FROM t)  -- not one retried here (an id left out by the filter can hold)
    LIMIT 1
) AS holder
