//! The lease statements, verbatim; shared with the benchmark harness.

/// Leases keys: `$1` reconcilers, `$2` keys (distinct pairs), `$3` the
/// holder, `$4` the lease in milliseconds; returns the granted
/// (reconciler, key, token). An expired row is taken over only if no
/// one holds a lock on it (`FOR UPDATE SKIP LOCKED`): a fenced
/// transaction of the previous holder (`FOR KEY SHARE`) keeps the key
/// busy until it ends. Rows are locked in key order and never waited
/// for, so concurrent grants cannot deadlock.
pub const ACQUIRE: &str = "WITH asked AS ( \
         SELECT r, k FROM unnest($1::text[], $2::text[]) AS t(r, k)), \
     expired AS ( \
         SELECT l.reconciler, l.key FROM converge.key_leases AS l \
         JOIN asked AS a ON l.reconciler = a.r AND l.key = a.k \
         WHERE l.expires_at <= clock_timestamp() \
         ORDER BY l.reconciler, l.key \
         FOR UPDATE OF l SKIP LOCKED), \
     taken AS ( \
         UPDATE converge.key_leases AS l \
         SET token = nextval('converge.key_lease_tokens'), holder = $3, \
             acquired_at = clock_timestamp(), \
             expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
         FROM expired AS e WHERE l.reconciler = e.reconciler AND l.key = e.key \
         RETURNING l.reconciler, l.key, l.token), \
     fresh AS ( \
         INSERT INTO converge.key_leases AS l \
             (reconciler, key, token, holder, acquired_at, expires_at) \
         SELECT r, k, nextval('converge.key_lease_tokens'), $3, clock_timestamp(), \
                clock_timestamp() + $4 * interval '1 millisecond' \
         FROM asked ORDER BY r, k \
         ON CONFLICT (reconciler, key) DO NOTHING \
         RETURNING reconciler, key, token) \
     SELECT reconciler, key, token FROM taken \
     UNION ALL SELECT reconciler, key, token FROM fresh";
/// Renews leases: `$1` reconcilers, `$2` keys, `$3` tokens, `$4` the lease
/// in milliseconds, `$5` the holder; returns the renewed tokens.
pub const RENEW: &str = "UPDATE converge.key_leases AS l \
     SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(r, k, tok) \
     WHERE l.reconciler = t.r AND l.key = t.k AND l.token = t.tok AND l.holder = $5 \
       AND l.expires_at > clock_timestamp() \
     RETURNING l.token";
/// Releases leases: `$1` reconcilers, `$2` keys, `$3` tokens, `$4`
/// whether each run converged its key (its open dead letter is
/// resolved), `$5` the holder.
pub const RELEASE: &str = "WITH released AS ( \
         DELETE FROM converge.key_leases AS l \
         USING unnest($1::text[], $2::text[], $3::bigint[], $4::bool[]) AS t(r, k, tok, conv) \
         WHERE l.reconciler = t.r AND l.key = t.k AND l.token = t.tok AND l.holder = $5 \
         RETURNING l.reconciler, l.key, t.conv), \
     resolved AS ( \
         UPDATE converge.dead_letters AS d \
         SET resolved_at = now(), resolution = 'converged', resolved_by = 'converge' \
         FROM released r \
         WHERE r.conv AND d.reconciler = r.reconciler AND d.aggregate_key = r.key \
           AND d.resolved_at IS NULL AND d.aggregate_key <> '' \
         RETURNING d.id, d.reconciler, d.aggregate_key) \
     INSERT INTO converge.audit (actor, action, target, reason, details, outcome, finished_at) \
     SELECT 'converge', 'dead_letter.resolve', 'dead letter ' || id, \
            'a later run converged the key', \
            jsonb_build_object('dead_letter', id, 'reconciler', reconciler, 'key', aggregate_key), \
            'ok', now() \
     FROM resolved";
/// Deletes what crashes left behind: lease rows expired for an hour and
/// consumer attempt counts untouched for a day, at most 1,000 each.
pub const CLEANUP: &str = "WITH leases AS ( \
         DELETE FROM converge.key_leases WHERE ctid = ANY (ARRAY( \
             SELECT ctid FROM converge.key_leases \
             WHERE expires_at < clock_timestamp() - interval '1 hour' LIMIT 1000 \
             FOR UPDATE SKIP LOCKED)) RETURNING 1), \
     attempts AS ( \
         DELETE FROM converge.event_attempts WHERE ctid = ANY (ARRAY( \
             SELECT ctid FROM converge.event_attempts \
             WHERE updated_at < now() - interval '1 day' LIMIT 1000 \
             FOR UPDATE SKIP LOCKED)) RETURNING 1) \
     SELECT (SELECT count(*) FROM leases) + (SELECT count(*) FROM attempts)";
