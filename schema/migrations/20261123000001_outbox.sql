-- converge: the transactional outbox and the relay's state.
--
-- Ordering and visibility. Every row carries `tx_order`: the appending
-- transaction's top-level xid, raised (when needed) to the `tx_order` of the
-- aggregate's previous event so that, per aggregate, (tx_order, id) follows
-- version order. The relay only reads rows whose `tx_order` is below the xmin
-- of its snapshot: every transaction that could still add a row below that
-- bound has finished, so a cursor on (tx_order, id) never skips a row whose
-- transaction commits late (the bigserial high-water-mark bug).

CREATE TABLE converge.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    -- Relay partition: a stable hash of the aggregate key. One relay instance
    -- owns a partition at a time, which keeps per-aggregate order on the stream.
    partition       integer NOT NULL GENERATED ALWAYS AS (
                        (hashtextextended(aggregate_type || '/' || aggregate_id, 0) & 2147483647) % 32
                    ) STORED,
    tx_order        bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    event_id        uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    version         bigint NOT NULL,
    event_type      text NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    headers         jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- `json`, not `jsonb`: the relay publishes exactly the bytes the
    -- application serialized (and the size checked at append time).
    payload         json NOT NULL,
    CONSTRAINT outbox_aggregate_version_key UNIQUE (aggregate_type, aggregate_id, version),
    CONSTRAINT outbox_version_positive CHECK (version > 0),
    CONSTRAINT outbox_aggregate_id_not_empty CHECK (aggregate_id <> '')
);

-- The relay's read path: per partition, in (tx_order, id) order.
CREATE UNIQUE INDEX outbox_relay_order_idx ON converge.outbox (partition, tx_order, id);

COMMENT ON TABLE converge.outbox IS
    'Domain events appended in the business transaction; published to NATS JetStream by the converge relay.';

-- One row per relay partition: its owner (a lease on the database clock),
-- the fencing epoch, and the cursor up to which every event is on the stream.
CREATE TABLE converge.relay_partitions (
    partition        integer PRIMARY KEY,
    owner_id         uuid,
    owner_name       text,
    lease_until      timestamptz,
    epoch            bigint NOT NULL DEFAULT 0,
    cursor_tx_order  bigint NOT NULL DEFAULT 0,
    cursor_id        bigint NOT NULL DEFAULT 0,
    published        bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

INSERT INTO converge.relay_partitions (partition) SELECT g FROM generate_series(0, 31) AS g;

-- Live relay instances; the partitions are shared evenly among them.
CREATE TABLE converge.relay_instances (
    instance_id   uuid PRIMARY KEY,
    name          text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- The instance is idle and waits for a NOTIFY: appending transactions only
    -- notify while some live relay is armed, because PostgreSQL serialises the
    -- commits of notifying transactions.
    armed         boolean NOT NULL DEFAULT false
);

-- Events the relay could not publish and will never be able to (too large for
-- the server, or a subject token that is not valid). They stay in the outbox;
-- this row says why they are not on the stream, so nothing blocks behind them.
CREATE TABLE converge.relay_rejects (
    outbox_id    bigint PRIMARY KEY,
    event_id     uuid NOT NULL,
    reason       text NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now()
);
