//! Where the test services are: environment, local defaults, or testcontainers.

use tokio::sync::OnceCell;

const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const LOCAL_NATS_URL: &str = "nats://127.0.0.1:4222";

struct Services {
    database_url: String,
    nats_url: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

async fn reachable(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

async fn services() -> &'static Services {
    SERVICES
        .get_or_init(|| async {
            let db = std::env::var("DATABASE_URL").ok();
            let nats = std::env::var("NATS_URL").ok();
            if db.is_some() || nats.is_some() {
                return Services {
                    database_url: db.unwrap_or_else(|| LOCAL_DATABASE_URL.into()),
                    nats_url: nats.unwrap_or_else(|| LOCAL_NATS_URL.into()),
                };
            }
            if reachable("127.0.0.1:5432").await && reachable("127.0.0.1:4222").await {
                return Services {
                    database_url: LOCAL_DATABASE_URL.into(),
                    nats_url: LOCAL_NATS_URL.into(),
                };
            }
            containers().await
        })
        .await
}

#[cfg(feature = "docker")]
async fn containers() -> Services {
    use testcontainers_modules::nats::{Nats, NatsServerCmd};
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::ImageExt;

    let pg = Postgres::default().with_tag("15").start().await.expect(
        "DATABASE_URL / NATS_URL are unset, nothing listens on 127.0.0.1:5432/4222, and \
             testcontainers could not start PostgreSQL: start the services or Docker",
    );
    let nats = Nats::default()
        .with_cmd(&NatsServerCmd::default().with_jetstream())
        .start()
        .await
        .expect("testcontainers could not start NATS with JetStream");
    let pg_port = pg.get_host_port_ipv4(5432).await.expect("postgres port");
    let nats_port = nats.get_host_port_ipv4(4222).await.expect("nats port");
    // The containers live as long as the test process.
    Box::leak(Box::new((pg, nats)));
    Services {
        database_url: format!("postgres://postgres:postgres@127.0.0.1:{pg_port}/postgres"),
        nats_url: format!("nats://127.0.0.1:{nats_port}"),
    }
}

#[cfg(not(feature = "docker"))]
async fn containers() -> Services {
    panic!(
        "DATABASE_URL / NATS_URL are unset and nothing listens on 127.0.0.1:5432 / 4222: \
         start PostgreSQL and NATS (with -js), or build the tests with the `docker` feature"
    )
}

/// The Postgres server URL tests create their databases on.
pub async fn database_url() -> String {
    services().await.database_url.clone()
}

/// The NATS URL tests use.
pub async fn nats_url() -> String {
    services().await.nats_url.clone()
}
