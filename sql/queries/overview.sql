-- Read-only summaries for check_queues and the overview: live jobs per queue, limit keys.

-- name: limit_overview :many
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

-- name: queue_overview :many
-- Jobs per queue and state for check_queues, finished ones included (history up to prune_after): one
-- pass over the table, read by operators, never by the engine's loops.
SELECT j.queue, j.state::text AS state, count(*) AS n
FROM __prefix__.oban_jobs AS j
GROUP BY j.queue, j.state
