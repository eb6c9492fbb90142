//! A private PostgreSQL cluster for one test: `initdb` + `pg_ctl` on a free
//! loopback port, with its own settings (prepared transactions, TLS, …), so a
//! test can restore dumps into a fresh cluster, stop it, or hold transactions
//! without touching the shared server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Where PostgreSQL's programs are: `$PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian), else the `PATH`.
pub fn pg_bin(program: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Path::new(&dir).join(program);
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join(program).exists())
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, bin)| bin.join(program))
        .unwrap_or_else(|| PathBuf::from(program))
}

fn running_as_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL server program, as the `postgres` OS user when the tests
/// run as root (initdb and the server refuse to run as root).
fn run_pg(program: &str, args: &[&str]) -> Output {
    let bin = pg_bin(program);
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A private PostgreSQL cluster, stopped (immediately) and deleted when dropped.
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl PgCluster {
    /// Creates a cluster (trust authentication, user `postgres`) with the given
    /// extra `postgresql.conf` lines and starts it on a free port.
    pub fn start(settings: &[&str]) -> PgCluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("converge-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        if running_as_root() {
            check(
                "chown",
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&dir)
                    .output()
                    .expect("chown"),
            );
        }
        let data = dir.join("data");
        let data_s = data.to_str().expect("utf-8 path");
        check(
            "initdb",
            run_pg(
                "initdb",
                &[
                    "-D",
                    data_s,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            ),
        );
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nmax_connections = 60\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        let mut cluster = PgCluster {
            dir,
            port,
            running: false,
        };
        cluster.start_server();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().expect("utf-8").to_owned()
    }

    fn start_server(&mut self) {
        let log = self.dir.join("server.log");
        check(
            "pg_ctl start",
            run_pg(
                "pg_ctl",
                &[
                    "-D",
                    &self.data(),
                    "-l",
                    log.to_str().expect("utf-8"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
        );
        self.running = true;
    }

    /// A streaming standby of the cluster at `primary_port` (`pg_basebackup
    /// -R`, so it follows `127.0.0.1:primary_port`: a [`TcpProxy`](crate::TcpProxy)
    /// there lets a test cut replication), on a free port of its own.
    pub fn standby_of(primary_port: u16, settings: &[&str]) -> PgCluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("converge-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        if running_as_root() {
            check(
                "chown",
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&dir)
                    .output()
                    .expect("chown"),
            );
        }
        let data = dir.join("data");
        check(
            "pg_basebackup",
            run_pg(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary_port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    data.to_str().expect("utf-8"),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ],
            ),
        );
        let mut conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        let mut cluster = PgCluster {
            dir,
            port,
            running: false,
        };
        cluster.start_server();
        cluster
    }

    /// Promotes a standby to a primary (a new timeline) and waits for it.
    pub fn promote(&mut self) {
        check(
            "pg_ctl promote",
            run_pg("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"]),
        );
    }

    /// Stops the server at once, as a crash would (`pg_ctl -m immediate`).
    pub fn crash(&mut self) {
        if self.running {
            let _ = run_pg(
                "pg_ctl",
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            );
            self.running = false;
        }
    }

    /// Waits until this primary reports its standby streaming synchronously.
    pub async fn wait_for_sync_standby(&self) {
        for _ in 0..300 {
            let state = self.psql(
                "postgres",
                "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication",
            );
            if state.trim() == "sync" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the standby never became synchronous");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (e.g. to add certificates before a restart).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL on `database` with psql (for set-up that sqlx cannot do, such
    /// as statements that must run outside a transaction).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = check(
            "psql",
            Command::new(pg_bin("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(self.url(database))
                .args(["-c", sql])
                .output()
                .expect("run psql"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the server (fast shutdown); the data stays for [`PgCluster::restart`].
    pub fn stop(&mut self) {
        if self.running {
            let _ = run_pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
            self.running = false;
        }
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = run_pg(
                "pg_ctl",
                &[
                    "-D",
                    &self.data(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "10",
                    "stop",
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Dumps `url` with `pg_dump -Fc` into `file`.
pub fn pg_dump(url: &str, file: &Path) {
    check(
        "pg_dump",
        Command::new(pg_bin("pg_dump"))
            .args(["-Fc", "-f"])
            .arg(file)
            .arg(url)
            .output()
            .expect("run pg_dump"),
    );
}

/// Restores a `pg_dump -Fc` file into the (existing, empty) database at `url`.
pub fn pg_restore(url: &str, file: &Path) {
    check(
        "pg_restore",
        Command::new(pg_bin("pg_restore"))
            .args(["--exit-on-error", "--no-owner", "-d"])
            .arg(url)
            .arg(file)
            .output()
            .expect("run pg_restore"),
    );
}

/// Waits until `url` accepts connections (at most `within`).
pub async fn wait_for_postgres(url: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("url");
        if sqlx::ConnectOptions::connect(&opts).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "PostgreSQL at {url} did not accept connections within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
