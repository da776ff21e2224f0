-- oban_queues (runtime controls that survive restarts) and the queues that have work.

-- name: queue_control_upsert :exec
-- Persist a pause/resume/scale/start/stop for every node (node = '') or one node. A NULL leaves the
-- stored value alone, so each command changes only what it names.
INSERT INTO __prefix__.oban_queues AS q (name, node, paused, local_limit, global_limit, started, updated_at)
VALUES (:name, :node, :paused, :local_limit, :global_limit, :started, now())
ON CONFLICT (name, node) DO UPDATE SET
    paused = COALESCE(EXCLUDED.paused, q.paused),
    local_limit = COALESCE(EXCLUDED.local_limit, q.local_limit),
    global_limit = COALESCE(EXCLUDED.global_limit, q.global_limit),
    started = COALESCE(EXCLUDED.started, q.started),
    updated_at = now()

-- name: queue_controls :many
-- Controls that apply to this node: cluster-wide rows and rows for this node name. The caller applies
-- them oldest first, so the latest command wins (a cluster-wide resume after a node pause resumes it).
SELECT name, node, paused, local_limit, global_limit, started, updated_at
FROM __prefix__.oban_queues
WHERE node = '' OR node = :node
ORDER BY updated_at

-- name: queue_names_available :many
-- Distinct queues that have available jobs, for wildcard selections ("mail*"). A loose index scan
-- over the fetch index: one probe per queue, however many jobs each holds.
WITH RECURSIVE q(name) AS (
    (SELECT queue FROM __prefix__.oban_jobs WHERE state = 'available' ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM __prefix__.oban_jobs AS j
            WHERE j.state = 'available' AND j.queue > q.name ORDER BY j.queue LIMIT 1)
    FROM q WHERE q.name IS NOT NULL
)
SELECT name AS queue FROM q WHERE name IS NOT NULL
