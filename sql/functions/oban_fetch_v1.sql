-- oban_fetch_v1: complete a producer's acked jobs and claim its next ones, enforcing every limit.
--
-- Created by migration 004 (which includes this file). A shipped version never changes: a change of
-- behaviour is a new file (oban_fetch_v2.sql) and a new migration that creates it and drops this one,
-- so a schema's functions always match the migrations recorded in oban_migrations.
--
-- The executing row is the slot: every limit is checked by counting rows (or recent starts) inside
-- the transaction that claims, under advisory locks, so racing fetchers on many nodes cannot
-- overshoot, and a dead node's slots free only when its jobs are rescued (never twice).
--
-- Each statement of a VOLATILE plpgsql function takes a new snapshot, and a STABLE function called
-- from it reads that statement's snapshot: so a count made in a statement after the one that took a
-- lock sees everything committed by whoever held the lock before. Every part below keeps "lock, then
-- count in a later statement"; that is what makes the limits exact.
--
-- Parts, in the order a fetch uses them. Those that read or write tables are plpgsql, called once
-- per queue or per round (never per row), so their plans are cached per connection (a SQL function
-- that is not inlined is planned again at every call before PostgreSQL 18); the one-expression SQL
-- ones (lock, rate_scope, rate_path) are inlined where they are used.
--   oban_fetch_v1_ack           complete the acked batch
--   oban_fetch_v1_lock          the advisory lock of a queue or a limit key
--   oban_fetch_v1_global_room   room left under a queue's global limit
--   oban_fetch_v1_rate_scope    the oban_rate_windows row of a queue or a partition
--   oban_fetch_v1_rate_room     room left under a queue-wide rate limit
--   oban_fetch_v1_rate_path     where a rate partition's value sits in args or meta
--   oban_fetch_v1_head          round 1 candidates: the head of the queue
--   oban_fetch_v1_other_keys    round 2 candidates: the best job of every other waiting key
--   oban_fetch_v1_key_slots     lock the candidates' keys, count their running jobs
--   oban_fetch_v1_rate_parts    recent starts of the candidates' rate partitions
--   oban_fetch_v1_decide        which candidates to take, skip or leave (pure)
--   oban_fetch_v1_claim         mark the taken jobs executing
--   oban_fetch_v1_skip          cancel the jobs that skip when their key is full
--   oban_fetch_v1_record_starts write the claims into the rate windows
-- Candidates are oban_candidate rows built by oban_candidate_of (both from migration 002).

-- Completes the acked jobs (one statement for the whole batch) and returns the ids of those that
-- re-entered their unique group (parked), so the caller can try to take their key back. The guard
-- `state = 'executing' AND attempted_at = claim` makes a late ack from a node presumed dead a no-op.
CREATE FUNCTION __prefix__.oban_fetch_v1_ack(p_ids bigint[], p_claims timestamptz[])
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    WITH acked AS (
        UPDATE __prefix__.oban_jobs AS j SET
            state = 'completed',
            completed_at = now(),
            unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing', 'completed')
        FROM unnest(p_ids, p_claims) AS a(aid, claim)
        WHERE j.id = a.aid AND j.state = 'executing' AND j.attempted_at = a.claim
        RETURNING j.id AS aid, (j.unique_states & __parked__ <> 0) AS was_parked
    )
    SELECT acked.aid FROM acked WHERE acked.was_parked;
END
$$;

-- The lock that serialises fetchers counting the same thing: p_space 'q' for a queue (global and
-- rate limits), 'k' for a limit key. The schema is part of the key, so two prefixes sharing a
-- database never wait on each other; chr(31) cannot appear in a name, so no two keys collide.
-- Transaction-scoped: it is released at commit, when the claims it guarded are visible.
CREATE FUNCTION __prefix__.oban_fetch_v1_lock(p_space text, p_name text)
RETURNS void LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('__prefix__' || chr(31) || p_space || chr(31) || p_name, 0))
$$;

-- Room left under a global limit: the limit minus the queue's executing rows on every node (via
-- oban_jobs_executing_idx). Negative when a lowered limit is still overshot by running jobs.
-- Call it after taking the queue lock, in a later statement.
CREATE FUNCTION __prefix__.oban_fetch_v1_global_room(p_queue text, p_limit integer)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_limit - (SELECT count(*) FROM __prefix__.oban_jobs AS j
                      WHERE j.state = 'executing' AND j.queue = p_queue);
END
$$;

-- The oban_rate_windows row that counts a claim: the queue itself for a queue-wide rate limit, or
-- the queue and the job's partition value (NULL counts as '') when the limit is partitioned.
CREATE FUNCTION __prefix__.oban_fetch_v1_rate_scope(p_queue text, p_by text, p_part text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_by IS NULL THEN p_queue ELSE p_queue || chr(31) || COALESCE(p_part, '') END
$$;

-- Room left under a queue-wide rate limit: `allowed` minus the starts recorded in the last `period`
-- seconds. Call it after taking the queue lock, in a later statement.
CREATE FUNCTION __prefix__.oban_fetch_v1_rate_room(
    p_queue text, p_allowed integer, p_period float8, p_now timestamptz
) RETURNS integer LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_allowed - (SELECT count(*) FROM __prefix__.oban_rate_windows AS w, unnest(w.starts) AS s(t)
                        WHERE w.scope = p_queue AND s.t > p_now - make_interval(secs => p_period));
END
$$;

-- A rate limit partitioned by 'args.<path>' or 'meta.<path>' reads the value at that dotted path
-- (split once per fetch here, not once per candidate); 'worker' and no partition need no path.
CREATE FUNCTION __prefix__.oban_fetch_v1_rate_path(p_by text)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_by LIKE 'args.%' OR p_by LIKE 'meta.%' THEN string_to_array(substr(p_by, 6), '.') END
$$;

-- Round 1: the first p_scan available jobs of the queue in priority order, locked FOR UPDATE SKIP
-- LOCKED, so fetchers on many nodes skip each other's rows instead of waiting (via oban_jobs_fetch_idx).
-- Every candidate stays locked until commit, so it is still available when it is claimed or skipped.
CREATE FUNCTION __prefix__.oban_fetch_v1_head(p_queue text, p_scan integer, p_by text, p_path text[])
RETURNS __prefix__.oban_candidate[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_cands __prefix__.oban_candidate[];
BEGIN
    SELECT COALESCE(array_agg(__prefix__.oban_candidate_of(j::__prefix__.oban_jobs, p_by, p_path)), '{}')
    INTO v_cands
    FROM (SELECT * FROM __prefix__.oban_jobs AS j
          WHERE j.state = 'available' AND j.queue = p_queue
          ORDER BY j.priority, j.scheduled_at, j.id
          LIMIT p_scan
          FOR UPDATE SKIP LOCKED) AS j;
    RETURN v_cands;
END
$$;

-- Round 2, only when round 1 filled its window and still left room (the keys at the head were
-- busy): the best p_cap waiting jobs of every other key (up to 1,000 keys, found by a loose index
-- scan of oban_jobs_limit_waiting_idx), so a long run of blocked jobs at the head cannot starve keys
-- with room. Keys already locked by this fetch (p_locked) were seen in round 1 and are left out.
CREATE FUNCTION __prefix__.oban_fetch_v1_other_keys(
    p_queue text, p_cap integer, p_locked text[], p_by text, p_path text[]
) RETURNS __prefix__.oban_candidate[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_cands __prefix__.oban_candidate[];
BEGIN
    SELECT COALESCE(array_agg(__prefix__.oban_candidate_of(w::__prefix__.oban_jobs, p_by, p_path)), '{}')
    INTO v_cands
    FROM (
        WITH RECURSIVE keys(k) AS (
            (SELECT j.limit_key FROM __prefix__.oban_jobs AS j
             WHERE j.state = 'available' AND j.queue = p_queue AND j.limit_key IS NOT NULL
             ORDER BY j.limit_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.limit_key FROM __prefix__.oban_jobs AS j
                    WHERE j.state = 'available' AND j.queue = p_queue AND j.limit_key IS NOT NULL
                      AND j.limit_key > keys.k
                    ORDER BY j.limit_key LIMIT 1)
            FROM keys WHERE keys.k IS NOT NULL
        )
        SELECT k FROM keys WHERE k IS NOT NULL AND k <> ALL(p_locked) LIMIT 1000
    ) AS more_keys
    CROSS JOIN LATERAL (
        SELECT j.* FROM __prefix__.oban_jobs AS j
        WHERE j.state = 'available' AND j.queue = p_queue AND j.limit_key = more_keys.k
        ORDER BY j.priority, j.scheduled_at, j.id
        LIMIT p_cap
        FOR UPDATE SKIP LOCKED
    ) AS w;
    RETURN v_cands;
END
$$;

-- Keyed slots: lock the candidates' keys that this fetch has not locked yet (sorted, so two fetchers
-- never deadlock), then count their executing rows on every node in a later statement, so the counts
-- include everything claimed by whoever held a key's lock before. Adds the keys to `locked` and their
-- counts to `running` (key -> executing rows; a key with none is absent).
CREATE FUNCTION __prefix__.oban_fetch_v1_key_slots(
    p_cands __prefix__.oban_candidate[], INOUT locked text[], INOUT running jsonb
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_keys text[];
BEGIN
    SELECT array_agg(DISTINCT (x).ckey ORDER BY (x).ckey) INTO v_keys
    FROM unnest(p_cands) AS x WHERE (x).ckey IS NOT NULL AND (x).ckey <> ALL(locked);
    IF v_keys IS NOT NULL THEN
        PERFORM __prefix__.oban_fetch_v1_lock('k', k) FROM unnest(v_keys) AS k ORDER BY k;
        locked := locked || v_keys;
        SELECT running || COALESCE(jsonb_object_agg(r.limit_key, r.n), '{}') INTO running
        FROM (SELECT j.limit_key, count(*) AS n FROM __prefix__.oban_jobs AS j
              WHERE j.state = 'executing' AND j.limit_key = ANY(v_keys)
              GROUP BY j.limit_key) AS r;  -- via oban_jobs_executing_idx
    END IF;
END
$$;

-- Recent starts per rate partition (partition value -> starts in the last p_period seconds) for the
-- candidates' partitions not counted yet, added to p_counted. The queue lock covers every partition
-- of the queue, so these counts, like the keyed ones, are read after the lock.
CREATE FUNCTION __prefix__.oban_fetch_v1_rate_parts(
    p_queue text, p_by text, p_cands __prefix__.oban_candidate[], p_counted jsonb, p_period float8,
    p_now timestamptz
) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_parts jsonb;
BEGIN
    SELECT p_counted || COALESCE(jsonb_object_agg(p.part, p.n), '{}') INTO v_parts
    FROM (SELECT substr(w.scope, length(p_queue) + 2) AS part, count(*) AS n
          FROM __prefix__.oban_rate_windows AS w, unnest(w.starts) AS s(t)
          WHERE w.scope IN (SELECT __prefix__.oban_fetch_v1_rate_scope(p_queue, p_by, (x).cpart)
                            FROM unnest(p_cands) AS x WHERE NOT p_counted ? COALESCE((x).cpart, ''))
            AND s.t > p_now - make_interval(secs => p_period)
          GROUP BY w.scope) AS p;
    RETURN v_parts;
END
$$;

-- Decides, in priority order, what to do with each candidate, up to p_cap taken in all: a keyed job
-- runs if its key has room (counting what this fetch already took), waits if not, or is skipped if it
-- skips; a rate-limited job runs while its partition has room. Pure: it reads no table, so it can
-- be tested with made-up candidates. Returns the running tallies updated (taken and skipped ids,
-- running per key, starts per partition, and the starts to record per rate scope).
CREATE FUNCTION __prefix__.oban_fetch_v1_decide(
    p_cands __prefix__.oban_candidate[], p_cap integer, p_queue text, p_rate_by text, p_rate_allowed integer,
    INOUT taken bigint[], INOUT skipped bigint[], INOUT running jsonb, INOUT parts jsonb, INOUT started jsonb
) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    c __prefix__.oban_candidate;
    v_count integer;
    v_part text;
BEGIN
    FOR c IN SELECT * FROM unnest(p_cands) AS x ORDER BY x.cpriority, x.cscheduled, x.cid LOOP
        EXIT WHEN COALESCE(array_length(taken, 1), 0) >= p_cap;
        IF c.ckey IS NOT NULL THEN
            v_count := COALESCE((running ->> c.ckey)::integer, 0);
            IF v_count >= c.cto THEN
                IF c.cskip THEN
                    skipped := skipped || c.cid;
                END IF;
                CONTINUE;
            END IF;
        END IF;
        IF p_rate_allowed IS NOT NULL THEN
            v_part := __prefix__.oban_fetch_v1_rate_scope(p_queue, p_rate_by, c.cpart);
            IF p_rate_by IS NOT NULL THEN
                CONTINUE WHEN COALESCE((parts ->> COALESCE(c.cpart, ''))::integer, 0) >= p_rate_allowed;
                parts := jsonb_set(parts, ARRAY[COALESCE(c.cpart, '')],
                                   to_jsonb(COALESCE((parts ->> COALESCE(c.cpart, ''))::integer, 0) + 1));
            END IF;
            started := jsonb_set(started, ARRAY[v_part], to_jsonb(COALESCE((started ->> v_part)::integer, 0) + 1));
        END IF;
        IF c.ckey IS NOT NULL THEN
            running := jsonb_set(running, ARRAY[c.ckey], to_jsonb(v_count + 1));
        END IF;
        taken := taken || c.cid;
    END LOOP;
END
$$;

-- Claims the taken jobs for one producer: executing, one more attempt, stamped with the claim time
-- (the ack guard) and the claiming node and instance (what the lifeline rescues when they die).
CREATE FUNCTION __prefix__.oban_fetch_v1_claim(p_ids bigint[], p_now timestamptz, p_node text, p_instance uuid)
RETURNS SETOF __prefix__.oban_jobs LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    UPDATE __prefix__.oban_jobs AS j SET
        state = 'executing',
        attempt = j.attempt + 1,
        attempted_at = p_now,
        attempted_by = p_node,
        claimed_by = p_instance,
        unique_states = __prefix__.oban_unique_next(j.unique_states, 'available', 'executing')
    -- No state check: every candidate was locked FOR UPDATE by this fetch, so it is still available.
    -- (With one, the planner may pick the fetch index, whose leading columns are not id.)
    WHERE j.id = ANY(p_ids)
    RETURNING j.*;
END
$$;

-- Cancels the jobs whose key was full when their turn came and that skip rather than wait, saying
-- why in meta.skipped (locked FOR UPDATE by this fetch, like the claims).
CREATE FUNCTION __prefix__.oban_fetch_v1_skip(p_ids bigint[], p_now timestamptz)
RETURNS SETOF __prefix__.oban_jobs LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    UPDATE __prefix__.oban_jobs AS j SET
        state = 'cancelled',
        cancelled_at = now(),
        meta = j.meta || jsonb_build_object('skipped', jsonb_build_object(
            'reason', 'limit', 'key', j.limit_key, 'at', p_now)),
        unique_states = __prefix__.oban_unique_next(j.unique_states, 'available', 'cancelled')
    WHERE j.id = ANY(p_ids)
    RETURNING j.*;
END
$$;

-- Records the claims in each rate window (p_started: scope -> starts), keeping only the newest
-- p_allowed starts of the last p_period seconds: one small row per scope, rewritten in place (HOT).
CREATE FUNCTION __prefix__.oban_fetch_v1_record_starts(
    p_started jsonb, p_now timestamptz, p_period float8, p_allowed integer
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO __prefix__.oban_rate_windows AS w (scope, starts)
    SELECT e.key, array_fill(p_now, ARRAY[e.value::integer])
    FROM jsonb_each_text(p_started) AS e
    ON CONFLICT (scope) DO UPDATE SET starts = ARRAY(
        SELECT t FROM unnest(w.starts || EXCLUDED.starts) AS u(t)
        WHERE t > p_now - make_interval(secs => p_period)
        ORDER BY t DESC LIMIT p_allowed);
END
$$;

-- Claims up to p_demand jobs for a producer serving p_queues (in order of preference), enforcing
-- keyed, global and rate limits, and completes the jobs in p_ack_ids first (one round trip per
-- cycle). Every producer claims through here: plpgsql caches the plans of its statements (and of its
-- parts'), which makes it cheaper per call than an equivalent standalone statement. Returns rows of
-- kind 'job' (claimed), 'skipped' (cancelled because their key was full and they skip) and 'parked'
-- (acked rows that re-entered their unique group).
CREATE FUNCTION __prefix__.oban_fetch_v1(
    p_queues text[], p_global integer[], p_rate_allowed integer[], p_rate_period float8[], p_rate_by text[],
    p_demand integer, p_node text, p_instance uuid, p_scan integer,
    p_ack_ids bigint[], p_ack_claims timestamptz[]
) RETURNS TABLE (
    kind text, id bigint, state text, queue text, worker text, args text, meta text, tags text[],
    errors text, attempt smallint, max_attempts smallint, priority smallint, inserted_at timestamptz,
    scheduled_at timestamptz, attempted_at timestamptz, attempted_by text, parked boolean
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_left integer := p_demand;
    v_queue text;
    v_by text;
    v_path text[];
    v_cap integer;
    v_now timestamptz;
    v_cands __prefix__.oban_candidate[];
    v_full boolean;
    v_locked text[];
    v_running jsonb;
    v_parts jsonb;
    v_started jsonb;
    v_taken bigint[];
    v_skipped bigint[];
    v_claimed integer;
BEGIN
    IF COALESCE(array_length(p_ack_ids, 1), 0) > 0 THEN
        RETURN QUERY
        SELECT 'parked', a.aid, NULL, NULL, NULL, NULL, NULL, NULL::text[], NULL, NULL::smallint,
               NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
               NULL, true
        FROM __prefix__.oban_fetch_v1_ack(p_ack_ids, p_ack_claims) AS a(aid);
    END IF;

    FOR i IN 1 .. COALESCE(array_length(p_queues, 1), 0) LOOP
        EXIT WHEN v_left <= 0;
        v_queue := p_queues[i];
        v_by := p_rate_by[i];
        IF p_global[i] IS NOT NULL OR p_rate_allowed[i] IS NOT NULL THEN
            -- A global or rate limit counts the whole queue: serialise its fetchers (on every node)
            -- until commit. Without one, fetchers only skip each other's rows (SKIP LOCKED).
            PERFORM __prefix__.oban_fetch_v1_lock('q', v_queue);
        END IF;
        v_now := clock_timestamp();  -- after the lock, so claim times increase across fetchers
        v_cap := v_left;
        IF p_global[i] IS NOT NULL THEN
            v_cap := least(v_cap, __prefix__.oban_fetch_v1_global_room(v_queue, p_global[i]));
        END IF;
        IF p_rate_allowed[i] IS NOT NULL AND v_by IS NULL THEN
            v_cap := least(v_cap, __prefix__.oban_fetch_v1_rate_room(v_queue, p_rate_allowed[i],
                                                                      p_rate_period[i], v_now));
        END IF;
        CONTINUE WHEN v_cap <= 0;
        v_path := __prefix__.oban_fetch_v1_rate_path(v_by);

        v_taken := '{}';
        v_skipped := '{}';
        v_started := '{}';
        v_running := '{}';
        v_parts := '{}';
        v_locked := '{}';
        FOR v_round IN 1 .. 2 LOOP
            IF v_round = 1 THEN
                v_cands := __prefix__.oban_fetch_v1_head(v_queue, p_scan, v_by, v_path);
                v_full := COALESCE(array_length(v_cands, 1), 0) >= p_scan;
            ELSE
                EXIT WHEN NOT v_full OR COALESCE(array_length(v_taken, 1), 0) >= v_cap;
                v_cands := __prefix__.oban_fetch_v1_other_keys(v_queue, v_cap, v_locked, v_by, v_path);
            END IF;
            SELECT s.locked, s.running INTO v_locked, v_running
            FROM __prefix__.oban_fetch_v1_key_slots(v_cands, v_locked, v_running) AS s;
            IF p_rate_allowed[i] IS NOT NULL AND v_by IS NOT NULL THEN
                v_parts := __prefix__.oban_fetch_v1_rate_parts(v_queue, v_by, v_cands, v_parts, p_rate_period[i],
                                                            v_now);
            END IF;
            SELECT d.taken, d.skipped, d.running, d.parts, d.started
            INTO v_taken, v_skipped, v_running, v_parts, v_started
            FROM __prefix__.oban_fetch_v1_decide(v_cands, v_cap, v_queue, v_by, p_rate_allowed[i],
                                                 v_taken, v_skipped, v_running, v_parts, v_started) AS d;
        END LOOP;

        RETURN QUERY
        SELECT 'job', cl.id, 'executing', cl.queue, cl.worker, cl.args::text, cl.meta::text, cl.tags,
               cl.errors::text, cl.attempt, cl.max_attempts, cl.priority, cl.inserted_at, cl.scheduled_at,
               cl.attempted_at, cl.attempted_by, (cl.unique_states & __parked__ <> 0)
        FROM __prefix__.oban_fetch_v1_claim(v_taken, v_now, p_node, p_instance) AS cl;
        GET DIAGNOSTICS v_claimed = ROW_COUNT;

        IF array_length(v_skipped, 1) > 0 THEN
            RETURN QUERY
            SELECT 'skipped', s.id, 'cancelled', s.queue, s.worker, s.args::text, s.meta::text, s.tags,
                   s.errors::text, s.attempt, s.max_attempts, s.priority, s.inserted_at, s.scheduled_at,
                   s.attempted_at, s.attempted_by, (s.unique_states & __parked__ <> 0)
            FROM __prefix__.oban_fetch_v1_skip(v_skipped, v_now) AS s;
        END IF;

        IF p_rate_allowed[i] IS NOT NULL AND v_started <> '{}' THEN
            PERFORM __prefix__.oban_fetch_v1_record_starts(v_started, v_now, p_rate_period[i], p_rate_allowed[i]);
        END IF;

        v_left := v_left - v_claimed;
    END LOOP;
END
$$;
