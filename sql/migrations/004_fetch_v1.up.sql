-- 004: the fetch moves to a versioned function file, built from named parts, each testable alone.
--
-- oban_fetch_v1 has the arguments, the result and the behaviour of oban_fetch (migration 002); its
-- text lives once, in sql/functions/oban_fetch_v1.sql, which the migration loader includes here.
-- The old function stays, unchanged, so nodes of the previous release keep fetching during a rolling
-- upgrade (both functions take the same locks, so limits hold across the two); a later migration drops
-- it once no release calls it.

-- include: functions/oban_fetch_v1.sql
