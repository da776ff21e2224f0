-- oban_nodes: one row per running process, refreshed by its heartbeat.

-- name: node_delete :exec
DELETE FROM __prefix__.oban_nodes WHERE instance = :instance

-- name: node_heartbeat :scalar
-- Register or refresh this process. `inserted` is true when the row had to be created again, i.e.
-- another node declared this one dead while it could not reach the database. A NULL meta keeps the
-- stored one (it is sent only when it changed: with thousands of queues it is large).
INSERT INTO __prefix__.oban_nodes AS n (instance, node, meta)
VALUES (:instance, :node, COALESCE(:meta::jsonb, '{}'))
ON CONFLICT (instance) DO UPDATE SET heartbeat_at = now(), meta = COALESCE(:meta::jsonb, n.meta)
RETURNING (n.xmax = 0) AS inserted

-- name: node_list :many
SELECT instance, node, started_at, heartbeat_at, meta::text AS meta,
       extract(epoch FROM now() - heartbeat_at)::float8 AS age
FROM __prefix__.oban_nodes
ORDER BY node, started_at
