-- Notifications sent on their own (most statements notify from inside their CTEs).

-- name: notify :exec
SELECT pg_notify(:channel, :payload)
