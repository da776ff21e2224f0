-- 005 down: recurring task state goes (tick jobs already inserted stay in oban_jobs).
DROP TABLE IF EXISTS __prefix__.oban_cron;
