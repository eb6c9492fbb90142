//! Many databases: one application whose data is split over three PostgreSQL
//! databases (one per tenant), each with its own outbox, relay and consumer,
//! all publishing into one JetStream stream.
//!
//! Each database's relay publishes under `<root>.<tenant>`; the stream
//! captures `<root>.>`. The same account ids exist in every database, so a
//! collision (event ids, subjects, the duplicate window) or a reconcile in
//! the wrong database would show. Each tenant's consumer filters its own
//! subjects and reconciles with its own database's pool, where its key
//! leases, attempts and dead letters live.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::{Outbox, Relay, RelayHandle, StreamConfig};
use converge_tests::{read_stream, AccountChanged, StreamMessage, TestEnv};
use futures::StreamExt;
use sqlx::PgPool;

const TENANTS: [&str; 3] = ["tenant_a", "tenant_b", "tenant_c"];
const ACCOUNTS: usize = 12;
const ROUNDS: i64 = 5;

/// Calls of the reconcilers: (consumer's tenant, tenant named by the event's
/// subject, key) → calls.
type Calls = Arc<Mutex<BTreeMap<(String, String, String), u32>>>;

/// One tenant: its own database, relay and subject prefix.
struct Tenant {
    name: &'static str,
    env: TestEnv,
    prefix: String,
}

/// Three fresh databases; the first one's stream name is everyone's stream,
/// its prefix the root of every tenant's prefix (the others' own stream
/// names are unused; dropping the first deletes the shared stream).
async fn tenants() -> (Vec<Tenant>, String, String) {
    let mut out = Vec::new();
    for name in TENANTS {
        let env = TestEnv::new().await;
        sqlx::raw_sql(
            "CREATE SCHEMA app;
             CREATE TABLE app.accounts (id text PRIMARY KEY, version bigint NOT NULL,
                                        applied bigint NOT NULL DEFAULT 0);
             -- No unique constraint: a doubled or misrouted apply stays visible.
             CREATE TABLE app.effects (account text NOT NULL, tenant text NOT NULL,
                                       from_version bigint NOT NULL, to_version bigint NOT NULL);",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        out.push(Tenant {
            name,
            env,
            prefix: String::new(),
        });
    }
    let stream = out[0].env.stream.clone();
    let root = out[0].env.prefix.clone();
    for t in &mut out {
        t.prefix = format!("{root}.{}", t.name);
    }
    (out, stream, root)
}

/// The tenant's relay configuration: its own prefix on the shared stream,
/// which captures every tenant's.
fn relay_config(t: &Tenant, stream: &str, root: &str) -> converge::RelayConfig {
    let mut c = t.env.relay_config();
    c.stream = StreamConfig::new(stream, &t.prefix).with_stream_subjects([format!("{root}.>")]);
    c
}

/// Starts every tenant's relay at once (whichever creates the stream first).
async fn start_relays(tenants: &[Tenant], stream: &str, root: &str) -> Vec<RelayHandle> {
    let starts = tenants.iter().map(|t| {
        Relay::new(
            t.env.pool.clone(),
            t.env.nats.clone(),
            relay_config(t, stream, root),
        )
        .start()
    });
    futures::future::join_all(starts)
        .await
        .into_iter()
        .zip(TENANTS)
        .map(|(r, name)| r.unwrap_or_else(|e| panic!("relay of {name}: {e}")))
        .collect()
}

/// Changes account `id` and appends its event in one transaction; returns
/// the aggregate's version.
async fn change(pool: &PgPool, id: &str) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO app.accounts (id, version) VALUES ($1, 1)
         ON CONFLICT (id) DO UPDATE SET version = app.accounts.version + 1 RETURNING version",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let appended = Outbox::default()
        .append(&mut tx, &AccountChanged::new(id))
        .await
        .unwrap();
    assert_eq!(
        appended.version, version,
        "the outbox's version is the row's"
    );
    tx.commit().await.unwrap();
    version
}

/// Applies an account's pending versions in the database of its consumer's
/// pool, recording which tenant the triggering event's subject names.
struct Ledger {
    tenant: &'static str,
    root: String,
    calls: Calls,
}

impl Ledger {
    /// The tenant an event's subject names: `<root>.<tenant>.<type>.<event>`.
    fn subject_tenant(&self, ctx: &Context) -> String {
        ctx.trigger()
            .event()
            .and_then(|e| e.subject.strip_prefix(&format!("{}.", self.root)))
            .and_then(|rest| rest.split('.').next())
            .unwrap_or("")
            .to_owned()
    }
}

impl Reconciler for Ledger {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let from = self.subject_tenant(ctx);
        *self
            .calls
            .lock()
            .unwrap()
            .entry((self.tenant.to_owned(), from.clone(), key.to_owned()))
            .or_default() += 1;
        let mut tx = ctx.pool().begin().await?;
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT version, applied FROM app.accounts WHERE id = $1 FOR UPDATE")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((version, applied)) = row.filter(|(v, a)| a < v) else {
            return Ok(Outcome::Unchanged);
        };
        sqlx::query("INSERT INTO app.effects VALUES ($1, $2, $3, $4)")
            .bind(key)
            .bind(&from)
            .bind(applied + 1)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE app.accounts SET applied = $2 WHERE id = $1")
            .bind(key)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

/// The tenant a stream message's subject names.
fn tenant_of<'m>(m: &'m StreamMessage, root: &str) -> &'m str {
    m.subject
        .strip_prefix(root)
        .and_then(|s| s.strip_prefix('.'))
        .and_then(|s| s.split('.').next())
        .unwrap_or("")
}

#[tokio::test]
async fn relays_of_several_databases_create_one_stream_whichever_starts_first() {
    let (tenants, stream, root) = tenants().await;
    for _ in 0..3 {
        let relays = start_relays(&tenants, &stream, &root).await;
        for r in relays {
            r.shutdown().await.unwrap();
        }
    }
    let info = tenants[0]
        .env
        .js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.subjects, vec![format!("{root}.>")]);
}

#[tokio::test]
async fn three_databases_share_one_stream_and_each_reconciles_only_its_own_events() {
    let (tenants, stream, root) = tenants().await;
    let relays = start_relays(&tenants, &stream, &root).await;
    let calls = Calls::default();
    let mut consumers = Vec::new();
    for t in &tenants {
        let mut config = ConsumerConfig::new(
            // Durable consumers live in the shared stream: one name per tenant.
            format!("ledger_{}", t.name),
            &stream,
            format!("{}.account.>", t.prefix),
        );
        config.concurrency = 4;
        config.ack_wait = Duration::from_secs(5);
        let ledger = Ledger {
            tenant: t.name,
            root: root.clone(),
            calls: calls.clone(),
        };
        consumers.push(
            Consumer::new(t.env.pool.clone(), t.env.nats.clone(), ledger, config)
                .start()
                .await
                .unwrap(),
        );
    }

    // The same accounts in every database, changed concurrently everywhere.
    let writers = tenants.iter().map(|t| {
        let pool = t.env.pool.clone();
        async move {
            for round in 1..=ROUNDS {
                let changes = (1..=ACCOUNTS).map(|a| {
                    let pool = pool.clone();
                    async move { change(&pool, &a.to_string()).await }
                });
                let versions = futures::future::join_all(changes).await;
                assert!(versions.iter().all(|v| *v == round));
            }
        }
    });
    futures::future::join_all(writers).await;

    let total = TENANTS.len() * ACCOUNTS * ROUNDS as usize;
    let js = &tenants[0].env.js;
    let messages = read_stream(js, &stream, total, Duration::from_secs(30)).await;

    // Every event on the stream exactly once, by id and by (tenant, account, version).
    let ids: BTreeSet<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        messages.len(),
        "an event id is on the stream twice"
    );
    assert_eq!(messages.len(), total, "events missing from the stream");
    let mut last: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for m in &messages {
        let tenant = tenant_of(m, &root);
        assert!(
            TENANTS.contains(&tenant),
            "subject {} names no tenant",
            m.subject
        );
        let prev = last
            .insert((tenant, &m.aggregate_id), m.version)
            .unwrap_or(0);
        assert_eq!(
            m.version,
            prev + 1,
            "{tenant}/{} out of order at stream sequence {}",
            m.aggregate_id,
            m.sequence
        );
    }
    assert_eq!(last.len(), TENANTS.len() * ACCOUNTS);
    assert!(last.values().all(|v| *v == ROUNDS));
    // The stream's own tally agrees: nothing dropped as a duplicate.
    for t in &tenants {
        let published: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
            .fetch_one(&t.env.pool)
            .await
            .unwrap();
        let on_stream = messages
            .iter()
            .filter(|m| tenant_of(m, &root) == t.name)
            .count();
        assert_eq!(published as usize, on_stream, "{}", t.name);
    }

    // Every database converges on its own events, each version applied once,
    // by its own tenant's events.
    for t in &tenants {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM app.accounts WHERE applied < version")
                    .fetch_one(&t.env.pool)
                    .await
                    .unwrap();
            if pending == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {pending} accounts not applied",
                t.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Let redeliveries or misrouted events that are still coming arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in &tenants {
        let effects: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT account, tenant, from_version, to_version FROM app.effects
             ORDER BY account, from_version",
        )
        .fetch_all(&t.env.pool)
        .await
        .unwrap();
        let mut applied: BTreeMap<&str, i64> = BTreeMap::new();
        for (account, tenant, from, to) in &effects {
            assert_eq!(
                tenant, t.name,
                "{}: applied by another tenant's event",
                t.name
            );
            let prev = applied.insert(account, *to).unwrap_or(0);
            assert_eq!(
                *from,
                prev + 1,
                "{}/{account}: a version applied twice or skipped",
                t.name
            );
        }
        assert_eq!(applied.len(), ACCOUNTS, "{}", t.name);
        assert!(applied.values().all(|v| *v == ROUNDS), "{}", t.name);
    }
    let calls = calls.lock().unwrap().clone();
    let misrouted: Vec<_> = calls.keys().filter(|(own, from, _)| own != from).collect();
    assert!(
        misrouted.is_empty(),
        "events reconciled by another tenant's consumer: {misrouted:?}"
    );
    for t in &tenants {
        let keys = calls.keys().filter(|(own, _, _)| own == t.name).count();
        assert_eq!(keys, ACCOUNTS, "{}: keys reconciled", t.name);
    }

    // Partitions: each relay holds all 32 of its own database, none shared.
    for (t, r) in tenants.iter().zip(&relays) {
        assert_eq!(r.partitions().len(), 32, "{}", t.name);
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM converge.relay_partitions WHERE owner_id = $1",
        )
        .bind(r.instance_id())
        .fetch_one(&t.env.pool)
        .await
        .unwrap();
        assert_eq!(held, 32, "{}: partitions held by its own relay", t.name);
    }
    // In NATS the databases share the stream and nothing else: the relays
    // make no consumers, and the durables are the tenants' own, each
    // filtered by its tenant's prefix.
    let s = js.get_stream(&stream).await.unwrap();
    let durables: BTreeMap<String, String> = s
        .consumers()
        .filter_map(|c| async move { c.ok() })
        .filter_map(|c| async move {
            let filter = c.config.filter_subject.clone();
            c.config.durable_name.map(|name| (name, filter))
        })
        .collect()
        .await;
    let expected: BTreeMap<String, String> = tenants
        .iter()
        .map(|t| {
            (
                format!("ledger_{}", t.name),
                format!("{}.account.>", t.prefix),
            )
        })
        .collect();
    assert_eq!(durables, expected);

    for c in consumers {
        c.shutdown().await.unwrap();
    }
    for r in relays {
        r.shutdown().await.unwrap();
    }
}

/// Event ids are made by the appending process (UUIDv7: a millisecond clock,
/// a counter reseeded at random each millisecond and random bits) or by
/// PostgreSQL (`gen_random_uuid()`), so databases never pick the same one.
/// An id the caller chooses (`AppendOptions::event_id`) is unique only
/// within its own outbox: reused in another database sharing the stream, the
/// duplicate window drops the second event, and its relay counts it published.
#[tokio::test]
async fn a_caller_chosen_event_id_reused_in_another_database_is_dropped_as_a_duplicate() {
    let (tenants, stream, root) = tenants().await;
    let relays = start_relays(&tenants[..2], &stream, &root).await;
    let id = uuid::Uuid::now_v7();
    for t in &tenants[..2] {
        let mut tx = t.env.pool.begin().await.unwrap();
        let mut options = converge::AppendOptions::default();
        options.event_id = Some(id);
        Outbox::default()
            .append_with(&mut tx, &AccountChanged::new("1"), &options)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // One after the other, so the second is the one dropped.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sqlx::query_scalar::<_, i64>(
            "SELECT sum(published)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(&t.env.pool)
        .await
        .unwrap()
            < 1
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never published",
                t.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let js = &tenants[0].env.js;
    let messages = read_stream(js, &stream, 2, Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(tenant_of(&messages[0], &root), tenants[0].name);
    for r in relays {
        r.shutdown().await.unwrap();
    }
}
