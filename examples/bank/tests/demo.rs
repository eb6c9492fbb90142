//! `bank demo` and `bank check` as an operator runs them, against a database
//! and a stream of the test's own: the demo converges (twice: it starts
//! clean), and the check fails, naming why, on a credit applied twice (the
//! books off, the balances read model off its events) and on a movement for
//! no transfer or for more than the transfer moved.

use converge_tests::TestEnv;

async fn bank(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bank"))
        .args([
            "--stream",
            &env.stream,
            "--app",
            &format!("bank-{}", env.prefix),
        ])
        .args(args)
        .env("DATABASE_URL", env.database_url())
        .env("NATS_URL", env.nats_url())
        .output()
        .await
        .expect("run bank");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_converges_and_the_check_names_what_breaks_the_books() {
    let env = TestEnv::new().await;
    for round in 0..2 {
        let (code, stdout, stderr) = bank(&env, &["demo", "--transfers", "300"]).await;
        assert_eq!(code, 0, "round {round}:\n{stdout}\n{stderr}");
        let last = stdout.lines().last().unwrap_or_default();
        let rest = last
            .strip_prefix("converged: 300 transfers, books balanced, 0 duplicates in ")
            .unwrap_or_else(|| panic!("round {round}: last line {last:?}\n{stdout}"));
        assert!(rest.ends_with(" s"), "{last}");
        assert!(
            stdout.contains("instants with the books off: 0"),
            "{stdout}"
        );
        assert!(stdout.contains("swapped in (generation 2)"), "{stdout}");
    }
    let (code, stdout, _) = bank(&env, &["check"]).await;
    assert_eq!(code, 0, "{stdout}");

    // A credit applied twice: the account's log holds it twice.
    let (transfer, to, amount): (String, String, i64) = sqlx::query_as(
        "SELECT t.aggregate_id, t.payload->>'to', (t.payload->>'amount')::bigint \
         FROM converge.outbox t WHERE t.aggregate_type = 'transfer' AND t.event_type = 'Requested' \
           AND EXISTS (SELECT 1 FROM converge.outbox c WHERE c.aggregate_type = 'transfer' \
                       AND c.aggregate_id = t.aggregate_id AND c.event_type = 'Credited') \
         ORDER BY 1 LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "SELECT converge.append('account', $1, 'Credited', \
                json_build_object('transfer', $2::text, 'amount', $3::bigint))",
    )
    .bind(&to)
    .bind(&transfer)
    .bind(amount)
    .execute(&env.pool)
    .await
    .unwrap();
    let (code, stdout, _) = bank(&env, &["check"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("applied twice: Credited of {transfer} on {to} ×2")),
        "{stdout}"
    );
    assert!(stdout.contains("books off by"), "{stdout}");
    assert!(stdout.contains("read model differs"), "{stdout}");
    let (_, json, _) = bank(&env, &["check", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["converged"], false);
    assert_eq!(report["balanced"], false);

    // A debit for a transfer that does not exist, on another account.
    let other: String = sqlx::query_scalar(
        "SELECT aggregate_id FROM converge.outbox_heads \
         WHERE aggregate_type = 'account' AND aggregate_id <> $1 ORDER BY 1 LIMIT 1",
    )
    .bind(&to)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "SELECT converge.append('account', $1, 'Debited', \
                json_build_object('transfer', 'ghost', 'amount', 1))",
    )
    .bind(&other)
    .execute(&env.pool)
    .await
    .unwrap();
    let (code, stdout, _) = bank(&env, &["check"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "Debited of ghost on {other}: no such movement for that transfer"
        )),
        "{stdout}"
    );
    // A refund of the credited transfer, for more than it moved.
    let from: String = sqlx::query_scalar(
        "SELECT payload->>'from' FROM converge.outbox \
         WHERE aggregate_type = 'transfer' AND aggregate_id = $1 AND event_type = 'Requested'",
    )
    .bind(&transfer)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "SELECT converge.append('account', $1, 'Refunded', \
                json_build_object('transfer', $2::text, 'amount', $3::bigint))",
    )
    .bind(&from)
    .bind(&transfer)
    .bind(amount + 1)
    .execute(&env.pool)
    .await
    .unwrap();
    let (code, stdout, _) = bank(&env, &["check"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "Refunded of {transfer} on {from} for [{}] cents, the transfer is for {amount}",
            amount + 1
        )),
        "{stdout}"
    );
}
