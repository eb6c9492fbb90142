//! A private three-node JetStream cluster on loopback, whose nodes a test can
//! kill, restart and pause.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use tokio::process::{Child, Command};

use crate::nats_server::{binary, free_port, listening};

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    client_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of `nats-server`s on loopback ports, routed to each
/// other, each with its own store. Killed when dropped.
///
/// Node `i` is named `n{i}`, the name JetStream reports as a stream's leader
/// (see [`NatsCluster::stream_leader`]).
pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream has a meta leader (a
    /// stream can be created).
    pub async fn start(size: usize) -> NatsCluster {
        // The free ports are free when asked, not necessarily when the nodes
        // bind them (tests start servers in parallel): on a lost race, others.
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start(size).await {
                cluster.wait_ready().await;
                return cluster;
            }
        }
        panic!("the cluster's nodes did not start on three sets of free ports");
    }

    async fn try_start(size: usize) -> Option<NatsCluster> {
        let dir = std::env::temp_dir().join(format!("converge-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route))| {
                let name = format!("n{i}");
                let store = dir.join(&name);
                let config = dir.join(format!("{name}.conf"));
                // Election and heartbeat timings are the server's defaults:
                // the tests see what production sees.
                std::fs::write(
                    &config,
                    format!(
                        "server_name: {name}\n\
                         listen: 127.0.0.1:{client}\n\
                         jetstream {{ store_dir: {store:?} }}\n\
                         cluster {{\n  name: converge-test\n  listen: 127.0.0.1:{route}\n  \
                         routes: [{}]\n}}\n",
                        routes.join(", ")
                    ),
                )
                .expect("write node config");
                Node {
                    name,
                    client_port: *client,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { dir, nodes };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            let port = cluster.nodes[i].client_port;
            let child = cluster.nodes[i].child.as_mut().expect("spawned");
            if !listening(child, port).await {
                return None; // dropping it kills the others
            }
        }
        Some(cluster)
    }

    /// Every node's client URL, comma-separated (what `NATS_URL` takes).
    pub fn url(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Node `i`'s server name (`n{i}`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node leading `stream`, once it has a leader.
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        for _ in 0..200 {
            if let Ok(mut s) = js.get_stream(stream).await {
                if let Ok(info) = s.info().await {
                    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                    if let Some(i) =
                        leader.and_then(|l| self.nodes.iter().position(|n| n.name == l))
                    {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("stream {stream} has no leader after 20 s");
    }

    /// The node the process `pid` holds a client connection to, if any (read
    /// off `ss`: which node's client port its established sockets reach).
    pub fn node_of(&self, pid: u32) -> Option<usize> {
        let out = std::process::Command::new("ss")
            .args(["-tnpH", "state", "established"])
            .output()
            .expect("run ss (iproute2)");
        let tag = format!("pid={pid},");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&tag))
            .find_map(|l| {
                let peer = l.split_whitespace().nth(3)?;
                self.nodes
                    .iter()
                    .position(|n| peer == format!("127.0.0.1:{}", n.client_port))
            })
    }

    /// Makes node `target` the leader of `stream`: asks the leader to step
    /// down until the election lands on `target` (at most 20 times).
    pub async fn move_leader(&self, js: &jetstream::Context, stream: &str, target: usize) {
        let client = crate::connect_nats(&self.url()).await;
        for _ in 0..20 {
            if self.stream_leader(js, stream).await == target {
                return;
            }
            let _ = client
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    "".into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the leadership of {stream} did not land on n{target} in 20 step-downs");
    }

    /// Kills node `i` (SIGKILL); its store stays for [`NatsCluster::restart`].
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts node `i` again on its ports and store, and waits until it
    /// listens.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.spawn(i);
        self.wait_listening(i).await;
    }

    /// Stops node `i` with SIGSTOP: its sockets stay open but it answers
    /// nothing (a partition the other nodes only notice by timeouts).
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Resumes a node stopped by [`NatsCluster::pause`] (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// Waits until every running node reports the stream `stream` as current
    /// on all its replicas (no replica lagging or offline).
    pub async fn wait_stream_current(&self, js: &jetstream::Context, stream: &str) {
        for _ in 0..600 {
            if let Ok(mut s) = js.get_stream(stream).await {
                if let Ok(info) = s.info().await {
                    if let Some(c) = &info.cluster {
                        let replicas = info.config.num_replicas;
                        if c.leader.is_some()
                            && c.replicas.len() + 1 == replicas
                            && c.replicas.iter().all(|r| r.current && !r.offline)
                        {
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the replicas of stream {stream} did not all become current within 60 s");
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i]
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("node is running");
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.config.with_extension("log"))
            .expect("node log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server (set NATS_SERVER_BIN if it is not in /usr/sbin or PATH)");
        node.child = Some(child);
    }

    async fn wait_listening(&mut self, i: usize) {
        let port = self.nodes[i].client_port;
        let child = self.nodes[i].child.as_mut().expect("spawned");
        assert!(
            listening(child, port).await,
            "cluster node n{i} did not listen on port {port} within 5 s (port taken?)"
        );
    }

    /// Waits until JetStream answers account requests (a meta leader exists).
    async fn wait_ready(&self) {
        let client = crate::connect_nats(&self.url()).await;
        // The raw API answer: its typed form (`query_account`) differs
        // between client and server versions.
        let mut last = None;
        for _ in 0..300 {
            if let Ok(Ok(reply)) = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", "".into()),
            )
            .await
            {
                let answer: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                if answer.get("error").is_none() && answer.get("type").is_some() {
                    return;
                }
                last = Some(answer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the JetStream cluster elected no meta leader within 30 s: {last:?}");
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                if let Some(pid) = child.id() {
                    // A paused node must run again to die of SIGKILL promptly.
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid.to_string()])
                        .status();
                }
                let _ = child.start_kill();
            }
        }
        if std::thread::panicking() {
            // A failed test keeps the nodes' logs.
            eprintln!("the cluster's logs: {}/n*.log", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
