//! A TCP proxy a test can pause and cut, to make a service unreachable for one
//! client (a relay's PostgreSQL pool, a worker's NATS connection) while the
//! rest of the test still reaches it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Open,
    /// Accept and keep reading, but forward nothing until opened again: the
    /// peers see a silent network, nothing is lost.
    Paused,
    /// Close every connection and refuse new ones (accepted and closed at once).
    Cut,
}

/// A TCP proxy on a free loopback port in front of `target`.
pub struct TcpProxy {
    port: u16,
    target: Arc<std::sync::Mutex<String>>,
    mode: watch::Sender<ProxyMode>,
    held: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `target` (`host:port`), open.
    pub async fn start(target: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, rx) = watch::channel(ProxyMode::Open);
        let held = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(std::sync::Mutex::new(target.to_owned()));
        let target2 = target.clone();
        let held2 = held.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *rx.borrow() == ProxyMode::Cut {
                    drop(client);
                    continue;
                }
                let to = target2.lock().expect("proxy target").clone();
                let Ok(server) = TcpStream::connect(&to).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, rx.clone(), held2.clone()));
                tokio::spawn(pipe(sr, cw, rx.clone(), held2.clone()));
            }
        });
        TcpProxy {
            port,
            target,
            mode,
            held,
            task,
        }
    }

    /// Sends new connections to `target` from now on and closes the open
    /// ones (what a DNS or VIP switch to another server looks like).
    pub async fn retarget(&self, target: &str) {
        *self.target.lock().expect("proxy target") = target.to_owned();
        let mode = *self.mode.borrow();
        self.set(ProxyMode::Cut);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.set(mode);
    }

    /// The proxy's address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets the mode; [`ProxyMode::Cut`] closes every open connection.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Bytes read while paused and not yet forwarded.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.mode.send_replace(ProxyMode::Cut);
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    held: Arc<AtomicUsize>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Cut => return,
            ProxyMode::Open if !pending.is_empty() => {
                let n = pending.len();
                if to.write_all(&pending).await.is_err() {
                    return;
                }
                pending.clear();
                held.fetch_sub(n, Ordering::SeqCst);
                continue;
            }
            _ => {}
        }
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *mode.borrow() == ProxyMode::Open {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                } else {
                    pending.extend_from_slice(&buf[..n]);
                    held.fetch_add(n, Ordering::SeqCst);
                }
            }
        }
    }
}
