-- converge: dead letters of the reconcilers.
--
-- A key lands here after its last attempt, or at once on a permanent error,
-- with the error, the event (when one triggered it), the attempts and times.
-- The message is only acknowledged once this row exists: nothing is
-- acknowledged and forgotten.
CREATE TABLE converge.dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reconciler        text NOT NULL,
    aggregate_key     text NOT NULL,
    path              text NOT NULL,
    event_id          uuid,
    subject           text,
    headers           jsonb,
    payload           bytea,
    error             text NOT NULL,
    permanent         boolean NOT NULL,
    attempts          integer NOT NULL,
    first_attempt_at  timestamptz,
    failed_at         timestamptz NOT NULL DEFAULT now(),
    recovered_at      timestamptz,
    recover_error     text,
    resolved_at       timestamptz,
    resolution        text
);

-- A redelivery after a crash between recording and acknowledging records nothing twice.
CREATE UNIQUE INDEX dead_letters_event_key ON converge.dead_letters (reconciler, event_id)
    WHERE event_id IS NOT NULL;
CREATE INDEX dead_letters_open_idx ON converge.dead_letters (reconciler, failed_at)
    WHERE resolved_at IS NULL;
