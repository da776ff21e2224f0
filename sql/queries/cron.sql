-- oban_cron: where each recurring task got to, and whether it is paused (cluster-wide).
--
-- The rows are bookkeeping: a tick is enqueued once because its job's unique key says so, whatever
-- these rows say (see oban_py/cron/scheduler.py).

-- name: cron_advance :exec
-- Record the ticks a pass enqueued. GREATEST: two schedulers racing (or a late pass) never move a task
-- back, so a tick already behind last_at is never due again; last_job_id follows the latest tick
-- (a NULL job_id: the tick's key was held by some other job, keep the last job).
UPDATE __prefix__.oban_cron AS c SET
    last_job_id = CASE
        WHEN c.last_at IS NULL OR v.at >= c.last_at THEN coalesce(v.job_id, c.last_job_id)
        ELSE c.last_job_id
    END,
    last_at = GREATEST(c.last_at, v.at),
    updated_at = now()
FROM (
    SELECT name, max(at) AS at, (array_agg(job_id ORDER BY at DESC))[1] AS job_id
    FROM unnest(:names::text[], :ats::timestamptz[], :job_ids::bigint[]) AS t(name, at, job_id)
    GROUP BY name
) AS v
WHERE c.name = v.name

-- name: cron_pause :exec
-- Pause or resume a task for every node. A resume restarts the task from the database's now() (not
-- the caller's clock: a CLI host whose clock runs ahead would skip ticks), so the ticks it missed while
-- paused are not enqueued on resume.
INSERT INTO __prefix__.oban_cron AS c (name, paused, last_at)
VALUES (:name, :paused, now())
ON CONFLICT (name) DO UPDATE SET
    paused = EXCLUDED.paused,
    last_at = CASE WHEN EXCLUDED.paused THEN c.last_at ELSE GREATEST(c.last_at, EXCLUDED.last_at) END,
    updated_at = now()

-- name: cron_ran :exec
-- A job run by hand (run_cron) becomes the task's last job; its schedule position does not move (a
-- task never scheduled yet starts from the database's now()).
INSERT INTO __prefix__.oban_cron AS c (name, last_at, last_job_id)
VALUES (:name, now(), :job_id)
ON CONFLICT (name) DO UPDATE SET last_job_id = EXCLUDED.last_job_id, updated_at = now()

-- name: cron_seen :exec
-- First sight of tasks: they start from :now. DO NOTHING: another node may have seen them first.
INSERT INTO __prefix__.oban_cron (name, last_at)
SELECT name, :now::timestamptz FROM unnest(:names::text[]) AS t(name)
ON CONFLICT (name) DO NOTHING

-- name: cron_states :many
-- The state of these tasks (a primary-key probe each).
SELECT name, paused, last_at, last_job_id, updated_at
FROM __prefix__.oban_cron
WHERE name = ANY(:names::text[])
ORDER BY name
