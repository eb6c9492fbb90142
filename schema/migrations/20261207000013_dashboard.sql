-- converge: what the operations dashboard (`converge dashboard`) draws that
-- the database did not keep.
--
-- * The convergence figure over time. Each measurement of a sweep's figure
--   (unconverged keys, and when the oldest of them started waiting), which
--   `converge.sweep_schedules` keeps only the latest of, is also added here;
--   the measuring worker deletes the sweep's rows older than the retention
--   (14 days) as it adds one, so the table holds at most that much.
-- * Each sweep's schedule as its workers declared it (a description, the
--   cron expression and its time zone), so the dashboard can show the fire
--   times ahead and the daylight-saving changes among them.

CREATE TABLE converge.convergence_history (
    sweep                 text NOT NULL,
    measured_at           timestamptz NOT NULL,
    unconverged_keys      bigint NOT NULL,
    oldest_unconverged_at timestamptz,
    PRIMARY KEY (sweep, measured_at)
);

COMMENT ON TABLE converge.convergence_history IS
    'Each measurement of a sweep''s convergence figure (unconverged keys, oldest waiting since), kept 14 days; drawn by converge dashboard.';

ALTER TABLE converge.sweep_schedules
    ADD COLUMN schedule  text,
    ADD COLUMN cron      text,
    ADD COLUMN time_zone text;

COMMENT ON COLUMN converge.sweep_schedules.schedule IS
    'The schedule as the sweep''s workers declared it, in words (the latest starting worker''s).';
COMMENT ON COLUMN converge.sweep_schedules.cron IS
    'The cron expression of a cron schedule (NULL for fixed rates and delays).';
COMMENT ON COLUMN converge.sweep_schedules.time_zone IS
    'The IANA time zone of the cron expression, or of the run window.';
