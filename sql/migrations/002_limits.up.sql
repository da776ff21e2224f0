-- 002: concurrency controls: keyed limits, global limits, rate limits.
--
-- The executing row is the slot: every limit is checked by counting rows (or recent starts) inside
-- the transaction that claims jobs, under an advisory lock, so racing fetchers on many nodes cannot
-- overshoot, and a dead node's slots free only when its jobs are rescued (never twice).

-- A keyed limit lives on the job: at most limit_to jobs with the same limit_key run at once, across
-- queues and nodes. limit_skip: a job whose key is full when its turn comes is skipped (cancelled,
-- meta.skipped) instead of waiting.
ALTER TABLE __prefix__.oban_jobs
    ADD COLUMN limit_key text,
    ADD COLUMN limit_to smallint,
    ADD COLUMN limit_skip boolean NOT NULL DEFAULT false;

-- Running jobs per key are counted through oban_jobs_executing_idx (001): executing rows are few by
-- nature, and every partial index costs each insert a little, matching or not.

-- Waiting keyed jobs per key, for the fetch's per-key fallback and for visibility.
CREATE INDEX oban_jobs_limit_waiting_idx ON __prefix__.oban_jobs (queue, limit_key, priority, scheduled_at, id)
    WHERE state = 'available' AND limit_key IS NOT NULL;

-- Sliding windows for rate limits: the last `allowed` start times per scope (a queue, or a queue and
-- a partition value). One small row per scope, rewritten in place (HOT) at each claim.
CREATE TABLE __prefix__.oban_rate_windows (
    scope   text PRIMARY KEY,
    starts  timestamptz[] NOT NULL DEFAULT '{}'
) WITH (fillfactor = 50);

-- Runtime override of a queue's global limit (scale_queue(global_limit=...)), like local_limit.
ALTER TABLE __prefix__.oban_queues ADD COLUMN global_limit integer;

-- One candidate job while a fetch decides what to claim.
CREATE TYPE __prefix__.oban_candidate AS (
    cid bigint, ckey text, cto smallint, cskip boolean, cpart text, cpriority smallint, cscheduled timestamptz
);

-- A job as a fetch candidate; p_by/p_path pick its rate-limit partition ('worker', 'args.<path>' or
-- 'meta.<path>' with the path split into p_path).
CREATE FUNCTION __prefix__.oban_candidate_of(j __prefix__.oban_jobs, p_by text, p_path text[])
RETURNS __prefix__.oban_candidate LANGUAGE sql IMMUTABLE AS $$
    SELECT ROW(j.id, j.limit_key, j.limit_to, j.limit_skip,
               CASE WHEN p_by = 'worker' THEN j.worker
                    WHEN p_by LIKE 'args.%' THEN j.args #>> p_path
                    WHEN p_by LIKE 'meta.%' THEN j.meta #>> p_path END,
               j.priority, j.scheduled_at)::__prefix__.oban_candidate
$$;

-- Claim up to p_demand jobs for a producer serving p_queues (in order of preference), enforcing
-- keyed, global and rate limits, and complete the jobs in p_ack_ids first (one round trip per cycle).
-- Candidate rows are locked FOR UPDATE SKIP LOCKED, so fetchers on many nodes skip each other's rows
-- instead of waiting. Every producer claims through here: its statements' plans are cached by
-- plpgsql, which makes it cheaper per call than an equivalent standalone statement. Returns rows of kind 'job' (claimed), 'skipped' (cancelled because their key
-- was full and they skip) and 'parked' (acked rows that re-entered their unique group).
--
-- Each statement in a VOLATILE plpgsql function takes a new snapshot, so the counts that follow a lock
-- see everything committed by whoever held the lock before: that is what makes the limits exact.
CREATE FUNCTION __prefix__.oban_fetch(
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
    v_cap integer;
    v_count integer;
    v_now timestamptz;
    v_cands __prefix__.oban_candidate[];
    v_keys text[];
    v_counts jsonb;
    v_parts jsonb;
    v_started jsonb;
    v_part text;
    v_taken bigint[];
    v_skipped bigint[];
    v_claimed integer;
    v_by text;
    v_path text[];
    v_locked text[];
    v_full boolean;
    c __prefix__.oban_candidate;
BEGIN
    IF COALESCE(array_length(p_ack_ids, 1), 0) > 0 THEN
        RETURN QUERY
        WITH acked AS (
            UPDATE __prefix__.oban_jobs AS j SET
                state = 'completed',
                completed_at = now(),
                unique_states = __prefix__.oban_unique_next(j.unique_states, 'executing', 'completed')
            FROM unnest(p_ack_ids, p_ack_claims) AS a(aid, claim)
            WHERE j.id = a.aid AND j.state = 'executing' AND j.attempted_at = a.claim
            RETURNING j.id AS aid, (j.unique_states & 128 <> 0) AS was_parked
        )
        SELECT 'parked', a.aid, NULL, NULL, NULL, NULL, NULL, NULL::text[], NULL, NULL::smallint,
               NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
               NULL, true
        FROM acked AS a WHERE a.was_parked;
    END IF;

    FOR i IN 1 .. COALESCE(array_length(p_queues, 1), 0) LOOP
        EXIT WHEN v_left <= 0;
        v_queue := p_queues[i];
        IF p_global[i] IS NOT NULL OR p_rate_allowed[i] IS NOT NULL THEN
            -- A global or rate limit counts the whole queue: serialise its fetchers (on every node)
            -- until commit. Without one, fetchers only skip each other's rows (SKIP LOCKED below).
            PERFORM pg_advisory_xact_lock(hashtextextended('__prefix__' || chr(31) || 'q' || chr(31) || v_queue, 0));
        END IF;
        v_now := clock_timestamp();  -- after the lock, so claim times increase across fetchers
        v_cap := v_left;

        IF p_global[i] IS NOT NULL THEN
            SELECT count(*) INTO v_count FROM __prefix__.oban_jobs AS j
            WHERE j.state = 'executing' AND j.queue = v_queue;
            v_cap := least(v_cap, p_global[i] - v_count);
        END IF;

        v_by := p_rate_by[i];
        IF p_rate_allowed[i] IS NOT NULL AND v_by IS NULL THEN
            SELECT count(*) INTO v_count
            FROM __prefix__.oban_rate_windows AS w, unnest(w.starts) AS s(t)
            WHERE w.scope = v_queue AND s.t > v_now - make_interval(secs => p_rate_period[i]);
            v_cap := least(v_cap, p_rate_allowed[i] - v_count);
        END IF;
        CONTINUE WHEN v_cap <= 0;
        v_path := CASE WHEN v_by LIKE 'args.%' OR v_by LIKE 'meta.%' THEN string_to_array(substr(v_by, 6), '.') END;

        -- Round 1 looks at the first p_scan jobs of the queue in priority order. Only when that window
        -- was full and still left room (its keys were busy) does round 2 add the best waiting jobs of
        -- every other key, so a long run of blocked jobs at the head cannot starve keys with room.
        v_taken := '{}';
        v_skipped := '{}';
        v_started := '{}';
        v_counts := '{}';
        v_parts := '{}';
        v_locked := '{}';
        FOR v_round IN 1 .. 2 LOOP
            IF v_round = 1 THEN
                SELECT COALESCE(array_agg(__prefix__.oban_candidate_of(j::__prefix__.oban_jobs, v_by, v_path)), '{}')
                INTO v_cands
                FROM (SELECT * FROM __prefix__.oban_jobs AS j
                      WHERE j.state = 'available' AND j.queue = v_queue
                      ORDER BY j.priority, j.scheduled_at, j.id
                      LIMIT p_scan
                      FOR UPDATE SKIP LOCKED) AS j;
                v_full := COALESCE(array_length(v_cands, 1), 0) >= p_scan;
            ELSE
                EXIT WHEN NOT v_full OR COALESCE(array_length(v_taken, 1), 0) >= v_cap;
                SELECT COALESCE(array_agg(__prefix__.oban_candidate_of(w::__prefix__.oban_jobs, v_by, v_path)), '{}')
                INTO v_cands
                FROM (
                    WITH RECURSIVE keys(k) AS (
                        (SELECT j.limit_key FROM __prefix__.oban_jobs AS j
                         WHERE j.state = 'available' AND j.queue = v_queue AND j.limit_key IS NOT NULL
                         ORDER BY j.limit_key LIMIT 1)
                        UNION ALL
                        SELECT (SELECT j.limit_key FROM __prefix__.oban_jobs AS j
                                WHERE j.state = 'available' AND j.queue = v_queue AND j.limit_key IS NOT NULL
                                  AND j.limit_key > keys.k
                                ORDER BY j.limit_key LIMIT 1)
                        FROM keys WHERE keys.k IS NOT NULL
                    )
                    SELECT k FROM keys WHERE k IS NOT NULL AND k <> ALL(v_locked) LIMIT 1000
                ) AS more_keys
                CROSS JOIN LATERAL (
                    SELECT j.* FROM __prefix__.oban_jobs AS j
                    WHERE j.state = 'available' AND j.queue = v_queue AND j.limit_key = more_keys.k
                    ORDER BY j.priority, j.scheduled_at, j.id
                    LIMIT v_cap
                    FOR UPDATE SKIP LOCKED
                ) AS w;
            END IF;

            -- Lock the keys not locked yet (sorted: no deadlocks), then count their running jobs in a new
            -- snapshot, so the counts include everything claimed by whoever held a lock before us.
            SELECT array_agg(DISTINCT (x).ckey ORDER BY (x).ckey) INTO v_keys
            FROM unnest(v_cands) AS x WHERE (x).ckey IS NOT NULL AND (x).ckey <> ALL(v_locked);
            IF v_keys IS NOT NULL THEN
                PERFORM pg_advisory_xact_lock(hashtextextended('__prefix__' || chr(31) || 'k' || chr(31) || k, 0))
                FROM unnest(v_keys) AS k ORDER BY k;
                v_locked := v_locked || v_keys;
                SELECT v_counts || COALESCE(jsonb_object_agg(r.limit_key, r.n), '{}') INTO v_counts
                FROM (SELECT j.limit_key, count(*) AS n FROM __prefix__.oban_jobs AS j
                      WHERE j.state = 'executing' AND j.limit_key = ANY(v_keys)
                      GROUP BY j.limit_key) AS r;  -- via oban_jobs_executing_idx
            END IF;

            IF p_rate_allowed[i] IS NOT NULL AND v_by IS NOT NULL THEN
                SELECT v_parts || COALESCE(jsonb_object_agg(p.part, p.n), '{}') INTO v_parts
                FROM (SELECT substr(w.scope, length(v_queue) + 2) AS part, count(*) AS n
                      FROM __prefix__.oban_rate_windows AS w, unnest(w.starts) AS s(t)
                      WHERE w.scope IN (SELECT v_queue || chr(31) || COALESCE((x).cpart, '')
                                        FROM unnest(v_cands) AS x WHERE NOT v_parts ? COALESCE((x).cpart, ''))
                        AND s.t > v_now - make_interval(secs => p_rate_period[i])
                      GROUP BY w.scope) AS p;
            END IF;

            -- Decide, in priority order: a keyed job runs if its key has room (counting what this fetch
            -- already took), waits if not, or is skipped if it skips; rate partitions likewise.
            FOR c IN SELECT * FROM unnest(v_cands) AS x ORDER BY x.cpriority, x.cscheduled, x.cid LOOP
                EXIT WHEN COALESCE(array_length(v_taken, 1), 0) >= v_cap;
                IF c.ckey IS NOT NULL THEN
                    v_count := COALESCE((v_counts ->> c.ckey)::integer, 0);
                    IF v_count >= c.cto THEN
                        IF c.cskip THEN
                            v_skipped := v_skipped || c.cid;
                        END IF;
                        CONTINUE;
                    END IF;
                END IF;
                IF p_rate_allowed[i] IS NOT NULL THEN
                    v_part := CASE WHEN v_by IS NULL THEN v_queue
                                   ELSE v_queue || chr(31) || COALESCE(c.cpart, '') END;
                    IF v_by IS NOT NULL THEN
                        CONTINUE WHEN COALESCE((v_parts ->> COALESCE(c.cpart, ''))::integer, 0) >= p_rate_allowed[i];
                        v_parts := jsonb_set(v_parts, ARRAY[COALESCE(c.cpart, '')],
                                             to_jsonb(COALESCE((v_parts ->> COALESCE(c.cpart, ''))::integer, 0) + 1));
                    END IF;
                    v_started := jsonb_set(v_started, ARRAY[v_part],
                                           to_jsonb(COALESCE((v_started ->> v_part)::integer, 0) + 1));
                END IF;
                IF c.ckey IS NOT NULL THEN
                    v_counts := jsonb_set(v_counts, ARRAY[c.ckey], to_jsonb(v_count + 1));
                END IF;
                v_taken := v_taken || c.cid;
            END LOOP;
        END LOOP;

        RETURN QUERY
        WITH claimed AS (
            UPDATE __prefix__.oban_jobs AS j SET
                state = 'executing',
                attempt = j.attempt + 1,
                attempted_at = v_now,
                attempted_by = p_node,
                claimed_by = p_instance,
                unique_states = __prefix__.oban_unique_next(j.unique_states, 'available', 'executing')
            -- No state check: every candidate was locked FOR UPDATE above, so it is still available.
            -- (With one, the planner may pick the fetch index, whose leading columns are not id.)
            WHERE j.id = ANY(v_taken)
            RETURNING j.*
        )
        SELECT 'job', cl.id, 'executing', cl.queue, cl.worker, cl.args::text, cl.meta::text, cl.tags,
               cl.errors::text, cl.attempt, cl.max_attempts, cl.priority, cl.inserted_at, cl.scheduled_at,
               cl.attempted_at, cl.attempted_by, (cl.unique_states & 128 <> 0)
        FROM claimed AS cl;
        GET DIAGNOSTICS v_claimed = ROW_COUNT;

        IF array_length(v_skipped, 1) > 0 THEN
            RETURN QUERY
            WITH skipped AS (
                UPDATE __prefix__.oban_jobs AS j SET
                    state = 'cancelled',
                    cancelled_at = now(),
                    meta = j.meta || jsonb_build_object('skipped', jsonb_build_object(
                        'reason', 'limit', 'key', j.limit_key, 'at', v_now)),
                    unique_states = __prefix__.oban_unique_next(j.unique_states, 'available', 'cancelled')
                WHERE j.id = ANY(v_skipped)  -- locked FOR UPDATE above, like the claims
                RETURNING j.*
            )
            SELECT 'skipped', s.id, 'cancelled', s.queue, s.worker, s.args::text, s.meta::text, s.tags,
                   s.errors::text, s.attempt, s.max_attempts, s.priority, s.inserted_at, s.scheduled_at,
                   s.attempted_at, s.attempted_by, (s.unique_states & 128 <> 0)
            FROM skipped AS s;
        END IF;

        -- Record the starts in each window, keeping only the newest `allowed` of each.
        IF p_rate_allowed[i] IS NOT NULL AND v_started <> '{}' THEN
            INSERT INTO __prefix__.oban_rate_windows AS w (scope, starts)
            SELECT e.key, array_fill(v_now, ARRAY[e.value::integer])
            FROM jsonb_each_text(v_started) AS e
            ON CONFLICT (scope) DO UPDATE SET starts = ARRAY(
                SELECT t FROM unnest(w.starts || EXCLUDED.starts) AS u(t)
                WHERE t > v_now - make_interval(secs => p_rate_period[i])
                ORDER BY t DESC LIMIT p_rate_allowed[i]);
        END IF;

        v_left := v_left - v_claimed;
    END LOOP;
END
$$;
