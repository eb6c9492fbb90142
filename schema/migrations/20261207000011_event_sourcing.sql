-- converge: event sourcing — the schema version of every stored event,
-- snapshots of aggregates, per-type retention policies and projections.
--
-- Nothing here rewrites stored rows: the new column has a constant default
-- (PostgreSQL adds it without touching the table), and its check constraint
-- is checked for new rows only (every existing row has the default). The
-- outbox's lock is brief, but waits behind any transaction that touched the
-- table: rather than queue every append behind a long one, give up after
-- 10 s (run `converge migrate` again).
SET LOCAL lock_timeout = '10s';

-- 1. Every event carries its schema version beside its logical type name
-- (`event_type`, chosen by the application and independent of any language's
-- type names). Events stored before this migration are version 1. Readers
-- turn older versions into the current shape with upcasters; the relay sends
-- the version as the `Converge-Schema-Version` header.
ALTER TABLE converge.outbox ADD COLUMN schema_version integer NOT NULL DEFAULT 1;
ALTER TABLE converge.outbox
    ADD CONSTRAINT outbox_schema_version_positive CHECK (schema_version > 0) NOT VALID;

-- `converge.append` takes the schema version too (default 1). The old
-- signature goes: two overloads would make calls with the common arguments
-- ambiguous.
DROP FUNCTION converge.append(text, text, text, json, jsonb, bigint, uuid, timestamptz);
CREATE FUNCTION converge.append(
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
                                 version, event_type, occurred_at, headers, payload,
                                 schema_version)
    VALUES (converge.partition_of(append.aggregate_type, append.aggregate_id), t,
            coalesce(append.event_id, gen_random_uuid()), append.aggregate_type,
            append.aggregate_id, v, append.event_type, coalesce(append.occurred_at, now()),
            headers, payload, append.schema_version);
    RETURN v;
END
$$;

COMMENT ON FUNCTION converge.append(text, text, text, json, jsonb, bigint, uuid, timestamptz, integer) IS
    'Appends a domain event from SQL as Outbox::append does (versions, order, checks); returns the aggregate''s new version.';

-- 2. Snapshots: an aggregate's state folded up to `version`, so loading it
-- reads only the events after. One per aggregate (the latest). `shape_version`
-- is the state's shape when it was taken: a snapshot of another shape is
-- ignored, and replaced by the next one taken.
CREATE TABLE converge.snapshots (
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    shape_version   integer NOT NULL,
    version         bigint NOT NULL CHECK (version > 0),
    -- `json`: stored and read back as the bytes the application serialized.
    state           json NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

COMMENT ON TABLE converge.snapshots IS
    'The latest snapshot of each event-sourced aggregate: its state up to a version, and the state''s shape version.';

-- 3. Retention per aggregate type: the relay's retention period applies to
-- every event but those of the types listed here, which are kept for ever.
-- An event-sourced aggregate type is listed before its first event is saved
-- (a Repository does it when it starts): its history is its state.
CREATE TABLE converge.retention_policies (
    aggregate_type  text PRIMARY KEY,
    keep            text NOT NULL DEFAULT 'forever' CHECK (keep = 'forever'),
    reason          text NOT NULL,
    set_at          timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE converge.retention_policies IS
    'Aggregate types whose events retention never deletes (event-sourced aggregates).';

-- Nobody but the owner takes a history back out of retention's reach: the
-- default privileges `converge grants` gave workers on future tables
-- (SELECT, INSERT, UPDATE, DELETE) are narrowed to SELECT, INSERT here.
REVOKE UPDATE, DELETE, TRUNCATE ON converge.retention_policies FROM PUBLIC;
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'converge.retention_policies'::regclass AND a.grantee <> c.relowner
               AND a.grantee <> 0 AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE') LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON converge.retention_policies FROM %s',
                       r.grantee::regrole::text);
    END LOOP;
END
$$;

-- Retention's positions, renamed: a relay of an earlier converge still
-- running during a rolling upgrade has a cleanup that knows nothing of kept
-- types and projections. In their place, an empty table of the old name and
-- shape with the same grants: instances of an earlier converge still start
-- (their privilege checks name it), and their cleanup finds no partition to
-- clean, so it deletes nothing until they are replaced.
ALTER TABLE converge.outbox_retention RENAME TO retention_positions;
ALTER INDEX converge.outbox_retention_pkey RENAME TO retention_positions_pkey;
CREATE TABLE converge.outbox_retention (LIKE converge.retention_positions INCLUDING ALL);
COMMENT ON TABLE converge.outbox_retention IS
    'Retired (migration 20261207000011): kept empty for instances of an earlier converge, '
    'whose retention finds nothing to clean here. converge.retention_positions replaced it.';
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.grantee, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'converge.retention_positions'::regclass
               AND a.grantee <> c.relowner AND a.grantee <> 0 LOOP
        EXECUTE format('GRANT %s ON converge.outbox_retention TO %s',
                       g.privilege_type, g.grantee::regrole::text);
    END LOOP;
END
$$;
-- An insert into it can only come from an earlier converge's code: refused,
-- so it can never start cleaning with rules that know nothing of projections.
CREATE FUNCTION converge.outbox_retention_retired() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '55000', MESSAGE =
        'converge.outbox_retention is retired: a relay of an earlier converge may not run '
        'retention on this schema; upgrade it';
END
$$;
CREATE TRIGGER outbox_retention_retired BEFORE INSERT OR UPDATE ON converge.outbox_retention
    FOR EACH ROW EXECUTE FUNCTION converge.outbox_retention_retired();

-- Relays say which converge they run (NULL: an earlier one), so a
-- repository can refuse to write events of a schema version above 1 while
-- a relay that would publish them without their version still runs.
ALTER TABLE converge.relay_instances ADD COLUMN protocol integer;

-- 4. Projections: read models kept by projection functions, inline (in the
-- appending transaction) or asynchronous (from the outbox, with a cursor
-- written in the transaction that applies the events). A rebuild builds the
-- read model's tables beside the live ones from the history, then swaps them
-- in one short transaction.
CREATE TABLE converge.projections (
    name              text PRIMARY KEY,
    mode              text NOT NULL CHECK (mode IN ('inline', 'async')),
    -- The projection's code version (`Projection::VERSION`): a higher one
    -- registering requests a rebuild; runners of a lower one stop applying.
    version           integer NOT NULL DEFAULT 1 CHECK (version > 0),
    -- The read model's tables (a rebuild's copies are `<table>__rebuild`).
    tables            text[] NOT NULL DEFAULT '{}',
    -- The aggregate types it reads ('{}': all).
    aggregate_types   text[] NOT NULL DEFAULT '{}',
    -- Asynchronous projections: every event at or before this position of the
    -- outbox's (tx_order, id) order is applied. Retention deletes nothing
    -- after the lowest such cursor.
    cursor_tx_order   bigint,
    cursor_id         bigint,
    applied           bigint NOT NULL DEFAULT 0,
    last_applied_at   timestamptz,
    -- Bumped by every swap.
    generation        integer NOT NULL DEFAULT 1,
    -- The event it cannot get past, and why (cleared once it gets past).
    error             text,
    error_event_id    uuid,
    error_at          timestamptz,
    -- A rebuild: requested (by an operator), building (copies being filled),
    -- and when it finished.
    rebuild_state         text CHECK (rebuild_state IN ('requested', 'building')),
    rebuild_requested_at  timestamptz,
    rebuild_requested_by  text,
    rebuild_audit_id      bigint,
    build_cursor_tx_order bigint,
    build_cursor_id       bigint,
    build_applied         bigint,
    build_started_at      timestamptz,
    build_instance        text,
    rebuild_error         text,
    rebuilt_at            timestamptz,
    registered_at     timestamptz NOT NULL DEFAULT now(),
    seen_at           timestamptz NOT NULL DEFAULT now(),
    seen_by           text
);

COMMENT ON TABLE converge.projections IS
    'Read models kept by projection functions: their cursors in the outbox, errors and rebuilds.';

-- `converge projections rebuild --wait` follows the worker's audit entry of
-- the rebuild it requested.
CREATE INDEX audit_projection_rebuild_idx ON converge.audit (((details ->> 'requested_in')::bigint))
    WHERE action = 'projection.rebuild';
