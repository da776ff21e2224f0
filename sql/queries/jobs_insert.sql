-- Inserting jobs (oban_py/_insert.py): plain, unique and limited chunks, conflict resolution, replace.

-- name: job_insert :many
-- A chunk of jobs, some unique or limited. Each row gets its id up front from the sequence, so results
-- map back to input order by id rather than by trusting RETURNING order; rows are inserted in input
-- order, which the caller makes key order so that concurrent batches cannot deadlock. A row whose
-- unique key is held is skipped by ON CONFLICT DO NOTHING: nothing is written to the holder (no dead
-- tuple, no row lock). Holders that were committed before this statement are returned right here;
-- a row whose holder committed while we waited on it, or whose holder's period is over, is resolved
-- by a fresh statement (job_insert_resolve). One NOTIFY per queue wakes its producers (PostgreSQL also
-- folds identical notifications within a transaction).
-- A row inserted in a state outside its group (`takes` false: an immediate job of the `scheduled`
-- group) never holds its key, so the index cannot stop it: it is a duplicate when a live holder
-- exists (it gets that holder back) and is inserted, holding nothing, when none does. The caller
-- sends at most one row per key that might take it, last among that key's rows.
WITH input AS (
    SELECT nextval('__prefix__.oban_jobs_id_seq') AS id, t.*, s.st,
           t.unique_key IS NULL OR t.unique_states & __prefix__.oban_state_bit(s.st) <> 0 AS takes
    FROM {{insert_input}}
),
ins AS (
    {{insert_rows}}
    LEFT JOIN LATERAL (
        SELECT h.id FROM __prefix__.oban_jobs AS h
        WHERE NOT i.takes AND h.unique_key = i.unique_key
          AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
          AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now())
        LIMIT 1
    ) AS live ON true
    WHERE live.id IS NULL
    ORDER BY i.ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND __prefix__.oban_unique_holds(unique_states, state)
    DO NOTHING
    RETURNING j.id, j.state, j.inserted_at, j.scheduled_at
),
holders AS (
    SELECT i.ord, h.*
    FROM input AS i
    JOIN __prefix__.oban_jobs AS h ON h.unique_key = i.unique_key
    WHERE i.unique_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = i.id)
      AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
      AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now())
),
woken AS (SELECT count(pg_notify(:channel, q)) AS n FROM unnest(:notify::text[]) AS q)
SELECT true AS inserted, i.ord, ins.id, ins.state::text AS state, NULL AS queue, NULL AS worker,
       NULL AS args, NULL AS meta, NULL::text[] AS tags, NULL AS errors, NULL AS result,
       NULL::smallint AS attempt, NULL::smallint AS max_attempts, NULL::smallint AS priority,
       ins.inserted_at, ins.scheduled_at, NULL::timestamptz AS attempted_at, NULL AS attempted_by,
       NULL::timestamptz AS completed_at, NULL::timestamptz AS cancelled_at, NULL::timestamptz AS discarded_at
FROM ins JOIN input AS i USING (id) CROSS JOIN woken
UNION ALL
SELECT false, h.ord, {{job_columns(h)}}
FROM holders AS h

-- name: job_insert_one :many
-- job_insert for a single job: a plain VALUES row is cheaper to plan and run than unnest + join,
-- and a single insert is the most common call. Same conflict and NOTIFY behaviour. Only for a job
-- that takes its key in either insert state (the caller sends the others through job_insert).
INSERT INTO __prefix__.oban_jobs AS j (
    state, queue, worker, args, meta, tags, priority, max_attempts, scheduled_at,
    unique_key, unique_states, unique_expires_at, unique_group, unique_period,
    limit_key, limit_to, limit_skip)
VALUES (
    (CASE WHEN :scheduled_at::timestamptz > now() THEN 'scheduled' ELSE 'available' END)::__prefix__.oban_job_state,
    :queue, :worker, :args::text::jsonb, :meta::text::jsonb, :tags::text[], :priority, :max_attempts,
    COALESCE(:scheduled_at::timestamptz, now()), :unique_key::bytea, :unique_states::integer,
    COALESCE(:scheduled_at::timestamptz, now()) + make_interval(secs => :unique_period::float8),
    :unique_states::integer, :unique_period::float8,
    :limit_key::text, :limit_to::smallint, :limit_skip::boolean)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND __prefix__.oban_unique_holds(unique_states, state)
DO NOTHING
RETURNING 1 AS ord, j.id, j.state::text AS state, j.inserted_at, j.scheduled_at,
          -- pg_notify returns void: wrap it so the row carries a plain boolean.
          (CASE WHEN j.state = 'available' THEN pg_notify(:channel, j.queue) END) IS NULL AS woken

-- name: job_insert_plain :many
-- job_insert for a chunk with no unique or limited job (the common bulk insert): fewer columns to
-- send and no conflict to resolve.
WITH input AS (
    SELECT nextval('__prefix__.oban_jobs_id_seq') AS id, t.*
    FROM unnest(:workers::text[], :queues::text[], :args::text[], :metas::text[], :tags::text[],
                :priorities::smallint[], :max_attempts::smallint[], :scheduled_ats::timestamptz[])
         WITH ORDINALITY AS t(worker, queue, args, meta, tags, priority, max_attempts, scheduled_at, ord)
),
ins AS (
    INSERT INTO __prefix__.oban_jobs AS j (
        id, state, queue, worker, args, meta, tags, priority, max_attempts, scheduled_at)
    SELECT i.id,
           (CASE WHEN i.scheduled_at > now() THEN 'scheduled' ELSE 'available' END)::__prefix__.oban_job_state,
           i.queue, i.worker, i.args::jsonb, i.meta::jsonb,
           CASE WHEN i.tags = '[]' THEN '{}'::text[]
                ELSE ARRAY(SELECT jsonb_array_elements_text(i.tags::jsonb)) END,
           i.priority, i.max_attempts, COALESCE(i.scheduled_at, now())
    FROM input AS i
    RETURNING j.id, j.state, j.inserted_at, j.scheduled_at
),
woken AS (SELECT count(pg_notify(:channel, q)) AS n FROM unnest(:notify::text[]) AS q)
SELECT i.ord, ins.id, ins.state::text AS state, ins.inserted_at, ins.scheduled_at
FROM ins JOIN input AS i USING (id) CROSS JOIN woken

-- name: job_insert_resolve :many
-- Second step for unique rows the first INSERT skipped, in a fresh statement so it sees holders that
-- committed while that INSERT waited on them. Holders whose period has passed lose their key (their
-- window is over; they keep unique_group, so a manual retry can take a key again) and the waiting rows
-- are inserted in their place; every other row gets its live holder back. A row that gets neither (its
-- holder left the group in between, or a new holder appeared during this statement) is retried by the
-- caller. Expired holders are locked in (unique_key, id) order, the order inserts take keys in. Rows
-- that would not take their key (see job_insert) are never inserted here, only answered.
WITH clock AS (SELECT clock_timestamp() AS ts),
input AS (
    SELECT nextval('__prefix__.oban_jobs_id_seq') AS id, t.*, s.st,
           t.unique_states & __prefix__.oban_state_bit(s.st) <> 0 AS takes
    FROM {{insert_input}}
),
stale AS (
    SELECT j.id
    FROM __prefix__.oban_jobs AS j, clock
    WHERE j.unique_key = ANY(:unique_keys::bytea[])
      AND j.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(j.unique_states, j.state)
      AND j.unique_expires_at <= clock.ts
    ORDER BY j.unique_key, j.id
    FOR UPDATE OF j
),
expired AS (
    UPDATE __prefix__.oban_jobs AS j SET unique_states = 0
    FROM stale
    WHERE j.id = stale.id
    RETURNING j.unique_key
),
ins AS (
    {{insert_rows}}
    WHERE i.takes AND i.unique_key IN (SELECT e.unique_key FROM expired AS e)
    ORDER BY i.ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND __prefix__.oban_unique_holds(unique_states, state)
    DO NOTHING
    RETURNING {{job_columns}}, j.unique_key
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT ins.queue FROM ins WHERE ins.state = 'available') AS q
)
-- ins already holds the job row projection (its RETURNING), so both branches share it.
SELECT true AS inserted, i.ord, ins.*
FROM ins JOIN input AS i USING (id) CROSS JOIN woken
UNION ALL
SELECT false, NULL, {{job_columns}}, j.unique_key
FROM __prefix__.oban_jobs AS j CROSS JOIN clock
WHERE j.unique_key = ANY(:unique_keys::bytea[])
  AND j.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(j.unique_states, j.state)
  AND (j.unique_expires_at IS NULL OR j.unique_expires_at > clock.ts)

-- name: job_replace :many
-- `replace={state: [fields]}` on a conflict: overwrite the listed fields of holders that are in one of
-- the listed states (checked again under the row lock, so a holder that started meanwhile is left
-- alone). A new scheduled_at also moves the key's expiry, and moves an available holder to scheduled
-- when the new time is in the future (or a scheduled one to available when it is not). Holders are
-- locked in (unique_key, id) order, the order inserts take keys in, so two batches (or a batch and a
-- cancel) cannot lock each other's holders crosswise. `holds` tells the caller whether the holder still
-- holds its key (a debounce that makes a `scheduled` group job due now takes it out of its group).
WITH r AS (
    SELECT *
    FROM unnest(:ids::bigint[], :replaces::text[], :args::text[], :metas::text[], :tags::text[],
                :priorities::smallint[], :max_attempts::smallint[], :queues::text[],
                :scheduled_ats::timestamptz[], :unique_periods::float8[])
         AS r(id, replace, args, meta, tags, priority, max_attempts, queue, scheduled_at, unique_period)
),
target AS (
    SELECT r.*, (r.replace::jsonb -> j.state::text) AS fields
    FROM __prefix__.oban_jobs AS j JOIN r USING (id)
    WHERE r.replace::jsonb ? j.state::text
    ORDER BY j.unique_key, j.id
    FOR UPDATE OF j
)
UPDATE __prefix__.oban_jobs AS j SET
    args = CASE WHEN t.fields ? 'args' THEN t.args::jsonb ELSE j.args END,
    meta = CASE WHEN t.fields ? 'meta' THEN t.meta::jsonb ELSE j.meta END,
    tags = CASE WHEN t.fields ? 'tags'
                THEN ARRAY(SELECT jsonb_array_elements_text(t.tags::jsonb)) ELSE j.tags END,
    priority = CASE WHEN t.fields ? 'priority' THEN t.priority ELSE j.priority END,
    max_attempts = CASE WHEN t.fields ? 'max_attempts' THEN greatest(t.max_attempts, j.attempt, 1)
                        ELSE j.max_attempts END,
    queue = CASE WHEN t.fields ? 'queue' THEN t.queue ELSE j.queue END,
    scheduled_at = CASE WHEN t.fields ? 'scheduled_at' THEN COALESCE(t.scheduled_at, now())
                        ELSE j.scheduled_at END,
    unique_expires_at = CASE WHEN t.fields ? 'scheduled_at'
                             THEN COALESCE(t.scheduled_at, now()) + make_interval(secs => t.unique_period)
                             ELSE j.unique_expires_at END,
    unique_period = CASE WHEN t.fields ? 'scheduled_at' AND j.unique_group IS NOT NULL THEN t.unique_period
                         ELSE j.unique_period END,
    state = CASE
        WHEN NOT t.fields ? 'scheduled_at' OR j.state NOT IN ('available', 'scheduled') THEN j.state
        WHEN COALESCE(t.scheduled_at, now()) > now() THEN 'scheduled'::__prefix__.oban_job_state
        ELSE 'available'::__prefix__.oban_job_state END
FROM target AS t
WHERE j.id = t.id
RETURNING {{job_columns}},
          j.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(j.unique_states, j.state) AS holds
