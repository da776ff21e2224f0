-- 006: indexes behind list_jobs' filters (Oban.list_jobs, `oban-py jobs list`).
--
-- The hot table pays for every index on every insert and every state change (state is indexed, so no
-- update is HOT and each new row version enters every index whose predicate it matches). So these
-- indexes leave out the two hot states: a job enters them at its first transition out of `available`
-- and `executing` (its ack, usually), never at insert or claim. list_jobs reads available and
-- executing rows through the fetch and executing indexes (few rows: the working set) and the rest
-- through these, in two branches of one query (job_list).
--
-- Per job that completes, without tags: one entry in each btree and one per leaf of args in the GIN
-- index. A scheduled insert pays that at insert instead.

-- Keyset pages of one queue / one worker, newest first: (queue, id) scanned backwards from before_id.
CREATE INDEX oban_jobs_queue_idx ON __prefix__.oban_jobs (queue, id)
    WHERE state NOT IN ('available', 'executing');
CREATE INDEX oban_jobs_worker_idx ON __prefix__.oban_jobs (worker, id)
    WHERE state NOT IN ('available', 'executing');

-- args @> '{"user_id": 7}'. jsonb_path_ops: one hashed entry per leaf (about a third of jsonb_ops'
-- size), and @> is the only operator list_jobs offers.
CREATE INDEX oban_jobs_args_idx ON __prefix__.oban_jobs USING gin (args jsonb_path_ops)
    WHERE state NOT IN ('available', 'executing');

-- tags @> '{billing}'. Most jobs have no tags; GIN would still store an entry for each empty array.
CREATE INDEX oban_jobs_tags_idx ON __prefix__.oban_jobs USING gin (tags)
    WHERE state NOT IN ('available', 'executing') AND tags <> '{}';

-- The states an operator goes looking for (failed attempts and their ends), in id order: the finished
-- index mixes them with every completed job, the staging index orders retryable ones by time.
CREATE INDEX oban_jobs_failed_idx ON __prefix__.oban_jobs (state, id)
    WHERE state IN ('retryable', 'discarded', 'cancelled');
