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

fn binary() -> String {
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let store = std::env::temp_dir().join(format!("converge-nats-{}", uuid::Uuid::new_v4()));
        let config = (!config.is_empty()).then(|| {
            std::fs::create_dir_all(&store).expect("nats store");
            let path = store.join("server.conf");
            std::fs::write(&path, config).expect("write nats config");
            path
        });
        let mut server = NatsServer {
            port,
            store,
            config,
            child: None,
        };
        server.restart().await;
        server
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
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "nats-server did not listen on port {} within 5 s",
            self.port
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
