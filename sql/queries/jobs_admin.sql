-- Finding and changing jobs by filter, for operators: list_jobs, update_jobs, and the filtered forms of
-- retry/cancel/delete (`oban-py jobs ...`). Every optional filter is written `(:x IS NULL OR ...)`: the
-- caller runs these with plan_cache_mode = force_custom_plan (job_plan_custom), so each call is planned
-- with its own values, the unused filters fold away and the used ones can pick their index. A generic
-- plan could use none of them.

-- fragment: job_filter
-- The filters of list_jobs, for a row aliased `j` (match_*: their own names, so a statement can take
-- them next to its own parameters). The filtered cancel/delete/retry/update repeat them in the statement
-- that locks or deletes the rows, so a row that stopped matching since it was selected is left alone:
-- under READ COMMITTED a locking read re-checks its WHERE on the row's newest version. The tags test
-- repeats the tags index's predicate (tags <> '{}') so the planner can prove the partial index applies.
(:match_states::__prefix__.oban_job_state[] IS NULL OR j.state = ANY(:match_states::__prefix__.oban_job_state[]))
AND (:match_queue::text IS NULL OR j.queue = :match_queue::text)
AND (:match_worker::text IS NULL OR j.worker = :match_worker::text)
AND (:match_args::jsonb IS NULL OR j.args @> :match_args::jsonb)
AND (:match_tags::text[] IS NULL OR (j.tags @> :match_tags::text[] AND j.tags <> '{}'))
AND (:match_ids::bigint[] IS NULL OR j.id = ANY(:match_ids::bigint[]))

-- name: job_list :many
-- A page of jobs matching the filters, newest first (keyset: id < before_id). Two branches, because
-- the filter indexes of migration 006 leave out the hot states: available and executing rows (the
-- working set) come through the fetch and executing indexes, every other row through the filter
-- indexes. Each branch reads at most :limit rows in id order; `hot`/`cold` (from the state filter)
-- switch off a branch that cannot match, which otherwise could scan the whole table for nothing.
SELECT {{job_columns}}
FROM (
    (SELECT j.* FROM __prefix__.oban_jobs AS j
     WHERE :hot::boolean AND (j.state = 'available' OR j.state = 'executing') AND {{job_filter}}
       AND (:before_id::bigint IS NULL OR j.id < :before_id::bigint)
     ORDER BY j.id DESC LIMIT :limit)
    UNION ALL
    (SELECT j.* FROM __prefix__.oban_jobs AS j
     WHERE :cold::boolean AND j.state NOT IN ('available', 'executing') AND {{job_filter}}
       AND (:before_id::bigint IS NULL OR j.id < :before_id::bigint)
     ORDER BY j.id DESC LIMIT :limit)
) AS j
ORDER BY j.id DESC
LIMIT :limit

-- name: job_list_ids :many
-- Every id matching the filters (the filtered retry/cancel/delete/update, whose statements then
-- re-check the filter on the rows they lock), by the same two branches.
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE :hot::boolean AND (j.state = 'available' OR j.state = 'executing') AND {{job_filter}}
UNION ALL
SELECT j.id FROM __prefix__.oban_jobs AS j
WHERE :cold::boolean AND j.state NOT IN ('available', 'executing') AND {{job_filter}}

-- name: job_plan_custom :exec
-- Plan each statement of this transaction for its own parameter values (see the top of this file).
SET LOCAL plan_cache_mode = force_custom_plan

-- name: job_update :many
-- Change jobs that have not started (available or scheduled; others are left out): priority, queue,
-- tags and scheduled_at are replaced when given (NULL keeps the column), meta is merged (top-level
-- keys). A new scheduled_at decides the state, as an insert would: in the future, scheduled; else
-- available. A job that so re-enters its unique group comes back `parked`, for the caller to take its
-- key back in the same transaction (or fail naming the holder). The unique key itself is not
-- recomputed: it stays the one the job was inserted with. Rows are locked in (unique_key, id) order,
-- as every other writer takes them; the filtered form passes its filter (match_*, NULL when by id)
-- and rows that no longer match when locked are left out.
WITH t AS (
    SELECT j.id, j.state AS was, j.queue AS was_queue
    FROM __prefix__.oban_jobs AS j
    WHERE j.id = ANY(:ids::bigint[]) AND j.state IN ('available', 'scheduled') AND {{job_filter}}
    ORDER BY j.unique_key, j.id
    FOR UPDATE
)
UPDATE __prefix__.oban_jobs AS j SET
    priority = COALESCE(:priority::smallint, j.priority),
    queue = COALESCE(:queue::text, j.queue),
    tags = COALESCE(:tags::text[], j.tags),
    meta = j.meta || COALESCE(:meta::jsonb, '{}'),
    scheduled_at = COALESCE(:scheduled_at::timestamptz, j.scheduled_at),
    state = s.st,
    unique_states = __prefix__.oban_unique_next(j.unique_states, t.was, s.st)
FROM t CROSS JOIN LATERAL (
    SELECT (CASE WHEN :scheduled_at::timestamptz IS NULL THEN t.was::text
                 WHEN :scheduled_at::timestamptz > now() THEN 'scheduled'
                 ELSE 'available' END)::__prefix__.oban_job_state
) AS s(st)
WHERE j.id = t.id
RETURNING {{job_columns}}, t.was::text AS was, t.was_queue, (j.unique_states & __parked__ <> 0) AS parked
