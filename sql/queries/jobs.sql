-- Queries on oban_jobs. Column lists are spelled out so the driver can rely on their names; jsonb
-- columns travel as text (args::text) so no connection-level codec (SQLAlchemy installs its own) can
-- change what we send or get back.

-- name: job_ack
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
RETURNING j.id, (j.unique_states & 128 <> 0) AS parked

-- name: job_ack_completed
-- The common flush: every job in the batch simply completed. A leaner statement than job_ack.
UPDATE __prefix__.oban_jobs AS j SET
    state = 'completed',
    completed_at = now(),
    unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing', 'completed')
FROM unnest(:ids::bigint[], :claims::timestamptz[]) AS a(id, claim)
WHERE j.id = a.id AND j.state = 'executing' AND j.attempted_at = a.claim
RETURNING j.id, (j.unique_states & 128 <> 0) AS parked

-- name: job_get
SELECT j.id, j.state::text AS state, j.queue, j.worker, j.args::text AS args, j.meta::text AS meta, j.tags,
       j.errors::text AS errors, j.result::text AS result, j.attempt, j.max_attempts, j.priority,
       j.inserted_at, j.scheduled_at, j.attempted_at, j.attempted_by, j.completed_at, j.cancelled_at,
       j.discarded_at
FROM __prefix__.oban_jobs AS j
WHERE j.id = ANY(:ids::bigint[])

-- name: job_insert
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
    FROM unnest(:workers::text[], :queues::text[], :args::text[], :metas::text[], :tags::text[],
                :priorities::smallint[], :max_attempts::smallint[], :scheduled_ats::timestamptz[],
                :unique_keys::bytea[], :unique_states::integer[], :unique_periods::float8[],
                :limit_keys::text[], :limit_tos::smallint[], :limit_skips::boolean[])
         WITH ORDINALITY AS t(worker, queue, args, meta, tags, priority, max_attempts, scheduled_at,
                              unique_key, unique_states, unique_period, limit_key, limit_to, limit_skip, ord)
    CROSS JOIN LATERAL (
        SELECT (CASE WHEN t.scheduled_at > now() THEN 'scheduled' ELSE 'available' END)::__prefix__.oban_job_state
    ) AS s(st)
),
ins AS (
    INSERT INTO __prefix__.oban_jobs AS j (
        id, state, queue, worker, args, meta, tags, priority, max_attempts, scheduled_at,
        unique_key, unique_states, unique_expires_at, unique_group, unique_period,
        limit_key, limit_to, limit_skip)
    SELECT i.id, i.st, i.queue, i.worker, i.args::jsonb, i.meta::jsonb,
           CASE WHEN i.tags = '[]' THEN '{}'::text[]
                ELSE ARRAY(SELECT jsonb_array_elements_text(i.tags::jsonb)) END,
           i.priority, i.max_attempts, COALESCE(i.scheduled_at, now()),
           i.unique_key, i.unique_states,
           COALESCE(i.scheduled_at, now()) + make_interval(secs => i.unique_period),
           i.unique_states, i.unique_period,
           i.limit_key, i.limit_to, i.limit_skip
    FROM input AS i
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
SELECT false, h.ord, h.id, h.state::text, h.queue, h.worker, h.args::text, h.meta::text, h.tags,
       h.errors::text, h.result::text, h.attempt, h.max_attempts, h.priority, h.inserted_at,
       h.scheduled_at, h.attempted_at, h.attempted_by, h.completed_at, h.cancelled_at, h.discarded_at
FROM holders AS h

-- name: job_insert_plain
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

-- name: job_insert_one
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

-- name: job_insert_resolve
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
    FROM unnest(:workers::text[], :queues::text[], :args::text[], :metas::text[], :tags::text[],
                :priorities::smallint[], :max_attempts::smallint[], :scheduled_ats::timestamptz[],
                :unique_keys::bytea[], :unique_states::integer[], :unique_periods::float8[],
                :limit_keys::text[], :limit_tos::smallint[], :limit_skips::boolean[])
         WITH ORDINALITY AS t(worker, queue, args, meta, tags, priority, max_attempts, scheduled_at,
                              unique_key, unique_states, unique_period, limit_key, limit_to, limit_skip, ord)
    CROSS JOIN LATERAL (
        SELECT (CASE WHEN t.scheduled_at > now() THEN 'scheduled' ELSE 'available' END)::__prefix__.oban_job_state
    ) AS s(st)
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
    INSERT INTO __prefix__.oban_jobs AS j (
        id, state, queue, worker, args, meta, tags, priority, max_attempts, scheduled_at,
        unique_key, unique_states, unique_expires_at, unique_group, unique_period,
        limit_key, limit_to, limit_skip)
    SELECT i.id, i.st, i.queue, i.worker, i.args::jsonb, i.meta::jsonb,
           CASE WHEN i.tags = '[]' THEN '{}'::text[]
                ELSE ARRAY(SELECT jsonb_array_elements_text(i.tags::jsonb)) END,
           i.priority, i.max_attempts, COALESCE(i.scheduled_at, now()),
           i.unique_key, i.unique_states,
           COALESCE(i.scheduled_at, now()) + make_interval(secs => i.unique_period),
           i.unique_states, i.unique_period,
           i.limit_key, i.limit_to, i.limit_skip
    FROM input AS i
    WHERE i.takes AND i.unique_key IN (SELECT e.unique_key FROM expired AS e)
    ORDER BY i.ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND __prefix__.oban_unique_holds(unique_states, state)
    DO NOTHING
    RETURNING j.id, j.state, j.queue, j.worker, j.args, j.meta, j.tags, j.errors, j.result, j.attempt,
              j.max_attempts, j.priority, j.inserted_at, j.scheduled_at, j.attempted_at, j.attempted_by,
              j.completed_at, j.cancelled_at, j.discarded_at, j.unique_key
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT ins.queue FROM ins WHERE ins.state = 'available') AS q
)
SELECT true AS inserted, i.ord, ins.id, ins.state::text AS state, ins.queue, ins.worker,
       ins.args::text AS args, ins.meta::text AS meta, ins.tags, ins.errors::text AS errors,
       ins.result::text AS result, ins.attempt, ins.max_attempts, ins.priority, ins.inserted_at,
       ins.scheduled_at, ins.attempted_at, ins.attempted_by, ins.completed_at, ins.cancelled_at,
       ins.discarded_at, ins.unique_key
FROM ins JOIN input AS i USING (id) CROSS JOIN woken
UNION ALL
SELECT false, NULL, j.id, j.state::text, j.queue, j.worker, j.args::text, j.meta::text, j.tags,
       j.errors::text, j.result::text, j.attempt, j.max_attempts, j.priority, j.inserted_at,
       j.scheduled_at, j.attempted_at, j.attempted_by, j.completed_at, j.cancelled_at, j.discarded_at,
       j.unique_key
FROM __prefix__.oban_jobs AS j CROSS JOIN clock
WHERE j.unique_key = ANY(:unique_keys::bytea[])
  AND j.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(j.unique_states, j.state)
  AND (j.unique_expires_at IS NULL OR j.unique_expires_at > clock.ts)

-- name: job_replace
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
RETURNING j.id, j.state::text AS state, j.queue, j.worker, j.args::text AS args, j.meta::text AS meta,
          j.tags, j.errors::text AS errors, j.result::text AS result, j.attempt, j.max_attempts,
          j.priority, j.inserted_at, j.scheduled_at, j.attempted_at, j.attempted_by, j.completed_at,
          j.cancelled_at, j.discarded_at,
          j.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(j.unique_states, j.state) AS holds

-- name: job_release_unknown
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
RETURNING j.id, j.queue, (j.unique_states & 128 <> 0) AS parked

-- name: job_claims_of
-- Ids of the jobs this node has claimed (executing), to compare with what its producers hold.
SELECT j.id FROM __prefix__.oban_jobs AS j WHERE j.state = 'executing' AND j.claimed_by = :instance

-- name: job_stage
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
    RETURNING j.id, j.queue, (j.unique_states & 128 <> 0) AS parked
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT staged.queue FROM staged) AS q
)
SELECT staged.id, staged.queue, staged.parked FROM staged CROSS JOIN woken

-- name: job_rescue
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
    RETURNING j.id, j.queue, j.state::text AS state, (j.unique_states & 128 <> 0) AS parked
),
woken AS (
    SELECT count(pg_notify(:channel, q.queue)) AS n
    FROM (SELECT DISTINCT r.queue FROM rescued AS r WHERE r.state = 'available') AS q
)
SELECT r.id, r.queue, r.state, r.parked FROM rescued AS r CROSS JOIN woken

-- name: job_prune
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

-- name: job_cancel
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
      AND NOT (j.state = 'executing' AND j.meta ? 'cancel_requested')
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
RETURNING j.id, t.was::text AS was, t.claimed_by, (j.unique_states & 128 <> 0) AS parked

-- name: job_cancel_requested
-- Jobs this node runs that a cancel_job asked to stop (the fallback for a missed interrupt NOTIFY).
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE j.state = 'executing' AND j.claimed_by = :instance AND j.meta ? 'cancel_requested'

-- name: job_retry
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
    WHERE j.id = ANY(:ids::bigint[]) AND j.state NOT IN ('available', 'executing')
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
                         THEN __prefix__.oban_unique_next(j.unique_states, t.was, 'available') & ~128
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
      AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now()) AND h.id <> ALL(:ids::bigint[])
    LIMIT 1
) AS holder

-- name: job_delete
-- Delete jobs in any state; executing ones are returned so their process can stop the task.
DELETE FROM __prefix__.oban_jobs AS j
WHERE j.id = ANY(:ids::bigint[])
RETURNING j.id, j.state::text AS was, j.claimed_by

-- name: job_unique_holder
-- Which other job holds the key of job :id right now (for parked-row conflicts and retry errors). A
-- holder past its period does not count: inserts, retries and unparking release it.
SELECT h.id, h.state::text AS state
FROM __prefix__.oban_jobs AS j
JOIN __prefix__.oban_jobs AS h ON h.unique_key = j.unique_key
WHERE j.id = :id AND h.id <> j.id
  AND h.unique_key IS NOT NULL AND __prefix__.oban_unique_holds(h.unique_states, h.state)
  AND (h.unique_expires_at IS NULL OR h.unique_expires_at > now())

-- name: job_unpark
-- A parked row takes its key back. Runs in its own short transaction with a lock_timeout so it can
-- neither fail its caller's transition nor wait long on an uncommitted holder; a 23505 here means
-- another job holds the key (see job_unpark_lost). A holder past its period gives up the key first,
-- as it would to an insert.
WITH me AS (
    SELECT j.id, j.unique_key
    FROM __prefix__.oban_jobs AS j
    WHERE j.id = :id AND j.unique_states & 128 <> 0
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
UPDATE __prefix__.oban_jobs AS j SET unique_states = j.unique_states & ~128
FROM me, (SELECT count(*) FROM released) AS r
WHERE j.id = me.id AND j.unique_states & 128 <> 0
  AND j.unique_states & __prefix__.oban_state_bit(j.state) <> 0
RETURNING j.id, j.unique_key

-- name: job_unpark_lost
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
    unique_group = COALESCE(j.unique_group, j.unique_states & ~128),
    meta = j.meta || jsonb_build_object('unique_conflict', jsonb_build_object(
        'holder', :holder::bigint, 'state', j.state::text, 'at', now(),
        'outcome', CASE WHEN j.state IN ('scheduled', 'available', 'retryable') THEN 'cancelled'
                        ELSE 'released' END))
WHERE j.id = :id AND j.unique_states & 128 <> 0
RETURNING j.id, j.state::text AS state

-- name: job_parked
-- Parked rows still waiting for their key (retried by the unique sweep).
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE j.unique_states & 128 <> 0
ORDER BY j.id
LIMIT :limit

-- name: job_unique_sweep
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

-- name: job_make_due
-- drain_queue(with_scheduled=True): make the queue's scheduled and retryable jobs due now.
UPDATE __prefix__.oban_jobs SET scheduled_at = now()
WHERE state IN ('scheduled', 'retryable') AND queue = :queue

-- name: job_fetch
-- Complete the acked jobs and claim the next ones for a producer: see oban_fetch (migration 002) for
-- how each limit is enforced.
SELECT * FROM __prefix__.oban_fetch(
    :queues::text[], :global_limits::integer[], :rate_allowed::integer[], :rate_periods::float8[],
    :rate_by::text[], :demand::integer, :node::text, :instance::uuid, :scan::integer,
    :ack_ids::bigint[], :ack_claims::timestamptz[])

-- name: queue_overview
-- Live jobs per queue and state for check_queues (finished jobs are history and not counted).
SELECT j.queue, j.state::text AS state, count(*) AS n
FROM __prefix__.oban_jobs AS j
WHERE j.state IN ('scheduled', 'available', 'executing', 'retryable')
GROUP BY j.queue, j.state

-- name: limit_overview
-- Running and waiting jobs per limit key, busiest first: so thousands of jobs waiting on a key are
-- never invisible.
SELECT j.limit_key AS key, min(j.queue) AS queue,
       count(*) FILTER (WHERE j.state = 'executing') AS running,
       count(*) FILTER (WHERE j.state = 'available') AS waiting,
       max(j.limit_to) AS limit_to, bool_or(j.limit_skip) AS skips
FROM __prefix__.oban_jobs AS j
WHERE j.state IN ('available', 'executing') AND j.limit_key IS NOT NULL
GROUP BY j.limit_key
ORDER BY waiting DESC, running DESC, key
LIMIT :limit
