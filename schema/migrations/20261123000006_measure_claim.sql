-- The convergence figure's measurement claim, apart from `measured_at`
-- (which now only ever says when the figures were taken): one worker of the
-- cluster measures a sweep at a time, and a failed measurement leaves the
-- figures visibly old instead of freshly stamped.
ALTER TABLE converge.sweep_schedules
    ADD COLUMN measure_claimed_at timestamptz;
