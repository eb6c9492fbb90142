//! A private PgBouncer in front of the tests' PostgreSQL.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server session per client connection, for as long as it is open.
    Session,
    /// A server session per transaction.
    Transaction,
}

/// A `pgbouncer` (Debian's, 1.18 here) on a free loopback port, forwarding
/// every database to `target` (`host:port`), with trust authentication.
/// Killed when dropped.
pub struct PgBouncer {
    port: u16,
    dir: PathBuf,
    child: Child,
}

fn binary() -> String {
    std::env::var("PGBOUNCER_BIN").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
            "/usr/sbin/pgbouncer".into()
        } else {
            "pgbouncer".into()
        }
    })
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with `pool_size` server connections per
    /// database and user, and waits until it accepts connections. The
    /// settings sqlx needs: `ignore_startup_parameters = extra_float_digits,options`.
    pub async fn start(target: &str, mode: PoolMode, pool_size: u32) -> PgBouncer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("converge-pgbouncer-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let (host, target_port) = target.rsplit_once(':').expect("host:port");
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n* = host={host} port={target_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {dir}/users.txt\n\
             pool_mode = {mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("write users.txt");
        let mut cmd = Command::new(binary());
        // PgBouncer refuses to run as root: drop to the postgres user.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if root {
            let _ = std::process::Command::new("chmod")
                .args(["-R", "a+rwX"])
                .arg(&dir)
                .status();
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgbouncer (apt-get install pgbouncer)");
        let bouncer = PgBouncer { port, dir, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pgbouncer did not listen within 10 s: {}",
                bouncer.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
