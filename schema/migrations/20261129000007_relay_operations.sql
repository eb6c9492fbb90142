-- converge: the outbox under real operations — restores and cut-overs to
-- another cluster, every isolation level, idempotent appends, retention at
-- any size.

-- 1. The head of each aggregate: its latest version and that event's
-- `tx_order`. Every append updates (or creates) its aggregate's head in the
-- appending transaction, so concurrent appends to one aggregate queue on this
-- row: under READ COMMITTED the next one continues from the committed head,
-- under REPEATABLE READ and SERIALIZABLE a head changed since the snapshot is
-- a serialization failure (40001, retryable) — never a reused version. Because
-- versions live here, retention may delete every published event, the latest
-- included. A head is ~60 bytes per aggregate ever created (no payload).
CREATE TABLE converge.outbox_heads (
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    version         bigint NOT NULL CHECK (version > 0),
    tx_order        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) WITH (fillfactor = 80); -- room on each page for HOT updates of the head

INSERT INTO converge.outbox_heads (aggregate_type, aggregate_id, version, tx_order)
SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, version, tx_order
FROM converge.outbox
ORDER BY aggregate_type, aggregate_id, version DESC;

COMMENT ON TABLE converge.outbox_heads IS
    'The latest version (and its tx_order) of every aggregate that ever had an event; appends update it, retention never deletes it.';

-- 2. Which cluster the outbox's order belongs to. `tx_order` is the appending
-- transaction's xid plus `tx_offset`. Xids belong to one cluster: a dump
-- restored elsewhere, a logical-replication cut-over or pg_upgrade lands in a
-- cluster whose counter may be far lower, where new events would sort before
-- published ones and never be sent. So appends check (once per session) that
-- they run on the cluster recorded here, and refuse otherwise; `converge
-- migrate` (or any relay starting) re-bases: records this cluster and raises
-- `tx_offset` so that every new event sorts after every stored one. A
-- physical standby or a point-in-time restore is the same cluster (same
-- system identifier, xids continue): nothing to do.
CREATE TABLE converge.outbox_clock (
    singleton                   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    system_identifier           bigint NOT NULL,
    tx_offset                   bigint NOT NULL DEFAULT 0,
    since                       timestamptz NOT NULL DEFAULT now(),
    previous_system_identifier  bigint,
    rebased_at                  timestamptz
);

INSERT INTO converge.outbox_clock (system_identifier)
SELECT system_identifier FROM pg_control_system();

-- The slow path of `converge.tx_order()`, once per session: checks the
-- cluster and that no stored event sorts at or after this cluster's next
-- xid (a data-only restore into a migrated database), then caches the
-- offset in the session setting `converge.tx_offset`.
CREATE FUNCTION converge.tx_offset() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    c      converge.outbox_clock;
    live   bigint;
    top    bigint;
    next   bigint;
BEGIN
    SELECT system_identifier INTO live FROM pg_control_system();
    SELECT * INTO c FROM converge.outbox_clock;
    IF NOT FOUND OR c.system_identifier IS DISTINCT FROM live THEN
        RAISE EXCEPTION USING
            ERRCODE = 'CV001',
            MESSAGE = format(
                'converge: the outbox was written in PostgreSQL cluster %s but this is cluster %s '
                '(a dump restored, a logical-replication cut-over or pg_upgrade): its event order '
                'must be re-based to this cluster before events are appended',
                coalesce(c.system_identifier::text, 'unknown'), live),
            HINT = 'run `converge migrate` against this database (a converge relay or worker '
                   'starting does the same); appends succeed from then on';
    END IF;
    SELECT max(t) INTO top FROM (
        SELECT (SELECT o.tx_order FROM converge.outbox o WHERE o.partition = p.partition
                ORDER BY o.tx_order DESC LIMIT 1) AS t
        FROM converge.relay_partitions p
        UNION ALL
        SELECT cursor_tx_order FROM converge.relay_partitions) m;
    next := txid_snapshot_xmax(txid_current_snapshot()) + c.tx_offset;
    IF top >= next THEN
        RAISE EXCEPTION USING
            ERRCODE = 'CV001',
            MESSAGE = format(
                'converge: the outbox holds events ordered after this cluster''s next transaction '
                '(%s >= %s): its rows were restored without the converge schema''s clock, and new '
                'events would sort before them', top, next),
            HINT = 'run `converge migrate` against this database; appends succeed from then on';
    END IF;
    PERFORM set_config('converge.tx_offset', c.tx_offset::text, false);
    RETURN c.tx_offset;
END
$$;

-- The `tx_order` of an event appended now: this transaction's xid plus the
-- cluster's offset. Inlined into the append statement; the session setting
-- makes the check above a one-time cost per connection.
CREATE FUNCTION converge.tx_order() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT txid_current()
         + coalesce(nullif(current_setting('converge.tx_offset', true), '')::bigint,
                    converge.tx_offset())
$$;

-- Re-bases the outbox on the cluster it runs on (see above). Idempotent: on
-- the recorded cluster, with nothing sorted ahead, it changes nothing and
-- returns false. Refuses while this database subscribes to a publication
-- (logical replication before its cut-over still brings rows ordered by the
-- source).
CREATE FUNCTION converge.rebase() RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    c       converge.outbox_clock;
    known   boolean;
    live    bigint;
    top     bigint;
    floor_  bigint;
    next    bigint;
    wanted  bigint;
BEGIN
    SELECT system_identifier INTO live FROM pg_control_system();
    SELECT * INTO c FROM converge.outbox_clock FOR UPDATE;
    known := FOUND;
    SELECT max(t) INTO top FROM (
        SELECT (SELECT o.tx_order FROM converge.outbox o WHERE o.partition = p.partition
                ORDER BY o.tx_order DESC LIMIT 1) AS t
        FROM converge.relay_partitions p
        UNION ALL
        SELECT cursor_tx_order FROM converge.relay_partitions) m;
    top := coalesce(top, 0);
    -- Every transaction that can still append has an xid at or above floor_;
    -- every stored event of this cluster sorts below next.
    floor_ := txid_snapshot_xmin(txid_current_snapshot());
    next := txid_snapshot_xmax(txid_current_snapshot());
    IF known AND c.system_identifier = live AND top < next + c.tx_offset THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_subscription s
               WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND s.subenabled) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'CV001',
            MESSAGE = 'converge: this database subscribes to a logical-replication publication; '
                      're-basing the outbox before the cut-over would order replicated events '
                      'after new ones',
            HINT = 'finish the cut-over (disable the subscription), then run `converge migrate`';
    END IF;
    wanted := greatest(coalesce(c.tx_offset, 0), top + 1 - floor_);
    IF NOT known THEN
        INSERT INTO converge.outbox_clock (system_identifier, tx_offset, rebased_at)
        VALUES (live, wanted, now());
    ELSE
        UPDATE converge.outbox_clock
        SET previous_system_identifier = CASE WHEN system_identifier <> live
                                              THEN system_identifier
                                              ELSE previous_system_identifier END,
            system_identifier = live, tx_offset = wanted, since = now(), rebased_at = now();
    END IF;
    RETURN true;
END
$$;

-- A plain INSERT into converge.outbox would skip the aggregate's head
-- (versions, order): refuse it, naming what to use instead.
CREATE FUNCTION converge.refuse_plain_insert() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'CV002',
        MESSAGE = 'converge: events cannot be inserted into converge.outbox directly: the '
                  'aggregate''s version and order would be wrong',
        HINT = 'append with converge.append(aggregate_type, aggregate_id, event_type, payload) '
               'from SQL, or Outbox::append from Rust';
END
$$;

ALTER TABLE converge.outbox ALTER COLUMN tx_order SET DEFAULT converge.refuse_plain_insert();

-- The relay partition of an aggregate: a stable hash of its key. Computed by
-- the appending statement (inlined) instead of a generated column, whose
-- expression PostgreSQL rebuilds on every INSERT (a tenth of an append's cost).
CREATE FUNCTION converge.partition_of(aggregate_type text, aggregate_id text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((hashtextextended(aggregate_type || '/' || aggregate_id, 0) & 2147483647) % 32)::integer
$$;
ALTER TABLE converge.outbox ALTER COLUMN partition DROP EXPRESSION;

-- 3. One row per event id: appending an event id again (a retry after an
-- ambiguous commit) finds the stored event instead of adding a second one.
CREATE UNIQUE INDEX outbox_event_id_key ON converge.outbox (event_id);

-- 4. Rejects are keyed by the event, not by the row's position (positions may
-- repeat after a logical-replication move that does not carry sequences).
ALTER TABLE converge.relay_rejects DROP CONSTRAINT relay_rejects_pkey;
DELETE FROM converge.relay_rejects r USING converge.relay_rejects d
WHERE r.event_id = d.event_id AND r.outbox_id > d.outbox_id;
ALTER TABLE converge.relay_rejects ADD PRIMARY KEY (event_id);

-- 5. Retention's position per partition: everything at or before it is
-- deleted, so each batch starts where the last one stopped instead of
-- scanning the index entries of rows already deleted.
CREATE TABLE converge.outbox_retention (
    partition        integer PRIMARY KEY,
    after_tx_order   bigint NOT NULL DEFAULT 0,
    after_id         bigint NOT NULL DEFAULT 0,
    deleted          bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO converge.outbox_retention (partition)
SELECT partition FROM converge.relay_partitions;

-- 6. A relay that cannot publish (NATS unreachable from it) says so and hands
-- its partitions to the others, which stop counting it in their share.
ALTER TABLE converge.relay_instances
    ADD COLUMN publishing boolean NOT NULL DEFAULT true;

-- 7. Appending from SQL (triggers, other languages): the same path as
-- Outbox::append, with the same checks but the size (the relay records an
-- event too large for the server as a reject). Returns the new version.
CREATE FUNCTION converge.append(
    aggregate_type    text,
    aggregate_id      text,
    event_type        text,
    payload           json,
    headers           jsonb DEFAULT '{}',
    expected_version  bigint DEFAULT NULL,
    event_id          uuid DEFAULT NULL,
    occurred_at       timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    token   text := '^[A-Za-z0-9_-]{1,128}$';
    h       record;
    v       bigint;
    t       bigint;
    stored  bigint;
BEGIN
    IF aggregate_type IS NULL OR aggregate_type !~ token THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'converge.append: aggregate_type %L is not a valid subject token: use 1 to 128 ASCII '
            'letters, digits, _ or -', aggregate_type);
    END IF;
    IF event_type IS NULL OR event_type !~ token THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'converge.append: event_type %L is not a valid subject token: use 1 to 128 ASCII '
            'letters, digits, _ or -', event_type);
    END IF;
    IF aggregate_id IS NULL OR aggregate_id = '' OR octet_length(aggregate_id) > 512
       OR aggregate_id ~ '[\r\n]' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE =
            'converge.append: aggregate_id must be 1 to 512 bytes without CR or LF';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'converge.append: payload is NULL';
    END IF;
    headers := coalesce(headers, '{}');
    IF jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE =
            'converge.append: headers must be a JSON object of string values';
    END IF;
    FOR h IN SELECT * FROM jsonb_each(headers) LOOP
        IF jsonb_typeof(h.value) <> 'string' OR h.key !~ '^[!-9;-~]+$'
           OR lower(h.key) LIKE 'converge-%' OR lower(h.key) LIKE 'nats-%'
           OR (h.value #>> '{}') ~ '[\r\n]' THEN
            RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
                'converge.append: header %L must have a printable name without '':'' outside '
                'the reserved prefixes Converge- and Nats-, and a string value without CR or LF',
                h.key);
        END IF;
    END LOOP;
    IF event_id IS NOT NULL THEN
        SELECT o.version INTO stored FROM converge.outbox o WHERE o.event_id = append.event_id;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'CV003', MESSAGE = format(
                'converge.append: event %s is already in the outbox (version %s)', event_id, stored);
        END IF;
    END IF;
    IF expected_version IS NOT NULL AND expected_version <> 0 AND NOT EXISTS (
        SELECT 1 FROM converge.outbox_heads x
        WHERE x.aggregate_type = append.aggregate_type AND x.aggregate_id = append.aggregate_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'CV004', MESSAGE = format(
            'converge.append: version conflict on %s/%s: expected version %s, found 0',
            aggregate_type, aggregate_id, expected_version);
    END IF;
    INSERT INTO converge.outbox_heads AS x (aggregate_type, aggregate_id, version, tx_order)
    VALUES (append.aggregate_type, append.aggregate_id, 1, converge.tx_order())
    ON CONFLICT ON CONSTRAINT outbox_heads_pkey DO UPDATE
        SET version = x.version + 1, tx_order = greatest(excluded.tx_order, x.tx_order)
        WHERE expected_version IS NULL OR x.version = expected_version
    RETURNING x.version, x.tx_order INTO v, t;
    IF v IS NULL OR (expected_version IS NOT NULL AND v <> expected_version + 1) THEN
        RAISE EXCEPTION USING ERRCODE = 'CV004', MESSAGE = format(
            'converge.append: version conflict on %s/%s: expected version %s',
            aggregate_type, aggregate_id, expected_version);
    END IF;
    INSERT INTO converge.outbox (partition, tx_order, event_id, aggregate_type, aggregate_id,
                                 version, event_type, occurred_at, headers, payload)
    VALUES (converge.partition_of(append.aggregate_type, append.aggregate_id), t,
            coalesce(append.event_id, gen_random_uuid()), append.aggregate_type,
            append.aggregate_id, v, append.event_type, coalesce(append.occurred_at, now()),
            headers, payload);
    RETURN v;
END
$$;

COMMENT ON FUNCTION converge.append(text, text, text, json, jsonb, bigint, uuid, timestamptz) IS
    'Appends a domain event from SQL as Outbox::append does (versions, order, checks); returns the aggregate''s new version.';
