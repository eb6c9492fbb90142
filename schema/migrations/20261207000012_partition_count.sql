-- converge: a relay partition count of the operator's choosing, changed on a
-- live system (`converge partitions set N`).
--
-- An aggregate's events must stay in one partition while any of them is
-- unpublished: one relay publishes a partition, in order, and two partitions
-- are published independently. So the partition is recorded in the
-- aggregate's head when the head is created, and every append puts the event
-- where the head says. Changing the count changes only where *new*
-- aggregates go; an existing aggregate moves (its head is rewritten) only
-- while it has no unpublished event, under its head's row lock, so its next
-- event is published after every earlier one. See SCALING.md.
--
-- Nothing here rewrites stored rows: the new column is NULL for every
-- existing head ("where converge.partition_of puts it"), and its range
-- constraint is checked for new rows only. The heads' lock is brief, but
-- waits behind any transaction that appended: rather than queue every append
-- behind a long one, give up after 10 s (run `converge migrate` again).
SET LOCAL lock_timeout = '10s';

-- 1. How many partitions new aggregates are hashed into. Rows of
-- `converge.relay_partitions` at or above it are retired: they receive no
-- new aggregate, and go once their aggregates moved and they hold no event.
CREATE TABLE converge.partition_layout (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions  integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    previous    integer,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO converge.partition_layout (partitions) VALUES (32);

COMMENT ON TABLE converge.partition_layout IS
    'The relay partition count new aggregates are hashed into; changed by converge.set_partition_count() (`converge partitions set N`).';

-- 2. Each aggregate's partition, in its head. NULL: where
-- converge.partition_of puts it (heads created before this migration, or by
-- an instance of an earlier converge during a rolling upgrade);
-- `converge partitions set` records those before it changes the count. The
-- range is every partition with a row in converge.relay_partitions: a head
-- can never name a partition that no relay serves.
ALTER TABLE converge.outbox_heads ADD COLUMN partition integer;
ALTER TABLE converge.outbox_heads ADD CONSTRAINT outbox_heads_partition_range
    CHECK (partition >= 0 AND partition < 32) NOT VALID;

COMMENT ON COLUMN converge.outbox_heads.partition IS
    'The relay partition every event of this aggregate goes to (NULL: converge.partition_of''s). Changed only while the aggregate has no unpublished event.';

-- 3. (Re)writes converge.partition_of with the count as a constant, so that
-- appends inline it and pay for no lookup (PostgreSQL re-plans statements
-- that inlined the function when it changes). Every function and operator
-- in it is named with its schema (see the pinned search_path migration).
CREATE FUNCTION converge.define_partition_of(partitions integer) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $outer$
BEGIN
    EXECUTE format(
        $def$
        CREATE OR REPLACE FUNCTION converge.partition_of(aggregate_type text, aggregate_id text)
        RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
            SELECT pg_catalog.int4(
                (pg_catalog.hashtextextended(
                     aggregate_type OPERATOR(pg_catalog.||) '/'::text
                         OPERATOR(pg_catalog.||) aggregate_id,
                     0::bigint)
                 OPERATOR(pg_catalog.&) 2147483647::bigint)
                OPERATOR(pg_catalog.%%) %s::bigint)
        $body$
        $def$,
        partitions);
    COMMENT ON FUNCTION converge.partition_of(text, text) IS
        'The relay partition a new aggregate goes to: a stable hash of its key, modulo converge.partition_layout.partitions. Rewritten by converge.set_partition_count().';
END
$outer$;

-- 4. Changes the count new aggregates are hashed into; returns the previous
-- one. Adds the partitions (and their retention positions) that do not exist
-- yet, widens the heads' range to every partition that has a row, and
-- rewrites converge.partition_of. Moves nothing and removes nothing: moving
-- the existing aggregates and retiring partitions is `converge partitions
-- set`'s work. Takes the heads' table lock for the rest of the caller's
-- transaction (every append waits meanwhile, for one scan of the heads):
-- set a lock_timeout.
CREATE FUNCTION converge.set_partition_count(partitions integer) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    before  integer;
    widest  integer;
BEGIN
    IF partitions IS NULL OR partitions < 1 OR partitions > 1024 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'converge.set_partition_count: %s partitions is out of range: choose 1 to 1024',
            coalesce(partitions::text, 'NULL'));
    END IF;
    SELECT l.partitions INTO before FROM converge.partition_layout l FOR UPDATE;
    INSERT INTO converge.relay_partitions (partition)
    SELECT g FROM generate_series(0, partitions - 1) AS g
    ON CONFLICT (partition) DO NOTHING;
    INSERT INTO converge.retention_positions (partition)
    SELECT g FROM generate_series(0, partitions - 1) AS g
    ON CONFLICT (partition) DO NOTHING;
    SELECT max(p.partition) + 1 INTO widest FROM converge.relay_partitions p;
    UPDATE converge.partition_layout l
    SET partitions = set_partition_count.partitions, previous = before, changed_at = now();
    -- The table lock: from here no append runs until the caller commits.
    ALTER TABLE converge.outbox_heads DROP CONSTRAINT outbox_heads_partition_range;
    EXECUTE format(
        'ALTER TABLE converge.outbox_heads ADD CONSTRAINT outbox_heads_partition_range '
        'CHECK (partition >= 0 AND partition < %s) NOT VALID', widest);
    -- Heads without a recorded partition are where the current function puts
    -- them: record it before the function changes (the caller recorded most
    -- of them before, without the lock; none can be in use now).
    UPDATE converge.outbox_heads h
    SET partition = converge.partition_of(h.aggregate_type, h.aggregate_id)
    WHERE h.partition IS NULL;
    PERFORM converge.define_partition_of(partitions);
    RETURN before;
END
$$;

REVOKE EXECUTE ON FUNCTION converge.define_partition_of(integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION converge.set_partition_count(integer) FROM PUBLIC;

-- 5. Rows inserted without a partition (plain INSERTs, instances of an
-- earlier converge) go where their aggregate's head says.
CREATE OR REPLACE FUNCTION converge.outbox_complete_row() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v  bigint;
    t  bigint;
    p  integer;
BEGIN
    INSERT INTO converge.outbox_heads AS h
        (aggregate_type, aggregate_id, version, tx_order, partition)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, 1, converge.tx_order(),
            converge.partition_of(NEW.aggregate_type, NEW.aggregate_id))
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
        SET version = h.version + 1, tx_order = greatest(excluded.tx_order, h.tx_order)
    RETURNING h.version, h.tx_order,
              coalesce(h.partition, converge.partition_of(h.aggregate_type, h.aggregate_id))
        INTO v, t, p;
    NEW.version := v;
    NEW.tx_order := t;
    NEW.partition := p;
    RETURN NEW;
END
$$;

-- 6. Appending from SQL: the event goes where the aggregate's head says.
CREATE OR REPLACE FUNCTION converge.append(
    aggregate_type    text,
    aggregate_id      text,
    event_type        text,
    payload           json,
    headers           jsonb DEFAULT '{}',
    expected_version  bigint DEFAULT NULL,
    event_id          uuid DEFAULT NULL,
    occurred_at       timestamptz DEFAULT NULL,
    schema_version    integer DEFAULT 1
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    token   text := '^[A-Za-z0-9_-]{1,128}$';
    h       record;
    v       bigint;
    t       bigint;
    p       integer;
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
    IF schema_version IS NULL OR schema_version < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'converge.append: schema_version %s must be 1 or more', schema_version);
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
    INSERT INTO converge.outbox_heads AS x
        (aggregate_type, aggregate_id, version, tx_order, partition)
    VALUES (append.aggregate_type, append.aggregate_id, 1, converge.tx_order(),
            converge.partition_of(append.aggregate_type, append.aggregate_id))
    ON CONFLICT ON CONSTRAINT outbox_heads_pkey DO UPDATE
        SET version = x.version + 1, tx_order = greatest(excluded.tx_order, x.tx_order)
        WHERE expected_version IS NULL OR x.version = expected_version
    RETURNING x.version, x.tx_order,
              coalesce(x.partition, converge.partition_of(x.aggregate_type, x.aggregate_id))
        INTO v, t, p;
    IF v IS NULL OR (expected_version IS NOT NULL AND v <> expected_version + 1) THEN
        RAISE EXCEPTION USING ERRCODE = 'CV004', MESSAGE = format(
            'converge.append: version conflict on %s/%s: expected version %s',
            aggregate_type, aggregate_id, expected_version);
    END IF;
    INSERT INTO converge.outbox (partition, tx_order, event_id, aggregate_type, aggregate_id,
                                 version, event_type, occurred_at, headers, payload,
                                 schema_version)
    VALUES (p, t,
            coalesce(append.event_id, gen_random_uuid()), append.aggregate_type,
            append.aggregate_id, v, append.event_type, coalesce(append.occurred_at, now()),
            headers, payload, append.schema_version);
    RETURN v;
END
$$;
