//! Least privilege in PostgreSQL: roles made from `converge grants`, each
//! command run as each role. Workers run without DDL rights and never migrate
//! implicitly; what a role may not do is refused with a clear error.

mod common;

use std::time::Duration;

use common::orders::{invoicing_worker, ship, wait_invoiced, Shipped};
use common::{app, converge_with, pool_as, url_as, Run};
use converge::{Outbox, Worker};
use converge_tests::TestEnv;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
/// PostgreSQL roles made for one test: cluster-wide, so dropped when this
/// guard is (before the test's database: declare it after the `TestEnv`),
/// whether the test passed or panicked.
struct Roles {
    names: Vec<String>,
    database_url: String,
}

impl Roles {
    fn new(env: &TestEnv) -> Roles {
        Roles {
            names: Vec::new(),
            database_url: env.database_url(),
        }
    }

    /// Creates `<tag>_<role>` for each converge role, granted with what
    /// `converge grants --role R --to NAME` prints.
    async fn add(&mut self, env: &TestEnv, tag: &str, roles: &[&str]) {
        for role in roles {
            let name = format!("{tag}_{role}");
            self.create(env, &name).await;
            let printed = as_role(env, "postgres", &["grants", "--role", role, "--to", &name])
                .await
                .expect(0);
            sqlx::raw_sql(&printed.stdout)
                .execute(&env.pool)
                .await
                .unwrap_or_else(|e| {
                    panic!("the grants of {role} apply ({e}):\n{}", printed.stdout)
                });
        }
    }

    /// Creates a login role `name` with no grants.
    async fn create(&mut self, env: &TestEnv, name: &str) {
        sqlx::query(&format!("CREATE ROLE {name} LOGIN"))
            .execute(&env.pool)
            .await
            .unwrap();
        self.names.push(name.to_owned());
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let (names, url) = (std::mem::take(&mut self.names), self.database_url.clone());
        // Its own runtime on its own thread: Drop cannot await.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let pool = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await?;
                    for name in names {
                        // Its privileges and objects here first, then the role.
                        sqlx::raw_sql(&format!("DROP OWNED BY {name}; DROP ROLE {name}"))
                            .execute(&pool)
                            .await?;
                    }
                    pool.close().await;
                    Ok::<_, sqlx::Error>(())
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test's PostgreSQL roles: {dropped:?}");
        }
    }
}

async fn as_role(env: &TestEnv, user: &str, args: &[&str]) -> Run {
    converge_with(url_as(env, user), env.nats_url().to_owned(), args).await
}

/// SQLSTATE of a failed statement.
async fn sqlstate(pool: &PgPool, sql: &str) -> Option<String> {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => None,
        Err(e) => Some(
            e.as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned())
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

#[tokio::test]
async fn each_role_does_its_job_and_is_refused_the_rest_with_a_clear_error() {
    let env = TestEnv::new().await;
    let tag = format!("cv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut roles = Roles::new(&env);
    roles
        .add(&env, &tag, &["app", "worker", "operator", "viewer"])
        .await;
    let (app_role, worker_role) = (format!("{tag}_app"), format!("{tag}_worker"));
    let (operator, viewer) = (format!("{tag}_operator"), format!("{tag}_viewer"));
    sqlx::raw_sql(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL); \
         GRANT SELECT, INSERT ON orders TO {app_role}; \
         GRANT SELECT, UPDATE ON orders TO {worker_role};"
    ))
    .execute(&env.pool)
    .await
    .unwrap();

    // The application appends as `app`.
    let app_pool = pool_as(&env, &app_role).await;
    ship(&app_pool, 1..=5).await;
    assert_eq!(
        sqlstate(&app_pool, "SELECT * FROM converge.dead_letters")
            .await
            .as_deref(),
        Some("42501"),
        "the app role reads no operational table"
    );

    // The worker runs relay, consumer, sweep and control plane as `worker`.
    let worker_pool = pool_as(&env, &worker_role).await;
    let application = app();
    let worker = invoicing_worker(&env, worker_pool.clone(), env.nats.clone(), &application)
        .await
        .expect("a worker starts with the worker role's grants, without DDL rights");
    if let Err(invoiced) = wait_invoiced(&env, 5).await {
        panic!("the worker role relays and reconciles: {invoiced} of 5 invoiced");
    }
    for (sql, what) in [
        ("CREATE TABLE converge.evil (x int)", "create a table"),
        ("DROP TABLE converge.outbox", "drop a table"),
        ("DELETE FROM converge.audit", "delete audit rows"),
    ] {
        assert_eq!(
            sqlstate(&worker_pool, sql).await.as_deref(),
            Some("42501"),
            "the worker role may not {what}"
        );
    }
    let migrate = as_role(&env, &worker_role, &["migrate"]).await.expect(1);
    assert!(
        migrate.stderr.contains("needs the converge schema's owner"),
        "{migrate:?}"
    );

    let app_flag = ["--app", application.as_str()];
    // The operator acts: a sweep run through the worker (which writes its own
    // audit row as the worker role), then (after the
    // viewer's refusals) a lease release.
    let ran = as_role(
        &env,
        &operator,
        &[
            &app_flag[..],
            &["--actor", "alice", "sweep", "run", "invoices", "--wait"],
        ]
        .concat(),
    )
    .await
    .expect(0);
    assert!(ran.stdout.contains("completed"), "{ran:?}");
    // A dead letter to act on.
    let letter: i64 = sqlx::query_scalar(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ('invoicing', '99', 'event', 'boom', true, 1) RETURNING id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let letter = letter.to_string();

    // The viewer reads, and is refused every action, naming the grants.
    for args in [
        &["status"][..],
        &["audit"],
        &["outbox", "list"],
        &["dead-letters", "list"],
        &["dead-letters", "show", &letter],
        &["locks", "list"],
        &["sweep", "list"],
        &["sweep", "history"],
    ] {
        as_role(&env, &viewer, &[&app_flag[..], args].concat())
            .await
            .expect(0);
    }
    for args in [
        &["sweep", "run", "invoices", "--wait"][..],
        &["locks", "release", "invoices", "--force"],
        &["dead-letters", "discard", &letter],
        &["outbox", "replay", "--yes"],
    ] {
        let refused = as_role(&env, &viewer, &[&app_flag[..], args].concat())
            .await
            .expect(77);
        assert!(
            refused.stderr.contains("PostgreSQL refused")
                && refused.stderr.contains("converge grants --role operator"),
            "{refused:?}"
        );
    }
    assert_eq!(
        sqlstate(
            &pool_as(&env, &viewer).await,
            "UPDATE converge.dead_letters SET error = error"
        )
        .await
        .as_deref(),
        Some("42501")
    );

    as_role(
        &env,
        &operator,
        &[&app_flag[..], &["locks", "release", "invoices", "--force"]].concat(),
    )
    .await
    .expect(0);
    for args in [
        &["dead-letters", "discard", &letter][..],
        &["outbox", "replay", "--aggregate-id", "1", "--yes"],
    ] {
        as_role(&env, &operator, &[&app_flag[..], args].concat())
            .await
            .expect(0);
    }
    // The application's role reads nothing of the operations.
    let refused = as_role(&env, &app_role, &[&app_flag[..], &["status"]].concat())
        .await
        .expect(77);
    assert!(refused.stderr.contains("PostgreSQL refused"), "{refused:?}");
    let recorded: (String, Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT actor, outcome, details FROM converge.audit \
         WHERE action = 'sweep.run' AND details->>'recorded_by' = 'worker'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the worker recorded the run it executed");
    assert_eq!(recorded.0, "alice");
    assert_eq!(recorded.1.as_deref(), Some("ok"), "{recorded:?}");
    assert_eq!(
        sqlstate(
            &pool_as(&env, &operator).await,
            "DELETE FROM converge.audit"
        )
        .await
        .as_deref(),
        Some("42501"),
        "an operator may not delete the audit log"
    );
    assert_eq!(
        sqlx::query("CREATE TABLE converge.evil (x int)")
            .execute(&pool_as(&env, &operator).await)
            .await
            .err()
            .and_then(|e| e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned())),
        Some("42501".to_owned()),
        "an operator may not create tables"
    );
    // A settled audit entry cannot be changed, not even its outcome.
    let settled: i64 = sqlx::query_scalar(
        "SELECT id FROM converge.audit WHERE finished_at IS NOT NULL ORDER BY id LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for who in [&operator, &worker_role] {
        let rewrite = format!("UPDATE converge.audit SET outcome = 'ok' WHERE id = {settled}");
        assert_eq!(
            sqlstate(&pool_as(&env, who).await, &rewrite)
                .await
                .as_deref(),
            Some("42501"),
            "{who} rewrote a settled audit entry"
        );
    }
    let migrate = as_role(&env, &operator, &["migrate"]).await.expect(1);
    assert!(migrate.stderr.contains("needs the converge schema's owner"));

    worker.shutdown().await.expect("worker stops");
    app_pool.close().await;
    worker_pool.close().await;
    drop(roles);
}

#[tokio::test]
async fn a_worker_never_migrates_implicitly_and_names_what_is_missing() {
    // An empty database: the worker refuses, naming `converge migrate`, and
    // creates nothing.
    let env = TestEnv::unmigrated(&converge_tests::nats_url().await).await;
    let start = |pool: PgPool| {
        let nats = env.nats.clone();
        let relay = env.relay_config();
        async move {
            Worker::new(pool, nats, app())
                .relay(relay)
                .shutdown_timeout(Duration::from_secs(5))
                .start()
                .await
        }
    };
    let refused = start(env.pool.clone()).await.expect_err("not migrated");
    let text = refused.to_string();
    assert!(
        text.contains("converge migrate") && text.contains("missing"),
        "{text}"
    );
    assert!(!refused.is_retryable());
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('converge')::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(schema, None, "nothing was created");

    // Opting in migrates.
    let worker = Worker::new(env.pool.clone(), env.nats.clone(), app())
        .relay(env.relay_config())
        .migrate_at_start(true)
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("migrate_at_start(true) migrates");
    worker.shutdown().await.unwrap();

    // A role without the worker's grants is refused at start, each missing
    // privilege named with the command that prints them.
    let tag = format!("cv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bare = format!("{tag}_bare");
    let mut roles = Roles::new(&env);
    roles.create(&env, &bare).await;
    sqlx::query(&format!("GRANT USAGE ON SCHEMA converge TO {bare}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let refused = start(pool_as(&env, &bare).await)
        .await
        .expect_err("no grants");
    let text = refused.to_string();
    for needed in [
        "SELECT, INSERT, DELETE on converge.outbox,",
        "INSERT, UPDATE, DELETE on converge.workers",
        "EXECUTE on converge.rebase()",
        &format!("converge grants --role worker --to {bare}"),
    ] {
        assert!(text.contains(needed), "{needed:?} missing from: {text}");
    }

    // A schema one migration behind this build: refused, naming both.
    let latest = converge::latest_migration();
    sqlx::query("DELETE FROM converge._sqlx_migrations WHERE version = $1")
        .bind(latest)
        .execute(&env.pool)
        .await
        .unwrap();
    let behind: i64 = sqlx::query_scalar("SELECT max(version) FROM converge._sqlx_migrations")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let refused = start(env.pool.clone()).await.expect_err("an older schema");
    let text = refused.to_string();
    assert!(
        text.contains(&format!("at migration {behind}"))
            && text.contains(&format!("needs migration {latest}"))
            && text.contains("converge migrate"),
        "{text}"
    );
    drop(roles);
}

#[tokio::test]
async fn grants_refuse_unknown_roles() {
    let env = TestEnv::new().await;
    let bad = as_role(&env, "postgres", &["grants", "--role", "admin"])
        .await
        .expect(2);
    assert!(
        bad.stderr.contains("owner, app, worker, operator, viewer"),
        "{bad:?}"
    );
    let owner = as_role(
        &env,
        "postgres",
        &["grants", "--role", "owner", "--app", "billing"],
    )
    .await
    .expect(0);
    assert!(
        owner
            .stdout
            .contains("CREATE SCHEMA IF NOT EXISTS converge AUTHORIZATION \"billing_owner\""),
        "{owner:?}"
    );
}

#[tokio::test]
async fn the_owner_made_by_converge_grants_migrates_and_workers_get_the_rest() {
    let env = TestEnv::unmigrated(&converge_tests::nats_url().await).await;
    let tag = format!("cv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // The owner first: it creates the schema by migrating (twice: idempotent
    // once the schema exists, without CREATE on the database).
    let mut roles = Roles::new(&env);
    roles.add(&env, &tag, &["owner"]).await;
    let owner = format!("{tag}_owner");
    for _ in 0..2 {
        as_role(&env, &owner, &["migrate"]).await.expect(0);
    }
    let schema_owner: String = sqlx::query_scalar(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'converge'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(schema_owner, owner);
    // A role without even USAGE on the schema is told so, with the fix.
    let bare = format!("{tag}_bare");
    roles.create(&env, &bare).await;
    let refused = Worker::new(pool_as(&env, &bare).await, env.nats.clone(), app())
        .relay(env.relay_config())
        .start()
        .await
        .expect_err("no USAGE on the schema");
    let text = refused.to_string();
    assert!(
        text.contains("USAGE on schema converge") && text.contains("converge grants --role worker"),
        "{text}"
    );
    // Then the worker's grants (on the owner's tables) suffice.
    roles.add(&env, &tag, &["worker"]).await;
    let worker = Worker::new(
        pool_as(&env, &format!("{tag}_worker")).await,
        env.nats.clone(),
        app(),
    )
    .relay(env.relay_config())
    .shutdown_timeout(Duration::from_secs(5))
    .start()
    .await
    .expect("a worker starts on the owner's schema");
    worker.shutdown().await.unwrap();
    drop(roles);
}

#[tokio::test]
async fn overloads_planted_in_public_do_not_run_inside_an_append() {
    let env = TestEnv::new().await;
    let tag = format!("cv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut roles = Roles::new(&env);
    roles.add(&env, &tag, &["app"]).await;
    let app_role = format!("{tag}_app");
    // A role that may create in `public` (the default before PostgreSQL 15)
    // plants exact-match overloads of what partition_of calls.
    sqlx::raw_sql(&format!("GRANT CREATE ON SCHEMA public TO {tag}_app"))
        .execute(&env.pool)
        .await
        .unwrap();
    let app_pool = pool_as(&env, &app_role).await;
    sqlx::raw_sql(
        "CREATE FUNCTION public.planted(bigint, integer) RETURNS bigint LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'planted operator ran as %', current_user; END $$; \
         CREATE OPERATOR public.& (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.planted); \
         CREATE OPERATOR public.% (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.planted); \
         CREATE FUNCTION public.hashtextextended(text, integer) RETURNS bigint LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'planted function ran as %', current_user; END $$;",
    )
    .execute(&app_pool)
    .await
    .expect("plant the overloads");
    let mut tx = app_pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &Shipped { id: 1 })
        .await
        .expect("the append runs none of the planted overloads");
    tx.commit().await.unwrap();
    let right: bool = sqlx::query_scalar(
        // Exact pg_catalog types here too: this session's search_path has
        // `public`, and an integer literal would call the planted operator.
        "SELECT partition = ((pg_catalog.hashtextextended('order/1', 0::bigint) \
                               & 2147483647::bigint) % 32::bigint)::int \
         FROM converge.outbox",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(right, "the event's partition is the hash's");
    app_pool.close().await;
    drop(roles);
}
