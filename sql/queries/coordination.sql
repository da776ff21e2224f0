-- Queries on the small coordination tables: oban_nodes (heartbeats), oban_leaders (leases) and
-- oban_queues (runtime controls that survive restarts).

-- name: leader_elect
-- Take or keep a lease. The holder extends its own lease; anyone may take an expired one. The TTL is
-- a real parameter (make_interval), never text spliced into a literal.
INSERT INTO __prefix__.oban_leaders AS l (name, instance, node, elected_at, expires_at)
VALUES (:name, :instance, :node, now(), now() + make_interval(secs => :ttl))
ON CONFLICT (name) DO UPDATE SET
    instance = EXCLUDED.instance,
    node = EXCLUDED.node,
    elected_at = CASE WHEN l.instance = EXCLUDED.instance THEN l.elected_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.instance = EXCLUDED.instance OR l.expires_at < now()
RETURNING l.instance

-- name: leader_resign
DELETE FROM __prefix__.oban_leaders WHERE name = :name AND instance = :instance

-- name: node_heartbeat
-- Register or refresh this process. `inserted` is true when the row had to be created again, i.e.
-- another node declared this one dead while it could not reach the database. A NULL meta keeps the
-- stored one (it is sent only when it changed: with thousands of queues it is large).
INSERT INTO __prefix__.oban_nodes AS n (instance, node, meta)
VALUES (:instance, :node, COALESCE(:meta::jsonb, '{}'))
ON CONFLICT (instance) DO UPDATE SET heartbeat_at = now(), meta = COALESCE(:meta::jsonb, n.meta)
RETURNING (n.xmax = 0) AS inserted

-- name: node_delete
DELETE FROM __prefix__.oban_nodes WHERE instance = :instance

-- name: node_list
SELECT instance, node, started_at, heartbeat_at, meta::text AS meta,
       extract(epoch FROM now() - heartbeat_at)::float8 AS age
FROM __prefix__.oban_nodes
ORDER BY node, started_at

-- name: queue_control_upsert
-- Persist a pause/resume/scale for every node (node = '') or one node.
INSERT INTO __prefix__.oban_queues AS q (name, node, paused, local_limit, global_limit, updated_at)
VALUES (:name, :node, :paused, :local_limit, :global_limit, now())
ON CONFLICT (name, node) DO UPDATE SET
    paused = COALESCE(EXCLUDED.paused, q.paused),
    local_limit = COALESCE(EXCLUDED.local_limit, q.local_limit),
    global_limit = COALESCE(EXCLUDED.global_limit, q.global_limit),
    updated_at = now()

-- name: queue_controls
-- Controls that apply to this node: cluster-wide rows and rows for this node name. The caller applies
-- them oldest first, so the latest command wins (a cluster-wide resume after a node pause resumes it).
SELECT name, node, paused, local_limit, global_limit, updated_at
FROM __prefix__.oban_queues
WHERE node = '' OR node = :node
ORDER BY updated_at

-- name: notify
SELECT pg_notify(:channel, :payload)

-- name: jobs_dead_tuples
-- Dead tuples in the hot table (from the statistics collector; no scan), and whether we may vacuum it.
SELECT COALESCE(pg_stat_get_dead_tuples(c.oid), 0) AS dead,
       pg_has_role(current_user, c.relowner, 'USAGE') AS owner
FROM pg_class AS c
WHERE c.oid = '__prefix__.oban_jobs'::regclass

-- name: jobs_vacuum
-- Every state change leaves a dead tuple (state is indexed, so no HOT update), and autovacuum wakes
-- only once a minute: at 200 jobs/s that is 24,000 dead tuples. A small vacuum every few seconds
-- keeps the hot table lean; with few dead items PostgreSQL skips the index pass, so it stays cheap
-- even with a long history. SKIP_LOCKED: never wait behind someone else's vacuum or DDL.
VACUUM (SKIP_LOCKED) __prefix__.oban_jobs

-- name: queue_names_available
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
