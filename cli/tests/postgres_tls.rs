//! PostgreSQL that accepts TLS connections only (client certificates
//! required): the library and the CLI reach it through the URL's `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey`, and a plain connection is refused.

mod common;

use converge::Outbox;
use converge_tests::{make_certificates, AccountChanged, PgCluster};
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_only_postgres_is_reached_through_the_url_by_library_and_cli() {
    let mut pg = PgCluster::start(&[]);
    let data = pg.data_dir();
    make_certificates(&data, "postgres");
    if running_as_root() {
        let status = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .args(["server.pem", "server.key", "ca.pem"].map(|f| data.join(f)))
            .status()
            .unwrap();
        assert!(status.success());
    }
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 cert\n\
         hostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    let conf = data.join("postgresql.conf");
    let mut settings = std::fs::read_to_string(&conf).unwrap();
    settings.push_str(
        "\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n\
         ssl_ca_file = 'ca.pem'\n",
    );
    std::fs::write(&conf, settings).unwrap();
    pg.restart();

    // The client's files may live anywhere the client can read them.
    let client = std::env::temp_dir().join(format!("converge-pg-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&client).unwrap();
    for f in ["ca.pem", "client.pem", "client.key"] {
        std::fs::copy(data.join(f), client.join(f)).unwrap();
    }
    let plain = format!("{}?sslmode=disable", pg.url("postgres"));
    let refused = PgPool::connect(&plain)
        .await
        .expect_err("plain connections are refused");
    assert!(refused.to_string().contains("no encryption"), "{refused}");
    let tls = format!(
        "{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        pg.url("postgres"),
        client.join("ca.pem").display(),
        client.join("client.pem").display(),
        client.join("client.key").display()
    );

    // The library: migrate, append, read back, over TLS.
    let pool = PgPool::connect(&tls).await.expect("a TLS connection");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the connection is not encrypted");
    converge::migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &AccountChanged::new("a1"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The CLI, with the same URL.
    common::converge_with(tls.clone(), "nats://127.0.0.1:1".into(), &["migrate"])
        .await
        .expect(0);
    let run = common::converge_with(
        tls,
        "nats://127.0.0.1:1".into(),
        &["outbox", "list", "--json"],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("\"a1\""), "{run:#?}");
    let _ = std::fs::remove_dir_all(&client);
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
