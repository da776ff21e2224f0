-- Fragments: text shared by several queries, spliced in where a query writes {{name}} or, for a
-- table alias other than `j`, {{name(alias)}}.

-- fragment: job_columns
-- The job row as oban_py/db/rows.py reads it (job_from_record), for a row aliased `j`. Column names
-- are spelled out so the driver can rely on them; jsonb columns travel as text (args::text) so no
-- connection-level codec (SQLAlchemy installs its own) can change what we send or get back.
j.id, j.state::text AS state, j.queue, j.worker, j.args::text AS args, j.meta::text AS meta, j.tags,
j.errors::text AS errors, j.result::text AS result, j.attempt, j.max_attempts, j.priority,
j.inserted_at, j.scheduled_at, j.attempted_at, j.attempted_by, j.completed_at, j.cancelled_at,
j.discarded_at

-- fragment: insert_input
-- A chunk of jobs to insert, one array per column (job_insert, job_insert_resolve), with `st`, the
-- state each row goes in as. Follows FROM; the caller names the CTE `input`.
unnest(:workers::text[], :queues::text[], :args::text[], :metas::text[], :tags::text[],
            :priorities::smallint[], :max_attempts::smallint[], :scheduled_ats::timestamptz[],
            :unique_keys::bytea[], :unique_states::integer[], :unique_periods::float8[],
            :limit_keys::text[], :limit_tos::smallint[], :limit_skips::boolean[])
     WITH ORDINALITY AS t(worker, queue, args, meta, tags, priority, max_attempts, scheduled_at,
                          unique_key, unique_states, unique_period, limit_key, limit_to, limit_skip, ord)
CROSS JOIN LATERAL (
    SELECT (CASE WHEN t.scheduled_at > now() THEN 'scheduled' ELSE 'available' END)::__prefix__.oban_job_state
) AS s(st)

-- fragment: insert_rows
-- The INSERT of those rows from `input` (aliased `i`): the unique and limit columns are written as
-- sent; the key's expiry counts from scheduled_at. The caller adds filters, ORDER BY and ON CONFLICT.
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
