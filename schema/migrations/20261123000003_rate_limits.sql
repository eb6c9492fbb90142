-- converge: cluster-wide rate limits (`RateLimits::postgres`).
--
-- One row per limiter name, created by its first acquire. `tat` is the GCRA's
-- "theoretical arrival time" on the database clock: with emission interval T
-- and burst b, an acquire sets tat = greatest(tat, clock_timestamp()) + T in
-- one upsert and its caller may call at tat - b*T. The row lock of the upsert
-- gives concurrent callers of every instance distinct slots. A `tat` in the
-- past means the limiter is idle; rows of limiters no longer used can be
-- deleted at any time (the next acquire starts afresh, at a full burst).
CREATE TABLE converge.rate_limits (
    name        text PRIMARY KEY,
    tat         timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE converge.rate_limits IS
    'Cluster-wide rate limiters of converge reconcilers: the GCRA theoretical arrival time per limiter name.';
