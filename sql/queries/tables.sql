-- Health of the hot table: dead tuples and the small, frequent vacuum.

-- name: jobs_dead_tuples :one
-- Dead tuples in the hot table (from the statistics collector; no scan), and whether we may vacuum it.
SELECT COALESCE(pg_stat_get_dead_tuples(c.oid), 0) AS dead,
       pg_has_role(current_user, c.relowner, 'USAGE') AS owner
FROM pg_class AS c
WHERE c.oid = '__prefix__.oban_jobs'::regclass

-- name: jobs_vacuum :exec
-- Every state change leaves a dead tuple (state is indexed, so no HOT update), and autovacuum wakes
-- only once a minute: at 200 jobs/s that is 24,000 dead tuples. A small vacuum every few seconds
-- keeps the hot table lean; with few dead items PostgreSQL skips the index pass, so it stays cheap
-- even with a long history. SKIP_LOCKED: never wait behind someone else's vacuum or DDL.
VACUUM (SKIP_LOCKED) __prefix__.oban_jobs
