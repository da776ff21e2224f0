-- 002 down: removes the concurrency controls.
DROP FUNCTION IF EXISTS __prefix__.oban_fetch(text[], integer[], integer[], float8[], text[], integer, text, uuid,
    integer, bigint[], timestamptz[]);
DROP FUNCTION IF EXISTS __prefix__.oban_candidate_of(__prefix__.oban_jobs, text, text[]);
DROP TYPE IF EXISTS __prefix__.oban_candidate;
ALTER TABLE __prefix__.oban_queues DROP COLUMN IF EXISTS global_limit;
DROP TABLE IF EXISTS __prefix__.oban_rate_windows;
DROP INDEX IF EXISTS __prefix__.oban_jobs_limit_waiting_idx;
ALTER TABLE __prefix__.oban_jobs DROP COLUMN IF EXISTS limit_skip, DROP COLUMN IF EXISTS limit_to,
    DROP COLUMN IF EXISTS limit_key;
