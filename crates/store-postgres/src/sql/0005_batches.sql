-- Version 5: Claims and Completes in batches. A replica with several Claims (or Completes) to
-- send at once sends them as one statement, one transaction and one commit: `claim_many` and
-- `complete_many` take one array per argument and apply each item in turn through the functions
-- a single call uses, so every rule is still decided in one place (`claim_core`, `complete`).
-- Items are applied in (namespace, key) order, so that two batches lock the keys they share in
-- the same order; the items of one batch count their new records in one shard, so that a batch
-- locks one row of each counter table. Each result row carries its item's position.
--
-- `claim` keeps its signature (a replica of the previous release calls it during a rolling
-- upgrade) and is now `claim_core` with a shard of its own. Its body is version 4's, unchanged
-- but for the shard.

CREATE FUNCTION claim_core(
    p_namespace text, p_key text, p_now bigint, p_fingerprint bytea, p_lease_ms bigint,
    p_retention_ms bigint, p_request_id text, p_owner text, p_token uuid,
    p_max_records bigint, p_namespace_max bigint, p_wait boolean, p_shard integer
) RETURNS outcome LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint := now_ms(p_now);
    v_lease_end bigint := v_now + p_lease_ms;
    v_expires bigint := v_now + p_lease_ms + p_retention_ms;
    r records%ROWTYPE;
    v_fencing bigint;
    v_attempt bigint;
    -- The counters' shard: the batch's own (so that a batch locks one row of each), or any.
    v_shard integer := coalesce(p_shard, floor(random() * 128)::integer);
    v_seen boolean;
BEGIN
    -- Read first, without a lock. A completed key within its retention (a replay, the common
    -- case), a key bound to another fingerprint, and a key held under another caller's valid lease
    -- (when the Claim does not wait) are answered from this read: no row lock, so no transaction
    -- id, no WAL record and no commit flush, for a call that changes nothing. Each answer is
    -- right at the moment of the read (a completed record changes only once it has expired).
    SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key;
    v_seen := FOUND;
    IF FOUND AND r.expires_at > v_now THEN
        IF length(p_fingerprint) > 0 AND length(r.fingerprint) > 0 AND p_fingerprint <> r.fingerprint THEN
            RETURN bare_outcome(10, v_now);
        END IF;
        IF r.state = 3 THEN
            RETURN ROW(3, v_now, r.fencing_token, r.attempt, r.owner, NULL, NULL, NULL, r.response,
                       r.completed_at, r.expires_at)::outcome;
        END IF;
        IF r.state = 1 AND r.lease_expires_at > v_now AND NOT p_wait
           AND (p_request_id IS NULL OR p_request_id IS DISTINCT FROM r.request_id) THEN
            RETURN ROW(2, v_now, r.fencing_token, r.attempt, r.owner, NULL, r.lease_expires_at, NULL, NULL,
                       NULL, r.expires_at)::outcome;
        END IF;
    END IF;

    LOOP
        -- A key the read did not find goes straight to the insert; one it found, or one that
        -- another transaction inserted since, is locked and decided on below.
        IF v_seen THEN
            SELECT * INTO r FROM records WHERE namespace = p_namespace AND key = p_key FOR UPDATE;
            EXIT WHEN FOUND;
        END IF;
        v_seen := true;
        -- A new key: it adds a record, so the namespace's quota (p_namespace_max null: none) and
        -- the store's limit (p_max_records null: far from it) apply.
        IF p_namespace_max IS NOT NULL
           AND (SELECT coalesce(sum(n), 0) FROM namespace_records WHERE namespace = p_namespace) >= p_namespace_max THEN
            PERFORM sweep(v_now, 64);
            IF (SELECT coalesce(sum(n), 0) FROM namespace_records WHERE namespace = p_namespace) >= p_namespace_max THEN
                RETURN bare_outcome(15, v_now);
            END IF;
        END IF;
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
            INSERT INTO namespace_records (namespace, shard, n) VALUES (p_namespace, v_shard, 1)
            ON CONFLICT (namespace, shard) DO UPDATE SET n = namespace_records.n + 1;
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

CREATE OR REPLACE FUNCTION claim(
    p_namespace text, p_key text, p_now bigint, p_fingerprint bytea, p_lease_ms bigint,
    p_retention_ms bigint, p_request_id text, p_owner text, p_token uuid,
    p_max_records bigint, p_namespace_max bigint, p_wait boolean
) RETURNS outcome LANGUAGE sql AS $$
    SELECT * FROM claim_core(p_namespace, p_key, p_now, p_fingerprint, p_lease_ms, p_retention_ms,
                             p_request_id, p_owner, p_token, p_max_records, p_namespace_max, p_wait, NULL)
$$;

-- One result row of a batch: the item's position in the arrays (from 1), then its outcome.
CREATE TYPE batch_outcome AS (
    item             integer,
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

CREATE FUNCTION batch_row(p_item bigint, o outcome) RETURNS batch_outcome LANGUAGE sql IMMUTABLE AS $$
    SELECT ROW(p_item::integer, o.code, o.now_ms, o.fencing_token, o.attempt, o.owner, o.token,
               o.lease_expires_at, o.takeover, o.response, o.completed_at, o.expires_at)::batch_outcome
$$;

CREATE FUNCTION claim_many(
    p_namespace text[], p_key text[], p_now bigint[], p_fingerprint bytea[], p_lease_ms bigint[],
    p_retention_ms bigint[], p_request_id text[], p_owner text[], p_token uuid[],
    p_max_records bigint, p_namespace_max bigint[], p_wait boolean[]
) RETURNS SETOF batch_outcome LANGUAGE plpgsql AS $$
DECLARE
    v_shard integer := floor(random() * 128)::integer;
    a record;
BEGIN
    FOR a IN
        SELECT * FROM unnest(p_namespace, p_key, p_now, p_fingerprint, p_lease_ms, p_retention_ms,
                             p_request_id, p_owner, p_token, p_namespace_max, p_wait)
            WITH ORDINALITY AS u(namespace, key, now, fingerprint, lease_ms, retention_ms, request_id,
                                 owner, token, namespace_max, wait, item)
        ORDER BY u.namespace COLLATE "C", u.key COLLATE "C", u.item
    LOOP
        RETURN NEXT batch_row(a.item, claim_core(a.namespace, a.key, a.now, a.fingerprint, a.lease_ms,
            a.retention_ms, a.request_id, a.owner, a.token, p_max_records, a.namespace_max, a.wait, v_shard));
    END LOOP;
END
$$;

CREATE FUNCTION complete_many(
    p_namespace text[], p_key text[], p_now bigint[], p_token uuid[], p_response bytea[],
    p_retention_ms bigint[]
) RETURNS SETOF batch_outcome LANGUAGE plpgsql AS $$
DECLARE
    a record;
BEGIN
    FOR a IN
        SELECT * FROM unnest(p_namespace, p_key, p_now, p_token, p_response, p_retention_ms)
            WITH ORDINALITY AS u(namespace, key, now, token, response, retention_ms, item)
        ORDER BY u.namespace COLLATE "C", u.key COLLATE "C", u.item
    LOOP
        RETURN NEXT batch_row(a.item, complete(a.namespace, a.key, a.now, a.token, a.response, a.retention_ms));
    END LOOP;
END
$$;
