-- 004 down: without oban_fetch_v1 and its parts (oban_fetch, from migration 002, was kept by 004).

DROP FUNCTION __prefix__.oban_fetch_v1(text[], integer[], integer[], float8[], text[], integer, text, uuid,
    integer, bigint[], timestamptz[]);
DROP FUNCTION __prefix__.oban_fetch_v1_record_starts(jsonb, timestamptz, float8, integer);
DROP FUNCTION __prefix__.oban_fetch_v1_skip(bigint[], timestamptz);
DROP FUNCTION __prefix__.oban_fetch_v1_claim(bigint[], timestamptz, text, uuid);
DROP FUNCTION __prefix__.oban_fetch_v1_decide(__prefix__.oban_candidate[], integer, text, text, integer, bigint[],
    bigint[], jsonb, jsonb, jsonb);
DROP FUNCTION __prefix__.oban_fetch_v1_rate_parts(text, text, __prefix__.oban_candidate[], jsonb, float8, timestamptz);
DROP FUNCTION __prefix__.oban_fetch_v1_key_slots(__prefix__.oban_candidate[], text[], jsonb);
DROP FUNCTION __prefix__.oban_fetch_v1_other_keys(text, integer, text[], text, text[]);
DROP FUNCTION __prefix__.oban_fetch_v1_head(text, integer, text, text[]);
DROP FUNCTION __prefix__.oban_fetch_v1_rate_path(text);
DROP FUNCTION __prefix__.oban_fetch_v1_rate_room(text, integer, float8, timestamptz);
DROP FUNCTION __prefix__.oban_fetch_v1_rate_scope(text, text, text);
DROP FUNCTION __prefix__.oban_fetch_v1_global_room(text, integer);
DROP FUNCTION __prefix__.oban_fetch_v1_lock(text, text);
DROP FUNCTION __prefix__.oban_fetch_v1_ack(bigint[], timestamptz[]);
