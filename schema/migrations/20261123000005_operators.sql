-- Operators: the audit log of every operator action, the registry of running
-- workers (so `converge status` finds streams, consumers and sweeps), and each
-- sweep's convergence figure measured by the workers.

CREATE TABLE converge.audit (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    -- The OS user (or `--actor`) who acted.
    actor    text NOT NULL,
    -- outbox.replay, sweep.run, sweep.replay, lock.release, dead_letter.retry, dead_letter.discard
    action   text NOT NULL,
    -- What it acted on: a sweep, a run id, a lease, dead letter ids, a filter.
    target   text NOT NULL,
    reason   text,
    details  jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- NULL while it runs; then ok, partial or failed (with the reason in details).
    outcome  text,
    finished_at timestamptz
);
CREATE INDEX audit_at_idx ON converge.audit (at DESC);

COMMENT ON TABLE converge.audit IS
    'Operator actions on converge (replays, manual runs, lease releases, dead-letter retries and discards): who, when, why, outcome.';

CREATE TABLE converge.workers (
    instance      text PRIMARY KEY,
    application   text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- The JetStream stream the worker's relay publishes to, if it runs one.
    stream        text,
    -- Its subject prefix: events go to <prefix>.<aggregate_type>.<event_type>.
    stream_prefix text,
    consumers     text[] NOT NULL DEFAULT '{}',
    sweeps        text[] NOT NULL DEFAULT '{}',
    reconcilers   text[] NOT NULL DEFAULT '{}',
    -- The NATS subject of the application's control plane.
    control_subject text
);

COMMENT ON TABLE converge.workers IS
    'Running converge workers and what they registered; a row whose heartbeat is older than a minute is a dead worker.';

ALTER TABLE converge.sweep_schedules
    ADD COLUMN unconverged_keys       bigint,
    ADD COLUMN oldest_unconverged_at  timestamptz,
    ADD COLUMN measured_at            timestamptz;

ALTER TABLE converge.dead_letters
    ADD COLUMN resolved_by text;

-- W3C trace context of the transaction that appended the event (`traceparent`
-- header value), sent with the event and restored in the reconciler's span.
ALTER TABLE converge.outbox
    ADD COLUMN traceparent text;
