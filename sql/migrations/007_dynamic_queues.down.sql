-- 007 down: forgets queues started or stopped at run time.
ALTER TABLE __prefix__.oban_queues DROP COLUMN IF EXISTS started;
