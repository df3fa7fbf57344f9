-- Version 1: the records table, its expiry index, the fencing-token sequence, the record count,
-- and one function per state transition. Times are Unix milliseconds (bigint), as in the domain.
-- Every function mirrors `domain::machine` rule for rule; the conformance suite (tests/contract.rs)
-- runs every contract test against this store and the sled store to keep them equal.

CREATE TABLE records (
    namespace        text     NOT NULL,
    key              text     NOT NULL,
    fingerprint      bytea    NOT NULL,
    fencing_token    bigint   NOT NULL,
    attempt          bigint   NOT NULL,
    owner            text     NOT NULL,
    retention_ms     bigint   NOT NULL,
    updated_at       bigint   NOT NULL,
    -- 1 held, 2 released, 3 completed
    state            smallint NOT NULL CHECK (state IN (1, 2, 3)),
    -- the holder's token (held), or the token that released or completed the key
    token            uuid     NOT NULL,
    lease_expires_at bigint,
    request_id       text,
    takeover         boolean  NOT NULL DEFAULT false,
    -- the stored response, encoded by the coordinator (opaque here)
    response         bytea,
    completed_at     bigint,
    -- when retention ends: never before the end of a held lease; the sweeper's index
    expires_at       bigint   NOT NULL,
    -- a Claim is waiting for this key somewhere: its Complete, Release or Renew sends a NOTIFY
    waiters          boolean  NOT NULL DEFAULT false,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX records_expires_at ON records (expires_at);

-- Fencing tokens of every key come from here: strictly increasing across all replicas.
CREATE SEQUENCE fencing_tokens AS bigint;

-- The number of records, spread over shards so that concurrent inserts rarely wait on one row.
CREATE TABLE record_count (
    shard integer PRIMARY KEY,
    n     bigint  NOT NULL
);
INSERT INTO record_count SELECT s, 0 FROM generate_series(0, 127) AS s;

CREATE TYPE outcome AS (
    code             smallint,
    now_ms           bigint,
    fencing_token    bigint,
    attempt          bigint,
    owner            text,
    token            uuid,
    lease_expires_at bigint,
    takeover         boolean,
    response         bytea,
    completed_at     bigint,
    expires_at       bigint
);
-- Outcome codes: 1 acquired/ok, 2 in progress, 3 completed, 4 already completed (Complete
-- retried), 10 fingerprint mismatch, 11 store full, 12 lease lost, 13 already completed
-- (Renew/Release refused), 14 not found.

-- An outcome that carries only its code and the time (refusals, and a Release's success).
CREATE FUNCTION bare_outcome(p_code integer, p_now bigint) RETURNS outcome LANGUAGE sql IMMUTABLE AS $$
    SELECT ROW(p_code::smallint, p_now, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::outcome
$$;

-- The database clock, in Unix milliseconds; `p_now` overrides it only for tests.
CREATE FUNCTION now_ms(p_now bigint) RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(p_now, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
$$;

-- Deletes up to p_batch records whose retention ended, skipping rows other transactions hold.
CREATE FUNCTION sweep(p_now bigint, p_batch integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    v_deleted integer;
    v_shard integer := floor(random() * 128)::integer;
BEGIN
    WITH doomed AS (
        SELECT namespace, key FROM records WHERE expires_at <= v_now
        ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED
    )
    DELETE FROM records r USING doomed d WHERE r.namespace = d.namespace AND r.key = d.key;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    IF v_deleted > 0 THEN
        UPDATE record_count SET n = n - v_deleted WHERE shard = v_shard;
    END IF;
    RETURN v_deleted;
END
$$;

CREATE FUNCTION claim(
    p_namespace text, p_key text, p_now bigint, p_fingerprint bytea, p_lease_ms bigint,
    p_retention_ms bigint, p_request_id text, p_owner text, p_token uuid,
    p_max_records bigint, p_wait boolean
) RETURNS outcome LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    v_lease_end bigint := v_now + p_lease_ms;
    v_expires bigint := greatest(v_now + p_retention_ms, v_now + p_lease_ms);
    r records%ROWTYPE;
    v_fencing bigint;
    v_attempt bigint;
    v_shard integer := floor(random() * 128)::integer;
BEGIN
    LOOP
        SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key FOR UPDATE;
        EXIT WHEN FOUND;
        -- A new key: it adds a record, so the limit applies (p_max_records null: far from it).
        IF p_max_records IS NOT NULL AND (SELECT sum(n) FROM record_count) >= p_max_records THEN
            PERFORM sweep(v_now, 64);
            IF (SELECT sum(n) FROM record_count) >= p_max_records THEN
                RETURN bare_outcome(11, v_now);
            END IF;
        END IF;
        v_fencing := nextval('fencing_tokens');
        INSERT INTO records (namespace, key, fingerprint, fencing_token, attempt, owner, retention_ms,
                             updated_at, state, token, lease_expires_at, request_id, takeover, expires_at)
        VALUES (p_namespace, p_key, p_fingerprint, v_fencing, 1, p_owner, p_retention_ms,
                v_now, 1, p_token, v_lease_end, p_request_id, false, v_expires)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            UPDATE record_count SET n = n + 1 WHERE shard = v_shard;
            RETURN ROW(1, v_now, v_fencing, 1, p_owner, p_token, v_lease_end, false, NULL, NULL, v_expires)::outcome;
        END IF;
        -- Another transaction inserted the key meanwhile: lock its row and decide on it.
    END LOOP;

    IF r.expires_at <= v_now THEN
        -- Retention ended: as if the key never existed (the record is replaced, not added).
        v_fencing := nextval('fencing_tokens');
        UPDATE records SET fingerprint = p_fingerprint, fencing_token = v_fencing, attempt = 1,
            owner = p_owner, retention_ms = p_retention_ms, updated_at = v_now, state = 1,
            token = p_token, lease_expires_at = v_lease_end, request_id = p_request_id,
            takeover = false, response = NULL, completed_at = NULL, expires_at = v_expires
        WHERE namespace = p_namespace AND key = p_key;
        RETURN ROW(1, v_now, v_fencing, 1, p_owner, p_token, v_lease_end, false, NULL, NULL, v_expires)::outcome;
    END IF;

    IF length(p_fingerprint) > 0 AND length(r.fingerprint) > 0 AND p_fingerprint <> r.fingerprint THEN
        RETURN bare_outcome(10, v_now);
    END IF;

    IF r.state = 3 THEN
        RETURN ROW(3, v_now, r.fencing_token, r.attempt, r.owner, NULL, NULL, NULL, r.response,
                   r.completed_at, r.expires_at)::outcome;
    END IF;

    IF r.state = 1 AND r.lease_expires_at > v_now THEN
        IF p_request_id IS NOT NULL AND p_request_id = r.request_id THEN
            RETURN ROW(1, v_now, r.fencing_token, r.attempt, r.owner, r.token, r.lease_expires_at,
                       r.takeover, NULL, NULL, r.expires_at)::outcome;
        END IF;
        IF p_wait AND NOT r.waiters THEN
            UPDATE records SET waiters = true WHERE namespace = p_namespace AND key = p_key;
        END IF;
        RETURN ROW(2, v_now, r.fencing_token, r.attempt, r.owner, NULL, r.lease_expires_at, NULL, NULL,
                   NULL, r.expires_at)::outcome;
    END IF;

    -- A lapsed lease (taken over) or a released key: a new grant on the old record.
    v_fencing := nextval('fencing_tokens');
    IF v_fencing <= r.fencing_token THEN
        RAISE EXCEPTION 'fencing token sequence at % is not above the key''s %', v_fencing, r.fencing_token;
    END IF;
    v_attempt := least(r.attempt + 1, 4294967295);
    UPDATE records SET
        fingerprint = CASE WHEN length(r.fingerprint) > 0 THEN r.fingerprint ELSE p_fingerprint END,
        fencing_token = v_fencing, attempt = v_attempt, owner = p_owner, retention_ms = p_retention_ms,
        updated_at = v_now, state = 1, token = p_token, lease_expires_at = v_lease_end,
        request_id = p_request_id, takeover = (r.state = 1), response = NULL, completed_at = NULL,
        expires_at = v_expires
    WHERE namespace = p_namespace AND key = p_key;
    RETURN ROW(1, v_now, v_fencing, v_attempt, p_owner, p_token, v_lease_end, r.state = 1, NULL, NULL,
               v_expires)::outcome;
END
$$;

CREATE FUNCTION notify_waiters(p_namespace text, p_key text) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify(current_schema() || '.keys', length(p_namespace) || ':' || p_namespace || p_key)
$$;

CREATE FUNCTION complete(
    p_namespace text, p_key text, p_now bigint, p_token uuid, p_response bytea, p_retention_ms bigint
) RETURNS outcome LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    r records%ROWTYPE;
    v_retention bigint;
BEGIN
    SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key FOR UPDATE;
    IF NOT FOUND OR r.expires_at <= v_now THEN
        RETURN bare_outcome(12, v_now);
    END IF;
    IF r.state = 1 AND r.token = p_token THEN
        v_retention := coalesce(p_retention_ms, r.retention_ms);
        UPDATE records SET retention_ms = v_retention, updated_at = v_now, state = 3,
            lease_expires_at = NULL, request_id = NULL, takeover = false, response = p_response,
            completed_at = v_now, expires_at = v_now + v_retention, waiters = false
        WHERE namespace = p_namespace AND key = p_key;
        IF r.waiters THEN
            PERFORM notify_waiters(p_namespace, p_key);
        END IF;
        RETURN ROW(1, v_now, r.fencing_token, NULL, NULL, NULL, NULL, NULL, NULL, v_now,
                   v_now + v_retention)::outcome;
    END IF;
    IF r.state = 3 AND r.token = p_token THEN
        RETURN ROW(4, v_now, r.fencing_token, NULL, NULL, NULL, NULL, NULL, NULL, r.completed_at,
                   r.expires_at)::outcome;
    END IF;
    RETURN bare_outcome(12, v_now);
END
$$;

CREATE FUNCTION renew(p_namespace text, p_key text, p_now bigint, p_token uuid, p_lease_ms bigint)
RETURNS outcome LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    v_lease_end bigint := v_now + p_lease_ms;
    r records%ROWTYPE;
BEGIN
    SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key FOR UPDATE;
    IF NOT FOUND OR r.expires_at <= v_now THEN
        RETURN bare_outcome(12, v_now);
    END IF;
    IF r.state = 1 AND r.token = p_token THEN
        UPDATE records SET updated_at = v_now, lease_expires_at = v_lease_end,
            expires_at = greatest(v_now + r.retention_ms, v_lease_end)
        WHERE namespace = p_namespace AND key = p_key;
        IF r.waiters THEN
            PERFORM notify_waiters(p_namespace, p_key);
        END IF;
        RETURN ROW(1, v_now, r.fencing_token, NULL, NULL, NULL, v_lease_end, NULL, NULL, NULL, NULL)::outcome;
    END IF;
    IF r.state = 3 AND r.token = p_token THEN
        RETURN bare_outcome(13, v_now);
    END IF;
    RETURN bare_outcome(12, v_now);
END
$$;

CREATE FUNCTION release(p_namespace text, p_key text, p_now bigint, p_token uuid)
RETURNS outcome LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    r records%ROWTYPE;
BEGIN
    SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key FOR UPDATE;
    IF NOT FOUND OR r.expires_at <= v_now THEN
        RETURN bare_outcome(1, v_now);
    END IF;
    IF r.state = 1 AND r.token = p_token THEN
        UPDATE records SET updated_at = v_now, state = 2, lease_expires_at = NULL, request_id = NULL,
            takeover = false, expires_at = v_now + r.retention_ms, waiters = false
        WHERE namespace = p_namespace AND key = p_key;
        IF r.waiters THEN
            PERFORM notify_waiters(p_namespace, p_key);
        END IF;
        RETURN bare_outcome(1, v_now);
    END IF;
    IF r.state = 2 AND r.token = p_token THEN
        RETURN bare_outcome(1, v_now);
    END IF;
    IF r.state = 3 AND r.token = p_token THEN
        RETURN bare_outcome(13, v_now);
    END IF;
    RETURN bare_outcome(12, v_now);
END
$$;
