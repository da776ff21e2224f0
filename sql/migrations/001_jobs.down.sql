-- 001 down: removes everything 001 created.
DROP TABLE IF EXISTS __prefix__.oban_queues;
DROP TABLE IF EXISTS __prefix__.oban_leaders;
DROP TABLE IF EXISTS __prefix__.oban_nodes;
DROP TABLE IF EXISTS __prefix__.oban_jobs;
DROP FUNCTION IF EXISTS __prefix__.oban_unique_next(integer, __prefix__.oban_job_state, __prefix__.oban_job_state);
DROP FUNCTION IF EXISTS __prefix__.oban_unique_holds(integer, __prefix__.oban_job_state);
DROP FUNCTION IF EXISTS __prefix__.oban_state_bit(__prefix__.oban_job_state);
DROP TYPE IF EXISTS __prefix__.oban_job_state;
