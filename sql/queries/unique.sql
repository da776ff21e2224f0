-- Unique keys: who holds one, parked rows taking theirs back, and the sweep of expired ones.

-- name: job_parked :many
-- Parked rows still waiting for their key (retried by the unique sweep).
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE j.unique_states & __parked__ <> 0
ORDER BY j.id
LIMIT :limit

-- name: job_unique_holder :one
-- Which other job holds the key of job :id right now (for parked-row conflicts and retry errors). A
-- holder past its period does not count: inserts, retries and unparking release it.
SELECT h.id, h.state::text AS state
FROM __prefix__.oban_jobs AS j
JOIN __prefix__.oban_jobs AS h ON h.unique_key = j.unique_key
WHERE j.id = :id AND h.id <> j.id
  AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
  AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now())

-- name: job_unique_sweep :exec
-- Release keys whose period has passed, so the unique index only holds live keys. Inserts already
-- treat such holders as gone; this keeps the index small. Leader only, bounded per pass. A released
-- row keeps unique_group: a manual retry of it takes its key again, with a fresh period.
WITH expired AS (
    SELECT id FROM __prefix__.oban_jobs
    WHERE unique_key IS NOT NULL AND unique_expires_at IS NOT NULL
      AND __prefix__.oban_unique_holds(unique_states, state)
      AND unique_expires_at <= now()
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE __prefix__.oban_jobs AS j SET unique_states = 0
FROM expired WHERE j.id = expired.id

-- name: job_unpark :one
-- A parked row takes its key back. Runs in its own short transaction with a lock_timeout so it can
-- neither fail its caller's transition nor wait long on an uncommitted holder; a 23505 here means
-- another job holds the key (see job_unpark_lost). A holder past its period gives up the key first,
-- as it would to an insert.
WITH me AS (
    SELECT j.id, j.unique_key
    FROM __prefix__.oban_jobs AS j
    WHERE j.id = :id AND j.unique_states & __parked__ <> 0
      AND j.unique_states & __prefix__.oban_state_bit(j.state) <> 0
),
stale AS (
    SELECT h.id
    FROM __prefix__.oban_jobs AS h JOIN me ON h.unique_key = me.unique_key
    WHERE h.id <> me.id
      AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
      AND h.unique_expires_at <= now()
    FOR UPDATE OF h
),
released AS (
    UPDATE __prefix__.oban_jobs AS h SET unique_states = 0
    FROM stale
    WHERE h.id = stale.id
    RETURNING h.id
)
UPDATE __prefix__.oban_jobs AS j SET unique_states = j.unique_states & ~__parked__
FROM me, (SELECT count(*) FROM released) AS r
WHERE j.id = me.id AND j.unique_states & __parked__ <> 0
  AND j.unique_states & __prefix__.oban_state_bit(j.state) <> 0
RETURNING j.id, j.unique_key

-- name: job_unpark_lost :one
-- A parked row whose key is held by another job: one that has not started is cancelled as a duplicate
-- of the holder; one that already runs keeps running without the key. Either way the outcome is
-- recorded in meta.unique_conflict, and the row stops wanting the key (unique_states 0, so it holds
-- nothing in any state, `cancelled` included). Its options stay in unique_group: a manual retry meets
-- the index again (rows from before migration 003 get unique_group here).
UPDATE __prefix__.oban_jobs AS j SET
    state = CASE WHEN j.state IN ('scheduled', 'available', 'retryable') THEN 'cancelled'::__prefix__.oban_job_state
                 ELSE j.state END,
    cancelled_at = CASE WHEN j.state IN ('scheduled', 'available', 'retryable') THEN now()
                        ELSE j.cancelled_at END,
    unique_states = 0,
    unique_group = COALESCE(j.unique_group, j.unique_states & ~__parked__),
    meta = j.meta || jsonb_build_object('unique_conflict', jsonb_build_object(
        'holder', :holder::bigint, 'state', j.state::text, 'at', now(),
        'outcome', CASE WHEN j.state IN ('scheduled', 'available', 'retryable') THEN 'cancelled'
                        ELSE 'released' END))
WHERE j.id = :id AND j.unique_states & __parked__ <> 0
RETURNING j.id, j.state::text AS state
