-- 003 down: a retry restores the live mask only again.
ALTER TABLE __prefix__.oban_jobs DROP COLUMN IF EXISTS unique_period, DROP COLUMN IF EXISTS unique_group;
