-- 005: recurring tasks. One row per task: the last tick enqueued (so a pass knows what is due), the
-- job it enqueued, and a pause that holds for every node and survives restarts. Exactly once per tick
-- is not enforced here but by the jobs' unique index (each tick's job has a unique key); a row is
-- created the first time any node schedules the task.
CREATE TABLE __prefix__.oban_cron (
    name         text PRIMARY KEY,
    paused       boolean NOT NULL DEFAULT false,
    last_at      timestamptz,
    last_job_id  bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
