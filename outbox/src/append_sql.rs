//! The statements `Outbox::append` runs: one round trip per append, whatever
//! the options.
//!
//! Every append updates (or creates) the aggregate's head in
//! `converge.outbox_heads` — version + 1, `tx_order` = the greater of this
//! transaction's ([`converge.tx_order()`](crate) : xid + the cluster's
//! offset) and the head's — and inserts the event with what the head
//! returned, in the partition the head names (recorded when the head is
//! created, and changed only while the aggregate has nothing unpublished:
//! see `converge partitions set`). Appends to one aggregate therefore queue
//! on its head row, and
//! per aggregate `(tx_order, id)` follows the version order the relay
//! publishes in. The head's `WHERE` also holds the size check for the
//! version's digits (the rest of the message's size is checked before the
//! statement), so an event too large is refused without writing anything.

use std::sync::LazyLock;

/// Parameters of the one-event statement:
/// `$1` event id, `$2` aggregate type, `$3` aggregate id, `$4` event type,
/// `$5` occurred at (NULL: now()), `$6` headers (JSON text), `$7` payload
/// (JSON text), `$8` expected version (NULL: any), `$9` traceparent,
/// `$10` the message's size without the version's digits, `$11` the size
/// limit, `$12` the schema version.
///
/// The statement returns `(version, existed, occurred_at)`: the new version
/// and the event's time, or — with an explicit event id that is already
/// stored — that event's version, `existed = true` and no time. No row: the expected version did not match, or the
/// version's digits made the event too large; nothing was written.
fn append_one(notify: bool, expect_version: bool, explicit_id: bool) -> String {
    let existing = if explicit_id {
        "existing AS (SELECT o.version FROM converge.outbox o WHERE o.event_id = $1), "
    } else {
        ""
    };
    let mut guards = Vec::new();
    if explicit_id {
        guards.push("NOT EXISTS (SELECT 1 FROM existing)");
    }
    if expect_version {
        // Version 0 creates the head; any other needs one to update.
        guards.push(
            "($8::bigint = 0 OR EXISTS (SELECT 1 FROM converge.outbox_heads x \
              WHERE x.aggregate_type = $2 AND x.aggregate_id = $3))",
        );
    }
    let guard = if guards.is_empty() {
        String::new()
    } else {
        format!("WHERE {} ", guards.join(" AND "))
    };
    let expected = if expect_version {
        "AND h.version = $8::bigint "
    } else {
        ""
    };
    let existed = if explicit_id {
        " UNION ALL SELECT version, true, NULL::timestamptz FROM existing"
    } else {
        ""
    };
    format!(
        "WITH {existing}head AS ( \
             INSERT INTO converge.outbox_heads AS h \
                 (aggregate_type, aggregate_id, version, tx_order, partition) \
             SELECT $2::text, $3::text, 1, converge.tx_order(), converge.partition_of($2, $3) \
             {guard}\
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET version = h.version + 1, tx_order = greatest(excluded.tx_order, h.tx_order) \
                 WHERE $10::bigint + length((h.version + 1)::text) <= $11::bigint {expected}\
             RETURNING h.version, h.tx_order, \
                 coalesce(h.partition, converge.partition_of($2, $3)) AS partition), \
         ins AS ( \
             INSERT INTO converge.outbox \
                 (partition, tx_order, event_id, aggregate_type, aggregate_id, version, \
                  event_type, occurred_at, headers, payload, traceparent, schema_version) \
             SELECT head.partition, head.tx_order, $1, $2, $3, head.version, $4, \
                    coalesce($5, now()), $6::jsonb, $7::json, $9::text, $12::integer \
             FROM head \
             RETURNING version, occurred_at{notify}) \
         SELECT version, false, occurred_at FROM ins{existed}",
        notify = if notify { NOTIFY } else { "" },
    )
}

/// Appended to `RETURNING`: notify only while some live relay is idle and
/// waiting ("armed"); PostgreSQL serialises the commits of notifying
/// transactions.
const NOTIFY: &str = ", CASE WHEN EXISTS (SELECT 1 FROM converge.relay_instances \
                          WHERE armed AND heartbeat_at > now() - interval '1 minute') \
                     THEN pg_notify('converge_outbox', '') END";

/// The eight variants of the one-event statement, built once.
static APPEND_ONE: LazyLock<[String; 8]> =
    LazyLock::new(|| std::array::from_fn(|i| append_one(i & 1 != 0, i & 2 != 0, i & 4 != 0)));

/// The one-event statement for these options.
pub(crate) fn append_one_sql(
    notify: bool,
    expect_version: bool,
    explicit_id: bool,
) -> &'static str {
    &APPEND_ONE
        [usize::from(notify) | usize::from(expect_version) << 1 | usize::from(explicit_id) << 2]
}

/// Parameters of the batch statement: `$1` event ids, `$2` aggregate types,
/// `$3` aggregate ids, `$4` event types, `$5` headers, `$6` payloads (arrays
/// in append order), `$7` the traceparent they share, `$8` the schema
/// versions. Heads are updated once
/// per aggregate, in key order (so two batches lock heads in the same order),
/// each by the number of its events; events of one aggregate get consecutive
/// versions in slice order. Returns `(event_id, version)` per event.
fn append_many(notify: bool) -> String {
    format!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
                                  $5::text[], $6::text[], $8::integer[]) WITH ORDINALITY \
                 AS t(event_id, aggregate_type, aggregate_id, event_type, headers, payload, \
                      schema_version, ord)), \
         counts AS ( \
             SELECT aggregate_type, aggregate_id, count(*) AS n FROM input \
             GROUP BY aggregate_type, aggregate_id), \
         head AS ( \
             INSERT INTO converge.outbox_heads AS h \
                 (aggregate_type, aggregate_id, version, tx_order, partition) \
             SELECT aggregate_type, aggregate_id, n, converge.tx_order(), \
                    converge.partition_of(aggregate_type, aggregate_id) FROM counts \
             ORDER BY aggregate_type, aggregate_id \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET version = h.version + excluded.version, \
                     tx_order = greatest(excluded.tx_order, h.tx_order) \
             RETURNING h.aggregate_type, h.aggregate_id, h.version, h.tx_order, \
                 coalesce(h.partition, converge.partition_of(h.aggregate_type, h.aggregate_id)) \
                     AS partition), \
         numbered AS ( \
             SELECT i.*, row_number() OVER ( \
                 PARTITION BY aggregate_type, aggregate_id ORDER BY ord) AS k \
             FROM input i) \
         INSERT INTO converge.outbox \
             (partition, tx_order, event_id, aggregate_type, aggregate_id, version, event_type, \
              occurred_at, headers, payload, traceparent, schema_version) \
         SELECT h.partition, h.tx_order, n.event_id, n.aggregate_type, n.aggregate_id, \
                h.version - c.n + n.k, n.event_type, now(), n.headers::jsonb, n.payload::json, \
                $7::text, n.schema_version \
         FROM numbered n \
         JOIN head h USING (aggregate_type, aggregate_id) \
         JOIN counts c USING (aggregate_type, aggregate_id) \
         ORDER BY n.ord \
         RETURNING event_id, version, occurred_at{notify}",
        notify = if notify { NOTIFY } else { "" },
    )
}

static APPEND_MANY: LazyLock<[String; 2]> =
    LazyLock::new(|| [append_many(false), append_many(true)]);

/// The batch statement.
pub(crate) fn append_many_sql(notify: bool) -> &'static str {
    &APPEND_MANY[usize::from(notify)]
}

/// The aggregate's current version (0 when it never had an event).
pub(crate) const HEAD_VERSION: &str = "SELECT coalesce((SELECT version FROM converge.outbox_heads \
     WHERE aggregate_type = $1 AND aggregate_id = $2), 0)::bigint";
