//! The state machine helper against a real PostgreSQL: compare-and-set
//! transitions, invalid transitions, concurrent claims, expired claims taken
//! over after the lease, keyset-paginated sweeps, key and state types.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{Claim, StateError, StateMachine, Transition};
use converge_tests::TestEnv;
use sqlx::PgPool;

const LEASE: Duration = Duration::from_secs(60);

/// The application's table, as the issue describes it.
async fn create_orders(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL, \
         claimed_by text, claimed_at timestamptz)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("CREATE INDEX ON orders (state, id)")
        .execute(pool)
        .await
        .unwrap();
}

fn orders() -> StateMachine {
    StateMachine::new("orders", "id", "state")
        .key_type("bigint")
        .transition("SHIPPED", "INVOICING")
        .transition("SHIPPED", "CANCELLED")
        .transition("INVOICING", "INVOICED")
        .transition("INVOICING", "FAILED")
        .intermediate("INVOICING", LEASE)
}

async fn insert(pool: &PgPool, ids: impl IntoIterator<Item = i64>, state: &str) {
    for id in ids {
        sqlx::query("INSERT INTO orders (id, state) VALUES ($1, $2)")
            .bind(id)
            .bind(state)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// (state, claimed_by, claimed_at is set)
async fn row(pool: &PgPool, id: i64) -> (String, Option<String>, bool) {
    sqlx::query_as("SELECT state, claimed_by, claimed_at IS NOT NULL FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Moves the claim of `id` `by` into the past (database clock).
async fn backdate(pool: &PgPool, id: i64, by: Duration) {
    sqlx::query(
        "UPDATE orders SET claimed_at = claimed_at - make_interval(secs => $2) WHERE id = $1",
    )
    .bind(id)
    .bind(by.as_secs_f64())
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn compare_and_set_applies_once_then_conflicts() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    insert(&env.pool, [1, 2], "SHIPPED").await;
    let sm = orders();

    // Applied: SHIPPED -> CANCELLED (not intermediate: no claim recorded).
    let mut tx = env.pool.begin().await.unwrap();
    let t = sm
        .transition_to(&mut tx, "1", "SHIPPED", "CANCELLED", "w1")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    tx.commit().await.unwrap();
    assert_eq!(row(&env.pool, 1).await, ("CANCELLED".into(), None, false));
    assert_eq!(
        sm.current(&env.pool, "1").await.unwrap().as_deref(),
        Some("CANCELLED")
    );

    // The same CAS again: the row is no longer SHIPPED.
    let mut conn = env.pool.acquire().await.unwrap();
    let t = sm
        .transition_to(&mut conn, "1", "SHIPPED", "CANCELLED", "w2")
        .await
        .unwrap();
    assert_eq!(
        t,
        Transition::Conflict {
            current: Some("CANCELLED".into()),
            claimed_by: None
        }
    );

    // A missing key is a conflict with no current state.
    let t = sm
        .transition_to(&mut conn, "999", "SHIPPED", "CANCELLED", "w2")
        .await
        .unwrap();
    assert_eq!(
        t,
        Transition::Conflict {
            current: None,
            claimed_by: None
        }
    );
    assert_eq!(sm.current(&env.pool, "999").await.unwrap(), None);
    drop(conn);

    // In the caller's transaction: a rollback undoes the transition.
    let mut tx = env.pool.begin().await.unwrap();
    let t = sm
        .transition_to(&mut tx, "2", "SHIPPED", "INVOICING", "w1")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    assert_eq!(
        sm.current(&mut *tx, "2").await.unwrap().as_deref(),
        Some("INVOICING")
    );
    tx.rollback().await.unwrap();
    assert_eq!(row(&env.pool, 2).await, ("SHIPPED".into(), None, false));

    // Into an intermediate state: the claim is recorded; out of it: cleared.
    let mut tx = env.pool.begin().await.unwrap();
    let t = sm
        .transition_to(&mut tx, "2", "SHIPPED", "INVOICING", "w1")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    tx.commit().await.unwrap();
    assert_eq!(
        row(&env.pool, 2).await,
        ("INVOICING".into(), Some("w1".into()), true)
    );
    let mut conn = env.pool.acquire().await.unwrap();
    let t = sm
        .transition_to(&mut conn, "2", "INVOICING", "INVOICED", "w1")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    assert_eq!(row(&env.pool, 2).await, ("INVOICED".into(), None, false));
}

#[tokio::test]
async fn invalid_transitions_are_rejected_before_any_write() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    insert(&env.pool, [1], "SHIPPED").await;
    let sm = orders();
    let mut tx = env.pool.begin().await.unwrap();

    let e = sm
        .transition_to(&mut tx, "1", "SHIPPED", "INVOICED", "w1")
        .await
        .unwrap_err();
    match &e {
        StateError::InvalidTransition { from, to, allowed } => {
            assert_eq!((from.as_str(), to.as_str()), ("SHIPPED", "INVOICED"));
            assert_eq!(allowed, &["CANCELLED", "INVOICING"]);
        }
        other => panic!("expected InvalidTransition, got {other:?}"),
    }
    let message = e.to_string();
    assert!(
        message.contains("SHIPPED -> INVOICED")
            && message.contains("allowed from SHIPPED: CANCELLED, INVOICING"),
        "{message}"
    );
    assert!(!e.is_retryable());

    let e = sm
        .transition_to(&mut tx, "1", "INVOICED", "SHIPPED", "w1")
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no transition is declared from INVOICED"),
        "{e}"
    );

    // Claiming needs a declared transition into an intermediate state.
    let e = sm
        .claim(&mut tx, "1", "SHIPPED", "CANCELLED", "w1")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StateError::NotIntermediate { state } if state == "CANCELLED"),
        "{e:?}"
    );
    let e = sm
        .claim(&mut tx, "1", "INVOICED", "INVOICING", "w1")
        .await
        .unwrap_err();
    assert!(matches!(&e, StateError::InvalidTransition { .. }), "{e:?}");
    let e = sm
        .expired_claims(&mut *tx, "SHIPPED", None, 10)
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::NotIntermediate { .. }), "{e:?}");
    let e = sm.keys_in(&mut *tx, "SHIPED", None, 10).await.unwrap_err();
    assert!(
        matches!(&e, StateError::UnknownState { state } if state == "SHIPED"),
        "{e:?}"
    );
    tx.commit().await.unwrap();

    assert_eq!(
        row(&env.pool, 1).await,
        ("SHIPPED".into(), None, false),
        "a rejected transition writes nothing"
    );

    // A key the key type cannot hold is a database error, not retryable.
    let mut conn = env.pool.acquire().await.unwrap();
    let e = sm
        .transition_to(&mut conn, "not-a-number", "SHIPPED", "CANCELLED", "w1")
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Database(_)), "{e:?}");
    assert!(!e.is_retryable());
}

/// Eight transactions race for the same row; each holds its transaction open a
/// moment after its attempt, so the others queue on the row lock.
async fn race<T, F, Fut>(pool: &PgPool, attempt: F) -> Vec<(String, T)>
where
    T: Send + 'static,
    F: Fn(sqlx::Transaction<'static, sqlx::Postgres>, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (sqlx::Transaction<'static, sqlx::Postgres>, T)> + Send,
{
    let attempt = Arc::new(attempt);
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = pool.clone();
        let attempt = attempt.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let tx = pool.begin().await.unwrap();
            barrier.wait().await;
            let claimant = format!("worker-{i}");
            let (tx, outcome) = attempt(tx, claimant.clone()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.commit().await.unwrap();
            (claimant, outcome)
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_and_claims_apply_exactly_once() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    insert(&env.pool, [1, 2], "SHIPPED").await;
    let sm = Arc::new(orders());

    // transition_to: one Applied, seven Conflicts naming the winner.
    let m = sm.clone();
    let outcomes = race(&env.pool, move |mut tx, claimant| {
        let m = m.clone();
        async move {
            let t = m
                .transition_to(&mut tx, "1", "SHIPPED", "INVOICING", &claimant)
                .await
                .unwrap();
            (tx, t)
        }
    })
    .await;
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|(_, t)| *t == Transition::Applied)
        .map(|(c, _)| c)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0].clone();
    for (_, t) in outcomes.iter().filter(|(_, t)| *t != Transition::Applied) {
        assert_eq!(
            t,
            &Transition::Conflict {
                current: Some("INVOICING".into()),
                claimed_by: Some(winner.clone())
            }
        );
    }
    assert_eq!(
        row(&env.pool, 1).await,
        ("INVOICING".into(), Some(winner), true)
    );

    // claim: one Claimed, seven NotClaimable (the claim is fresh).
    let m = sm.clone();
    let outcomes = race(&env.pool, move |mut tx, claimant| {
        let m = m.clone();
        async move {
            let c = m
                .claim(&mut tx, "2", "SHIPPED", "INVOICING", &claimant)
                .await
                .unwrap();
            (tx, c)
        }
    })
    .await;
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|(_, c)| *c == Claim::Claimed)
        .map(|(w, _)| w)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0].clone();
    for (_, c) in outcomes.iter().filter(|(_, c)| *c != Claim::Claimed) {
        assert_eq!(
            c,
            &Claim::NotClaimable {
                current: Some("INVOICING".into()),
                claimed_by: Some(winner.clone())
            }
        );
    }
    assert_eq!(
        row(&env.pool, 2).await,
        ("INVOICING".into(), Some(winner.clone()), true)
    );

    // Eight racing takeovers of an expired claim: exactly one resumes it.
    backdate(&env.pool, 2, LEASE * 2).await;
    let m = sm.clone();
    let outcomes = race(&env.pool, move |mut tx, claimant| {
        let m = m.clone();
        async move {
            let c = m
                .claim(&mut tx, "2", "SHIPPED", "INVOICING", &claimant)
                .await
                .unwrap();
            (tx, c)
        }
    })
    .await;
    let resumed: Vec<_> = outcomes
        .iter()
        .filter(|(_, c)| matches!(c, Claim::Resumed { .. }))
        .collect();
    assert_eq!(resumed.len(), 1, "{outcomes:?}");
    assert_eq!(
        resumed[0].1,
        Claim::Resumed {
            previous: Some(winner)
        }
    );
    let new_owner = resumed[0].0.clone();
    assert_eq!(
        row(&env.pool, 2).await,
        ("INVOICING".into(), Some(new_owner), true)
    );
}

#[tokio::test]
async fn an_expired_claim_is_resumed_by_another_claimant() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    insert(&env.pool, [1, 2], "SHIPPED").await;
    let sm = orders();
    let mut conn = env.pool.acquire().await.unwrap();

    let c = sm
        .claim(&mut conn, "1", "SHIPPED", "INVOICING", "a")
        .await
        .unwrap();
    assert_eq!(c, Claim::Claimed);
    // Fresh: not claimable by b, not listed as expired.
    let c = sm
        .claim(&mut conn, "1", "SHIPPED", "INVOICING", "b")
        .await
        .unwrap();
    assert_eq!(
        c,
        Claim::NotClaimable {
            current: Some("INVOICING".into()),
            claimed_by: Some("a".into())
        }
    );
    assert!(sm
        .expired_claims(&env.pool, "INVOICING", None, 10)
        .await
        .unwrap()
        .is_empty());

    // a died half-way: after the lease, the sweep finds it and b takes over.
    backdate(&env.pool, 1, LEASE + Duration::from_secs(1)).await;
    assert_eq!(
        sm.expired_claims(&env.pool, "INVOICING", None, 10)
            .await
            .unwrap(),
        ["1"]
    );
    let c = sm
        .claim(&mut conn, "1", "SHIPPED", "INVOICING", "b")
        .await
        .unwrap();
    assert_eq!(
        c,
        Claim::Resumed {
            previous: Some("a".into())
        }
    );
    assert!(sm
        .expired_claims(&env.pool, "INVOICING", None, 10)
        .await
        .unwrap()
        .is_empty());

    // a wakes up: it no longer holds the claim, so it cannot finish the step.
    let t = sm
        .transition_to(&mut conn, "1", "INVOICING", "INVOICED", "a")
        .await
        .unwrap();
    assert_eq!(
        t,
        Transition::Conflict {
            current: Some("INVOICING".into()),
            claimed_by: Some("b".into())
        }
    );
    let t = sm
        .transition_to(&mut conn, "1", "INVOICING", "INVOICED", "b")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    assert_eq!(row(&env.pool, 1).await, ("INVOICED".into(), None, false));
    let c = sm
        .claim(&mut conn, "1", "SHIPPED", "INVOICING", "c")
        .await
        .unwrap();
    assert_eq!(
        c,
        Claim::NotClaimable {
            current: Some("INVOICED".into()),
            claimed_by: None
        }
    );

    // The same with the real clock and a 1 s lease.
    let quick = orders().intermediate("INVOICING", Duration::from_secs(1));
    let c = quick
        .claim(&mut conn, "2", "SHIPPED", "INVOICING", "a")
        .await
        .unwrap();
    assert_eq!(c, Claim::Claimed);
    let c = quick
        .claim(&mut conn, "2", "SHIPPED", "INVOICING", "b")
        .await
        .unwrap();
    assert!(matches!(c, Claim::NotClaimable { .. }), "{c:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        quick
            .expired_claims(&env.pool, "INVOICING", None, 10)
            .await
            .unwrap(),
        ["2"]
    );
    let c = quick
        .claim(&mut conn, "2", "SHIPPED", "INVOICING", "b")
        .await
        .unwrap();
    assert_eq!(
        c,
        Claim::Resumed {
            previous: Some("a".into())
        }
    );
    assert_eq!(
        row(&env.pool, 2).await,
        ("INVOICING".into(), Some("b".into()), true)
    );

    // An intermediate row without a claim (written by raw SQL) counts as expired.
    insert(&env.pool, [3], "INVOICING").await;
    assert_eq!(
        sm.expired_claims(&env.pool, "INVOICING", None, 10)
            .await
            .unwrap(),
        ["3"]
    );
    let c = sm
        .claim(&mut conn, "3", "SHIPPED", "INVOICING", "d")
        .await
        .unwrap();
    assert_eq!(c, Claim::Resumed { previous: None });
}

/// Reads every page of `page` (keyset: the last key of a page is the next `after`).
async fn all_pages<F, Fut>(page: F) -> Vec<Vec<String>>
where
    F: Fn(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let keys = page(after.clone()).await;
        if keys.is_empty() {
            return pages;
        }
        after = keys.last().cloned();
        pages.push(keys);
        assert!(pages.len() < 100, "pagination does not end");
    }
}

#[tokio::test]
async fn sweeps_paginate_by_key() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    let sm = orders();
    // 25 SHIPPED keys (bigint order differs from text order: 2 < 10), interleaved
    // with keys in other states.
    insert(&env.pool, 1..=25, "SHIPPED").await;
    insert(&env.pool, 101..=105, "CANCELLED").await;
    insert(&env.pool, [7_000_000_000], "INVOICED").await;

    let pages = all_pages(|after| {
        let sm = &sm;
        let pool = &env.pool;
        async move {
            sm.keys_in(pool, "SHIPPED", after.as_deref(), 10)
                .await
                .unwrap()
        }
    })
    .await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let keys: Vec<i64> = pages.concat().iter().map(|k| k.parse().unwrap()).collect();
    assert_eq!(
        keys,
        (1..=25).collect::<Vec<i64>>(),
        "in key order, no duplicates"
    );

    // Keyset, not OFFSET: keys leaving the state between pages skip nothing.
    let first = sm.keys_in(&env.pool, "SHIPPED", None, 10).await.unwrap();
    let mut conn = env.pool.acquire().await.unwrap();
    for key in &first[..5] {
        let t = sm
            .transition_to(&mut conn, key, "SHIPPED", "CANCELLED", "op")
            .await
            .unwrap();
        assert_eq!(t, Transition::Applied);
    }
    let second = sm
        .keys_in(&env.pool, "SHIPPED", first.last().map(String::as_str), 10)
        .await
        .unwrap();
    assert_eq!(second.first().map(String::as_str), Some("11"));

    // Expired claims: 25 stale claims among fresh ones, 3 pages of 10.
    for key in 6..=25 {
        // 6..=25 are still SHIPPED; 1..=5 were cancelled above.
        let c = sm
            .claim(&mut conn, &key.to_string(), "SHIPPED", "INVOICING", "dead")
            .await
            .unwrap();
        assert_eq!(c, Claim::Claimed);
    }
    insert(&env.pool, 26..=30, "SHIPPED").await;
    for key in 26..=30 {
        sm.claim(&mut conn, &key.to_string(), "SHIPPED", "INVOICING", "dead")
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE orders SET claimed_at = claimed_at - interval '10 minutes' WHERE claimed_by = 'dead'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // Fresh claims, not expired.
    insert(&env.pool, 31..=35, "SHIPPED").await;
    for key in 31..=35 {
        sm.claim(&mut conn, &key.to_string(), "SHIPPED", "INVOICING", "alive")
            .await
            .unwrap();
    }
    let pages = all_pages(|after| {
        let sm = &sm;
        let pool = &env.pool;
        async move {
            sm.expired_claims(pool, "INVOICING", after.as_deref(), 10)
                .await
                .unwrap()
        }
    })
    .await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let keys: Vec<i64> = pages.concat().iter().map(|k| k.parse().unwrap()).collect();
    assert_eq!(keys, (6..=30).collect::<Vec<i64>>());
    let unique: BTreeSet<i64> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len());
    assert!(sm
        .expired_claims(&env.pool, "INVOICING", None, 0)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn text_keys_quoted_identifiers_and_an_enum_state() {
    let env = TestEnv::new().await;
    sqlx::raw_sql(
        r#"CREATE SCHEMA app;
           CREATE TYPE app.shipment_state AS ENUM ('PACKED', 'SENDING', 'SENT');
           CREATE TABLE app."Shipments" (
               "shipment key" text PRIMARY KEY,
               "st""ate" app.shipment_state NOT NULL,
               owner text,
               since timestamptz);
           INSERT INTO app."Shipments" ("shipment key", "st""ate")
           SELECT 'k' || lpad(i::text, 2, '0'), 'PACKED' FROM generate_series(1, 12) i;"#,
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let sm = StateMachine::new("app.Shipments", "shipment key", "st\"ate")
        .state_type("app.shipment_state")
        .claim_columns("owner", "since")
        .transition("PACKED", "SENDING")
        .transition("SENDING", "SENT")
        .intermediate("SENDING", Duration::from_secs(30));

    let mut tx = env.pool.begin().await.unwrap();
    let c = sm
        .claim(&mut tx, "k01", "PACKED", "SENDING", "w1")
        .await
        .unwrap();
    assert_eq!(c, Claim::Claimed);
    let t = sm
        .transition_to(&mut tx, "k01", "SENDING", "SENT", "w1")
        .await
        .unwrap();
    assert_eq!(t, Transition::Applied);
    tx.commit().await.unwrap();
    assert_eq!(
        sm.current(&env.pool, "k01").await.unwrap().as_deref(),
        Some("SENT")
    );
    let (owner, since): (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(r#"SELECT owner, since FROM app."Shipments" WHERE "shipment key" = 'k01'"#)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((owner, since), (None, None));

    let first = sm.keys_in(&env.pool, "PACKED", None, 5).await.unwrap();
    assert_eq!(first, ["k02", "k03", "k04", "k05", "k06"]);
    let rest = sm
        .keys_in(&env.pool, "PACKED", Some("k06"), 10)
        .await
        .unwrap();
    assert_eq!(rest, ["k07", "k08", "k09", "k10", "k11", "k12"]);
}

#[tokio::test]
async fn under_repeatable_read_a_lost_race_is_a_retryable_error() {
    let env = TestEnv::new().await;
    create_orders(&env.pool).await;
    insert(&env.pool, [1], "SHIPPED").await;
    let sm = orders();

    let mut late = env.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *late)
        .await
        .unwrap();
    // Take the snapshot before the other transaction moves the row.
    assert_eq!(
        sm.current(&mut *late, "1").await.unwrap().as_deref(),
        Some("SHIPPED")
    );
    let mut conn = env.pool.acquire().await.unwrap();
    let c = sm
        .claim(&mut conn, "1", "SHIPPED", "INVOICING", "first")
        .await
        .unwrap();
    assert_eq!(c, Claim::Claimed);

    let e = sm
        .claim(&mut late, "1", "SHIPPED", "INVOICING", "late")
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    late.rollback().await.unwrap();
    assert_eq!(
        row(&env.pool, 1).await,
        ("INVOICING".into(), Some("first".into()), true)
    );
}
