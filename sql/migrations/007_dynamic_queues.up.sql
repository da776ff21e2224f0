-- 007: queues started and stopped at run time (start_queue / stop_queue). NULL: as the node's config
-- says; true: run the queue (with local_limit) even where it is not configured; false: do not run it.
ALTER TABLE __prefix__.oban_queues ADD COLUMN started boolean;
