-- converge: the outbox under real operations — restores and cut-overs to
-- another cluster, every isolation level, idempotent appends, retention at
-- any size, rolling upgrades.
--
-- Appends of instances still running the previous version wait for this
-- migration (the lock below), and are brought in line by a trigger after it
-- (step 6), so a rolling upgrade across it loses nothing. It reads the whole
-- outbox once (heads, duplicate event ids, the event-id index): on a large
-- outbox, appends wait for it.

LOCK TABLE converge.outbox IN SHARE ROW EXCLUSIVE MODE;

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
-- `tx_offset` so that every new event sorts after every stored one. The
-- cluster and the offset are also written into `converge.tx_order()` as
-- constants, so that a re-base reaches every open session at once (PostgreSQL
-- re-plans statements that inlined the function) and an append pays for no
-- lookup. A promoted standby or a point-in-time restore keeps the system
-- identifier but starts a new timeline, and may hand out again xids of
-- transactions it never received: the relay notices the timeline (see
-- `converge_outbox`'s clock) and reads its cursors again.
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

-- The highest `tx_order` stored or recorded as published.
CREATE FUNCTION converge.top_tx_order() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(t), 0) FROM (
        SELECT (SELECT o.tx_order FROM converge.outbox o WHERE o.partition = p.partition
                ORDER BY o.tx_order DESC LIMIT 1) AS t
        FROM converge.relay_partitions p
        UNION ALL
        SELECT cursor_tx_order FROM converge.relay_partitions) m
$$;

-- The slow path of `converge.tx_order()`, once per session and cluster: the
-- database must be the cluster `expected`, and no stored event may sort at
-- or after this cluster's next xid (rows restored without the clock). Caches
-- the check in the session setting `converge.cluster`.
CREATE FUNCTION converge.check_cluster(expected bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    live    bigint;
    c       converge.outbox_clock;
    top     bigint;
    next    bigint;
BEGIN
    SELECT system_identifier INTO live FROM pg_control_system();
    SELECT * INTO c FROM converge.outbox_clock;
    IF live IS DISTINCT FROM expected OR c.system_identifier IS DISTINCT FROM live THEN
        RAISE EXCEPTION USING
            ERRCODE = 'CV001',
            MESSAGE = format(
                'converge: the outbox was written in PostgreSQL cluster %s but this is cluster %s '
                '(a dump restored, a logical-replication cut-over or pg_upgrade): its event order '
                'must be re-based to this cluster before events are appended',
                expected, live),
            HINT = 'run `converge migrate` against this database (a converge relay or worker '
                   'starting does the same); appends succeed from then on';
    END IF;
    top := converge.top_tx_order();
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
    PERFORM set_config('converge.cluster', expected::text, false);
    RETURN 0;
END
$$;

-- (Re)writes `converge.tx_order()` with the cluster and offset as constants.
CREATE FUNCTION converge.define_tx_order(cluster bigint, tx_offset bigint) RETURNS void
LANGUAGE plpgsql VOLATILE AS $outer$
BEGIN
    EXECUTE format(
        $def$
        CREATE OR REPLACE FUNCTION converge.tx_order() RETURNS bigint
        LANGUAGE sql VOLATILE AS $body$
            SELECT txid_current() + %s::bigint
                 + CASE WHEN current_setting('converge.cluster', true) = %L THEN 0
                        ELSE converge.check_cluster(%s::bigint) END
        $body$
        $def$,
        tx_offset, cluster::text, cluster);
    COMMENT ON FUNCTION converge.tx_order() IS
        'The tx_order of an event appended now: this transaction''s xid plus the cluster''s offset. Rewritten by converge.rebase().';
END
$outer$;

SELECT converge.define_tx_order(system_identifier, 0) FROM pg_control_system();

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
    top := converge.top_tx_order();
    -- Every transaction that can still append has an xid at or above floor_;
    -- every stored event of this cluster sorts below next.
    floor_ := txid_snapshot_xmin(txid_current_snapshot());
    next := txid_snapshot_xmax(txid_current_snapshot());
    IF known AND c.system_identifier = live AND top < next + c.tx_offset THEN
        RETURN false;
    END IF;
    IF top > 4611686018427387904 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'CV001',
            MESSAGE = format('converge: the outbox holds a tx_order of %s, which converge never '
                             'writes (an event inserted with a tx_order of its own)', top),
            HINT = 'delete or correct that row; converge writes tx_order itself';
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
    PERFORM converge.define_tx_order(live, wanted);
    RETURN true;
END
$$;

-- 3. The relay partition of an aggregate: a stable hash of its key. Computed
-- by the appending statement (inlined) instead of a generated column, whose
-- expression PostgreSQL rebuilds on every INSERT (a tenth of an append's cost).
CREATE FUNCTION converge.partition_of(aggregate_type text, aggregate_id text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((hashtextextended(aggregate_type || '/' || aggregate_id, 0) & 2147483647) % 32)::integer
$$;
ALTER TABLE converge.outbox ALTER COLUMN partition DROP EXPRESSION;
ALTER TABLE converge.outbox ALTER COLUMN tx_order DROP DEFAULT;

-- An event's time if converge can carry it (years 1 to 9999, as RFC 3339
-- writes them), else NULL: such a row is a reject, never a crash.
CREATE FUNCTION converge.event_time(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t >= '0001-01-01 00:00:00+00' AND t < '10000-01-01 00:00:00+00'
                THEN t END
$$;

-- When the row was stored (the appending transaction's time): what retention
-- ages by. `occurred_at` is the application's to set (and may lie in the
-- future); rows stored before this migration have none and age by it.
ALTER TABLE converge.outbox ADD COLUMN recorded_at timestamptz;
ALTER TABLE converge.outbox ALTER COLUMN recorded_at SET DEFAULT now();

-- 4. One row per event id: appending an event id again (a retry after an
-- ambiguous commit) finds the stored event instead of adding a second one.
-- Earlier versions stored such a retry as a row of its own (its own version):
-- those rows keep their place and get new ids.
UPDATE converge.outbox o SET event_id = gen_random_uuid()
FROM (SELECT id, row_number() OVER (PARTITION BY event_id ORDER BY id) AS n
      FROM converge.outbox
      WHERE event_id IN (SELECT event_id FROM converge.outbox
                         GROUP BY event_id HAVING count(*) > 1)) d
WHERE d.id = o.id AND d.n > 1;
CREATE UNIQUE INDEX outbox_event_id_key ON converge.outbox (event_id);

-- 5. Rejects are keyed by the event, not by the row's position (positions may
-- repeat after a logical-replication move that does not carry sequences).
ALTER TABLE converge.relay_rejects DROP CONSTRAINT relay_rejects_pkey;
DELETE FROM converge.relay_rejects r USING converge.relay_rejects d
WHERE r.event_id = d.event_id AND r.outbox_id > d.outbox_id;
DELETE FROM converge.relay_rejects r
WHERE NOT EXISTS (SELECT 1 FROM converge.outbox o WHERE o.event_id = r.event_id);
ALTER TABLE converge.relay_rejects ADD PRIMARY KEY (event_id);

-- 6. A row inserted without its relay partition — by a plain INSERT, or by an
-- instance still running the previous version during a rolling upgrade —
-- gets its version and order from the aggregate's head, as Outbox::append
-- gives them, and its partition. Outbox::append and converge.append() fill
-- the partition themselves and never fire it.
CREATE FUNCTION converge.outbox_complete_row() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v  bigint;
    t  bigint;
BEGIN
    INSERT INTO converge.outbox_heads AS h (aggregate_type, aggregate_id, version, tx_order)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, 1, converge.tx_order())
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
        SET version = h.version + 1, tx_order = greatest(excluded.tx_order, h.tx_order)
    RETURNING h.version, h.tx_order INTO v, t;
    NEW.version := v;
    NEW.tx_order := t;
    NEW.partition := converge.partition_of(NEW.aggregate_type, NEW.aggregate_id);
    RETURN NEW;
END
$$;
CREATE TRIGGER outbox_complete_row BEFORE INSERT ON converge.outbox
    FOR EACH ROW WHEN (NEW.partition IS NULL)
    EXECUTE FUNCTION converge.outbox_complete_row();

-- 7. Retention's position per partition: everything at or before it is
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

-- 8. A relay that cannot publish (NATS unreachable from it) says so and hands
-- its partitions to the others, which stop counting it in their share.
ALTER TABLE converge.relay_instances
    ADD COLUMN publishing boolean NOT NULL DEFAULT true;

-- 9. Appending from SQL (triggers, other languages): the same path as
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
    IF occurred_at IS NOT NULL AND converge.event_time(occurred_at) IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'converge.append: occurred_at %s is not a time between the years 1 and 9999',
            occurred_at);
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
