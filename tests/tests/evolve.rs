//! Payload evolution against real PostgreSQL and NATS: events stored at
//! schema versions 1, 2 and 3 read as version 3 by every reader — histories,
//! aggregate loading, the consumer's typed decode — and a version this build
//! does not know is a typed error everywhere, a dead letter (once, never a
//! loop) on the consumer path.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::eventsourcing::{Aggregate, Repository, RepositoryError};
use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::{Event, Outbox, Relay, UpcastError, Upcasters};
use converge_tests::TestEnv;
use serde_json::json;

/// A wallet credited: version 3 of the payload (cents and a currency).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Credited {
    #[serde(skip)]
    wallet: String,
    cents: i64,
    currency: String,
}

impl Event for Credited {
    const AGGREGATE_TYPE: &'static str = "wallet";
    const EVENT_TYPE: &'static str = "Credited";
    const SCHEMA_VERSION: u32 = 3;
    fn aggregate_id(&self) -> String {
        self.wallet.clone()
    }
}

/// Version 2, as an older build appended it: cents, no currency.
#[derive(serde::Serialize)]
struct CreditedV2 {
    #[serde(skip)]
    wallet: String,
    cents: i64,
}

impl Event for CreditedV2 {
    const AGGREGATE_TYPE: &'static str = "wallet";
    const EVENT_TYPE: &'static str = "Credited";
    const SCHEMA_VERSION: u32 = 2;
    fn aggregate_id(&self) -> String {
        self.wallet.clone()
    }
}

/// v1 → v2: whole euros became cents; v2 → v3: a currency, EUR until then.
fn upcasters() -> Upcasters {
    Upcasters::new()
        .add::<Credited>(1, |mut v| {
            let euros = v["amount"].as_i64().ok_or("amount is not a number")?;
            let object = v.as_object_mut().ok_or("not an object")?;
            object.remove("amount");
            object.insert("cents".into(), json!(euros * 100));
            Ok(v)
        })
        .add::<Credited>(2, |mut v| {
            v["currency"] = json!("EUR");
            Ok(v)
        })
}

/// The wallet, event-sourced: its balance in cents.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Wallet {
    cents: i64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum WalletEvent {
    Credited { cents: i64, currency: String },
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Wallet {
    const TYPE: &'static str = "wallet";
    type Event = WalletEvent;
    type Command = i64;
    type Error = Never;
    fn apply(&mut self, WalletEvent::Credited { cents, currency }: &WalletEvent) {
        assert_eq!(currency, "EUR", "every event is read in its current shape");
        self.cents += cents;
    }
    fn decide(&self, cents: &i64) -> Result<Vec<WalletEvent>, Never> {
        Ok(vec![WalletEvent::Credited {
            cents: *cents,
            currency: "EUR".into(),
        }])
    }
    fn schema_version(_: &str) -> u32 {
        3
    }
}

/// Stores one event of `wallet` at each version: v1 from SQL, v2 by an
/// older build's `Outbox::append`, v3 by the repository.
async fn store_three_versions(env: &TestEnv, wallet: &str) {
    sqlx::query(
        "SELECT converge.append('wallet', $1, 'Credited', '{\"amount\": 5}', schema_version => 1)",
    )
    .bind(wallet)
    .execute(&env.pool)
    .await
    .unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(
            &mut tx,
            &CreditedV2 {
                wallet: wallet.into(),
                cents: 700,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let repo = Repository::<Wallet>::builder(env.pool.clone())
        .upcasters(upcasters())
        .start()
        .await
        .unwrap();
    repo.execute(wallet, &900).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn events_stored_at_three_versions_are_read_at_the_current_one() {
    let env = TestEnv::new().await;
    store_three_versions(&env, "w1").await;

    // History: stored as they were written, upcast on reading.
    let history = Outbox::history(&env.pool, "wallet", "w1", 0, 10)
        .await
        .unwrap();
    let stored: Vec<u32> = history.iter().map(|e| e.schema_version).collect();
    assert_eq!(stored, [1, 2, 3]);
    assert_eq!(history[0].payload, json!({"amount": 5}));
    let upcasters = upcasters();
    let decoded: Vec<Credited> = history
        .iter()
        .map(|e| e.decode_event::<Credited>(&upcasters).unwrap())
        .collect();
    let cents: Vec<(i64, &str)> = decoded
        .iter()
        .map(|c| (c.cents, c.currency.as_str()))
        .collect();
    assert_eq!(cents, [(500, "EUR"), (700, "EUR"), (900, "EUR")]);
    let upcast: Vec<_> = history
        .into_iter()
        .map(|e| e.upcast(&upcasters).unwrap())
        .collect();
    assert!(upcast.iter().all(|e| e.schema_version == 3));
    assert_eq!(upcast[0].payload, json!({"cents": 500, "currency": "EUR"}));

    // Aggregate loading.
    let wallets = Repository::<Wallet>::builder(env.pool.clone())
        .upcasters(upcasters.clone())
        .start()
        .await
        .unwrap();
    let w = wallets.load(&env.pool, "w1").await.unwrap();
    assert_eq!((w.state.cents, w.version), (2100, 3));
    let typed = wallets.history(&env.pool, "w1", 0, 10).await.unwrap();
    assert_eq!(typed.len(), 3);

    // Without the upcasters the repository does not start: the gap is
    // named before any load meets an old event.
    let err = Repository::<Wallet>::builder(env.pool.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(&err, RepositoryError::Config(_)), "{err}");
    assert!(
        err.to_string()
            .contains("wallet.Credited at schema version 1 cannot be read as version 3")
            && err.to_string().contains("Upcasters::add"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_newer_than_this_build_is_a_typed_error() {
    let env = TestEnv::new().await;
    store_three_versions(&env, "w1").await;
    sqlx::query(
        "SELECT converge.append('wallet', 'w1', 'Credited', \
         '{\"cents\": 1, \"currency\": \"EUR\", \"memo\": \"v4\"}', schema_version => 4)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let upcasters = upcasters();
    let history = Outbox::history(&env.pool, "wallet", "w1", 0, 10)
        .await
        .unwrap();
    let err = history[3].decode_event::<Credited>(&upcasters).unwrap_err();
    assert!(
        matches!(
            err,
            UpcastError::TooNew {
                version: 4,
                newest: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this build"), "{err}");
    let wallets = Repository::<Wallet>::builder(env.pool.clone())
        .upcasters(upcasters)
        .start()
        .await
        .unwrap();
    let err = wallets.load(&env.pool, "w1").await.unwrap_err();
    assert!(err.to_string().contains("schema version 4"), "{err}");
    assert!(!err.is_retryable());
    // A bad version from SQL is refused before anything is written.
    let refused = sqlx::query(
        "SELECT converge.append('wallet', 'w1', 'Credited', '{}', schema_version => 0)",
    )
    .execute(&env.pool)
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("schema_version"), "{refused}");
}

/// Records what the consumer's typed decode gives, per call.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Result<(u32, Credited), String>>>,
}

impl Reconciler for Recorder {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        let published = ctx.trigger().event().map_or(0, |h| h.schema_version);
        let decoded = ctx.event::<Credited>();
        self.calls.lock().unwrap().push(match &decoded {
            Ok(Some(c)) => Ok((published, c.clone())),
            Ok(None) => Err("no event".into()),
            Err(e) => Err(e.to_string()),
        });
        decoded?;
        Ok(Outcome::Unchanged)
    }
}

/// The consumer's reconciler reads events of versions 1, 2 and 3 as version
/// 3; a version-4 event fails it once, permanently: one dead letter, no
/// redelivery. (Were the failure retryable, it would run five times.)
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_decodes_old_versions_and_dead_letters_a_newer_one_once() {
    let env = TestEnv::new().await;
    store_three_versions(&env, "w1").await;
    sqlx::query(
        "SELECT converge.append('wallet', 'w2', 'Credited', '{\"cents\": 1}', schema_version => 4)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut config = ConsumerConfig::new(
        "wallets",
        env.stream.clone(),
        format!("{}.wallet.Credited", env.prefix),
    );
    config.upcasters = upcasters();
    config.retry.initial_backoff = Duration::from_millis(50);
    let consumer = Consumer::new(env.pool.clone(), env.nats.clone(), recorder.clone(), config)
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM converge.dead_letters WHERE aggregate_key = 'w2'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if letters == 1 && recorder.calls.lock().unwrap().len() >= 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all events ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for redeliveries that must not happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
    let calls = recorder.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4, "{calls:?}");
    // One key's deliveries run one at a time, in whatever order they win
    // its lease.
    let mut read: Vec<(u32, i64, String)> = calls
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .map(|(v, c)| (*v, c.cents, c.currency.clone()))
        .collect();
    read.sort();
    assert_eq!(
        read,
        [
            (1, 500, "EUR".to_owned()),
            (2, 700, "EUR".to_owned()),
            (3, 900, "EUR".to_owned())
        ]
    );
    let failed: Vec<&String> = calls.iter().filter_map(|c| c.as_ref().err()).collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("newer than this build"), "{failed:?}");
    let (error, permanent, attempts): (String, bool, i32) = sqlx::query_as(
        "SELECT error, permanent, attempts FROM converge.dead_letters WHERE aggregate_key = 'w2'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(permanent && attempts == 1, "{error} {permanent} {attempts}");
    assert!(error.contains("schema version 4"), "{error}");
}

/// While a relay of an earlier converge (no protocol in its row) is known,
/// however old its last heartbeat, a repository with an event type above
/// version 1 does not start: that relay would publish the events without
/// their version.
#[tokio::test(flavor = "multi_thread")]
async fn an_evolved_aggregate_waits_for_every_relay_to_be_upgraded() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO converge.relay_instances (instance_id, name, heartbeat_at) \
         VALUES (gen_random_uuid(), 'old-relay', now() - interval '10 minutes')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let start = || {
        Repository::<Wallet>::builder(env.pool.clone())
            .upcasters(upcasters())
            .start()
    };
    let err = start().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("relays of an earlier converge still run or ran lately")
            && err.to_string().contains("old-relay (last heartbeat"),
        "{err}"
    );
    sqlx::query("UPDATE converge.relay_instances SET protocol = 2")
        .execute(&env.pool)
        .await
        .unwrap();
    start().await.expect("every relay runs this converge");
}
