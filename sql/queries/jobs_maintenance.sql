-- Maintenance of oban_jobs: staging due jobs, rescuing orphans, pruning history.

-- name: job_prune :exec
-- Delete finished jobs older than max_age, a bounded batch per pass (leader only). Deleting a
-- finished holder also frees its unique key: uniqueness without a period lasts while the row exists.
WITH old AS (
    SELECT id FROM __prefix__.oban_jobs
    WHERE state IN ('completed', 'cancelled', 'discarded')
      AND COALESCE(completed_at, cancelled_at, discarded_at) < now() - make_interval(secs => :max_age)
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
DELETE FROM __prefix__.oban_jobs AS j USING old WHERE j.id = old.id

-- name: job_rescue :many
-- Jobs claimed by processes that stopped heartbeating more than `rescue_after` seconds ago (or whose
-- process never registered) go back to available, or to discarded when out of attempts (cancelled
-- when a cancel was requested while they ran). A dead node's rows are deleted in the same statement,
-- so its slots free exactly once: when its jobs are rescued.
-- The queues that got jobs back are notified, so every node's producers see them at once.
WITH dead AS (
    DELETE FROM __prefix__.oban_nodes
    WHERE heartbeat_at < now() - make_interval(secs => :rescue_after) AND instance <> :instance
    RETURNING instance
),
live AS (
    SELECT instance FROM __prefix__.oban_nodes
    WHERE heartbeat_at >= now() - make_interval(secs => :rescue_after) OR instance = :instance
),
orphans AS (
    SELECT j.id,
           (CASE WHEN j.meta ? 'cancel_requested' THEN 'cancelled'
                 WHEN j.attempt >= j.max_attempts THEN 'discarded'
                 ELSE 'available' END)::__prefix__.oban_job_state AS next_state
    FROM __prefix__.oban_jobs AS j
    WHERE j.state = 'executing'
      AND (j.claimed_by IS NULL OR j.claimed_by NOT IN (SELECT live.instance FROM live))
    ORDER BY j.id
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
),
rescued AS (
    UPDATE __prefix__.oban_jobs AS j SET
        state = o.next_state,
        discarded_at = CASE WHEN o.next_state = 'discarded' THEN now() ELSE j.discarded_at END,
        cancelled_at = CASE WHEN o.next_state = 'cancelled' THEN now() ELSE j.cancelled_at END,
        claimed_by = NULL,
        meta = j.meta || jsonb_build_object('rescued', COALESCE((j.meta ->> 'rescued')::int, 0) + 1),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'kind', 'rescued',
            'error', 'the process running this job (node ' || COALESCE(j.attempted_by, '?') ||
                     ') stopped heartbeating')),
        unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing', o.next_state)
    FROM orphans AS o, (SELECT count(*) FROM dead) AS d
    WHERE j.id = o.id
    RETURNING j.id, j.queue, j.state::text AS state, (j.unique_states & __parked__ <> 0) AS parked
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT r.queue FROM rescued AS r WHERE r.state = 'available') AS q
)
SELECT r.id, r.queue, r.state, r.parked FROM rescued AS r CROSS JOIN woken

-- name: job_stage :many
-- Scheduled and retryable jobs whose time has come become available. Every node runs this; SKIP LOCKED
-- keeps them from waiting on each other and the LIMIT bounds each pass. The queues that got jobs are
-- notified (once per queue) and returned so local producers can be woken without a round trip.
WITH due AS (
    SELECT id FROM __prefix__.oban_jobs
    WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= now()
    ORDER BY scheduled_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
),
staged AS (
    UPDATE __prefix__.oban_jobs AS j SET
        state = 'available',
        unique_states = __prefix__.oban_unique_next(j.unique_states, j.state, 'available')
    FROM due
    WHERE j.id = due.id
    RETURNING j.id, j.queue, (j.unique_states & __parked__ <> 0) AS parked
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT staged.queue FROM staged) AS q
)
SELECT staged.id, staged.queue, staged.parked FROM staged CROSS JOIN woken
