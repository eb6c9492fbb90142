-- converge: the sweeper's leases, schedules and run history.

-- A cluster-wide lease per name (ShedLock done right). Every time is the
-- database clock. `token` grows on every acquisition and fences the holder's
-- writes: a holder whose lease was taken over can no longer record anything.
CREATE TABLE converge.leases (
    name          text PRIMARY KEY,
    holder        text,
    token         bigint NOT NULL DEFAULT 0,
    acquired_at   timestamptz,
    heartbeat_at  timestamptz,
    -- Nobody else may acquire before this instant: acquired_at + lock_at_most_for,
    -- pushed forward by heartbeats; on release, max(now, acquired_at + lock_at_least_for).
    lock_until    timestamptz NOT NULL DEFAULT '-infinity',
    released_at   timestamptz
);

-- The planned next fire time of each sweep, shared by every instance: a
-- schedule does not live in memory, so restarts never make it skip runs, and
-- a fire time is claimed by one instance with a compare-and-set.
CREATE TABLE converge.sweep_schedules (
    sweep         text PRIMARY KEY,
    next_fire_at  timestamptz,
    -- Where a run that stopped at a cap left off; the next run continues there.
    resume_after  text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE converge.sweep_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sweep           text NOT NULL,
    trigger         text NOT NULL,
    requested_keys  integer,
    instance        text NOT NULL,
    lease_token     bigint NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text NOT NULL DEFAULT 'running',
    scanned         integer NOT NULL DEFAULT 0,
    reconciled      integer NOT NULL DEFAULT 0,
    converged       integer NOT NULL DEFAULT 0,
    failed          integer NOT NULL DEFAULT 0,
    busy            integer NOT NULL DEFAULT 0,
    stopped_at_cap  text,
    error           text
);
CREATE INDEX sweep_runs_sweep_idx ON converge.sweep_runs (sweep, id DESC);

-- Keys that failed in a run, so the run can be replayed for exactly them.
CREATE TABLE converge.sweep_run_failures (
    run_id         bigint NOT NULL REFERENCES converge.sweep_runs (id) ON DELETE CASCADE,
    aggregate_key  text NOT NULL,
    error          text NOT NULL,
    attempts       integer NOT NULL,
    PRIMARY KEY (run_id, aggregate_key)
);
