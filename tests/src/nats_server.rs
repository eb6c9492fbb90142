//! A private `nats-server` a test can stop and restart.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A JetStream-enabled `nats-server` on a free loopback port, with its own store.
/// Killed when dropped.
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    /// A configuration file passed with `-c`, if any.
    config: Option<PathBuf>,
    child: Option<Child>,
}

/// The `nats-server` to run: `NATS_SERVER_BIN`, else Debian's, else `PATH`'s.
pub(crate) fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server".into()
        } else {
            "nats-server".into()
        }
    })
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub async fn start() -> NatsServer {
        Self::start_with_config("").await
    }

    /// Starts a server with extra configuration (nats-server's configuration
    /// file syntax, e.g. `max_payload: 4096`), on a free port.
    pub async fn start_with_config(config: &str) -> NatsServer {
        let store = std::env::temp_dir().join(format!("converge-nats-{}", uuid::Uuid::new_v4()));
        let config = (!config.is_empty()).then(|| {
            std::fs::create_dir_all(&store).expect("nats store");
            let path = store.join("server.conf");
            std::fs::write(&path, config).expect("write nats config");
            path
        });
        let mut server = NatsServer {
            port: 0,
            store,
            config,
            child: None,
        };
        // The free port is free when asked, not necessarily when the server
        // binds it (tests start servers in parallel): on a lost race, another.
        for _ in 0..5 {
            server.port = free_port();
            if server.try_restart().await {
                return server;
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL); its store stays for a restart.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        assert!(
            self.try_restart().await,
            "nats-server did not listen on port {} within 5 s",
            self.port
        );
    }

    /// Starts the server on its port; whether it listens (and is the one
    /// listening: still running) within 5 s.
    async fn try_restart(&mut self) -> bool {
        self.stop().await;
        let mut cmd = Command::new(binary());
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server (set NATS_SERVER_BIN if it is not in /usr/sbin or PATH)");
        let child = self.child.insert(child);
        listening(child, self.port).await
    }
}

/// Whether `child` listens on `port` (and is the one listening: still
/// running) within 5 s.
pub(crate) async fn listening(child: &mut Child, port: u16) -> bool {
    for _ in 0..200 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            // A server that lost the port exits at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return matches!(child.try_wait(), Ok(None));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// A loopback port free when asked.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The NATS client settings a child process would read from the environment
/// (the `nats` CLI's names, as `converge::nats::NatsConnect::from_env` reads
/// them), apart from `NATS_URL`.
pub const NATS_CLIENT_ENV: [&str; 9] = [
    "NATS_CREDS",
    "NATS_NKEY",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CA",
    "NATS_CERT",
    "NATS_KEY",
    "NATS_INBOX_PREFIX",
];

/// Removes [`NATS_CLIENT_ENV`] from `cmd`'s environment, so that a child
/// connects with what the test gives it, not the developer's settings.
pub fn clear_nats_client_env(cmd: &mut Command) -> &mut Command {
    for name in NATS_CLIENT_ENV {
        cmd.env_remove(name);
    }
    cmd
}
