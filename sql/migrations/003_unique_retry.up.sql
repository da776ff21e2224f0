-- 003: what a manual retry needs to give a job its unique key back.
--
-- unique_states is the live mask: it goes to 0 when a row gives up its key for good (its period is
-- over, it lost its key to another holder, or it started with until="start"). A manual retry is an
-- insert of the job again, so it needs the job's own options back:
--   unique_group   the mask the row was inserted with (group bits and UNTIL_START), never changed by
--                  a transition;
--   unique_period  its period in seconds (NULL: none), so the retry starts a fresh window.
-- Rows inserted before this migration have neither (NULL): a retry restores their live mask (and
-- job_unpark_lost fills unique_group when one of them loses its key). Both columns are nullable
-- without a default: adding them rewrites nothing.
ALTER TABLE __prefix__.oban_jobs
    ADD COLUMN unique_group integer,
    ADD COLUMN unique_period float8;
