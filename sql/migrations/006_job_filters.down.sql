DROP INDEX __prefix__.oban_jobs_failed_idx;
DROP INDEX __prefix__.oban_jobs_tags_idx;
DROP INDEX __prefix__.oban_jobs_args_idx;
DROP INDEX __prefix__.oban_jobs_worker_idx;
DROP INDEX __prefix__.oban_jobs_queue_idx;
