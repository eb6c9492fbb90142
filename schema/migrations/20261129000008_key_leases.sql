-- converge: per-key exclusion by leases in rows, with fencing tokens.
--
-- A run of (reconciler, key) holds the key's row until `expires_at` (the
-- database clock), renewing it while it runs. Another run may take the key
-- only once the row has expired, and then gets a larger token. The holder
-- stops trusting its lease before the row expires (its own monotonic clock,
-- started before the statement that set `expires_at`), so two runs of a key
-- never both believe they hold it. Unlike a session advisory lock nothing
-- depends on one connection staying up: a killed backend, a fail-over, a
-- pooler in transaction mode or an idle-session timeout cannot release a key
-- behind its holder's back.
CREATE SEQUENCE converge.key_lease_tokens AS bigint;

CREATE TABLE converge.key_leases (
    reconciler  text NOT NULL,
    key         text NOT NULL,
    -- Fencing token: grows with every grant, across all keys.
    token       bigint NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (reconciler, key)
) WITH (fillfactor = 70); -- renewals are HOT updates

-- The idempotency key of each open logical step of a key: created when a
-- run of the step holding the key's lease first asks for it, the same for
-- every later run (retries, redeliveries, sweeps, operators, a resumed
-- claim) until the step is completed — the row deleted in the transaction
-- that records its effect; the next occurrence of the step gets a new one.
CREATE TABLE converge.step_keys (
    reconciler      text NOT NULL,
    key             text NOT NULL,
    step            text NOT NULL,
    idempotency_key uuid NOT NULL,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reconciler, key, step)
);

-- The consumer's attempts are JetStream's deliveries minus the rounds an
-- event was put back because its key was busy (it never ran). Written only
-- when an event is put back busy; deleted when the event is done with.
CREATE TABLE converge.event_attempts (
    reconciler  text NOT NULL,
    event_id    uuid NOT NULL,
    busy_rounds integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reconciler, event_id)
);

-- Dead letters: one open letter per reconciler and key (it was one per
-- event, so a replayed event that failed again recorded nothing and sweep
-- failures piled up a row per run). Older open duplicates are resolved.
DROP INDEX converge.dead_letters_event_key;
UPDATE converge.dead_letters d
SET resolved_at = now(), resolution = 'superseded'
WHERE d.resolved_at IS NULL AND d.aggregate_key <> ''
  AND EXISTS (SELECT 1 FROM converge.dead_letters n
              WHERE n.reconciler = d.reconciler AND n.aggregate_key = d.aggregate_key
                AND n.resolved_at IS NULL AND n.id > d.id);
CREATE UNIQUE INDEX dead_letters_open_key ON converge.dead_letters (reconciler, aggregate_key)
    WHERE resolved_at IS NULL AND aggregate_key <> '';
-- Malformed messages have no key: one open letter per event.
CREATE UNIQUE INDEX dead_letters_open_event ON converge.dead_letters (reconciler, event_id)
    WHERE resolved_at IS NULL AND aggregate_key = '' AND event_id IS NOT NULL;
