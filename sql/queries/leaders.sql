-- oban_leaders: leases for leader-only duties (pruning, vacuum, unique sweep).

-- name: leader_elect :scalar
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

-- name: leader_resign :exec
DELETE FROM __prefix__.oban_leaders WHERE name = :name AND instance = :instance
