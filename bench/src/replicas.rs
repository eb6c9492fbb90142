//! `replicas`: the publish cost of replication. Starts a private three-node
//! JetStream cluster on loopback (`converge_tests::NatsCluster`, the
//! integration tests' starter; `NATS_SERVER_BIN` picks the binary) and, in one
//! run, for each replica count: raw publishing into a stream of that many
//! replicas, then one relay draining an outbox into another (a `scale` drain:
//! partitions settled before the clock, stream read back and checked for
//! per-aggregate order).

use serde_json::json;

use crate::common::{emit, round2, round3, Env, Result};
use crate::scale::{drain, Drain, DrainSpec};

/// Options of the `replicas` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReplicasArgs {
    /// Events per drain (and raw messages per baseline).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Replica counts to measure, in this order (at most 3: the cluster's size).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 3])]
    replicas: Vec<usize>,
    /// Relay processes per drain.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Acknowledgements in flight for the raw-publish baseline.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// `RelayConfig::batch_size` of the relay.
    #[arg(long, default_value_t = 2_000)]
    batch_size: usize,
}

/// Runs the `replicas` scenario.
pub(crate) async fn run(env: &Env, args: &ReplicasArgs) -> Result<()> {
    if let Some(r) = args.replicas.iter().find(|r| !(1..=3).contains(*r)) {
        return Err(format!("--replicas {r}: the cluster has three nodes").into());
    }
    eprintln!("[replicas] starting a three-node JetStream cluster");
    let cluster = converge_tests::NatsCluster::start(3).await;
    let cluster_env = Env {
        database_url: env.database_url.clone(),
        nats_url: cluster.url(),
    };
    let version = cluster_env.nats().await?.server_info().version;
    let mut drains: Vec<Drain> = Vec::new();
    for &replicas in &args.replicas {
        let spec = DrainSpec {
            events: args.events,
            instances: args.instances.max(1),
            replicas,
            window: args.window,
            batch_size: args.batch_size,
            include_handout: false,
        };
        let d = drain(&cluster_env, spec).await?;
        println!(
            "R{replicas} {:>8} events: raw JetStream {:>9.0} msgs/s ({:.2} s), relay x{} \
             {:>9.0} events/s ({:.2} s), relay/raw {:.3}; order checked ({} messages)",
            d.spec.events,
            d.raw_rate(),
            d.raw_secs,
            d.spec.instances,
            d.rate(),
            d.relay_secs,
            d.ratio(),
            d.order.messages,
        );
        drains.push(d);
    }
    let of = |r: usize| drains.iter().find(|d| d.spec.replicas == r);
    let (raw_r3_r1, relay_r3_r1) = match (of(1), of(3)) {
        (Some(one), Some(three)) => {
            let raw = three.raw_rate() / one.raw_rate();
            let relay = three.rate() / one.rate();
            println!("R3/R1: raw {raw:.3}, relay {relay:.3} (nats-server {version})");
            (Some(round3(raw)), Some(round3(relay)))
        }
        _ => (None, None),
    };
    emit(&json!({
        "scenario": "replicas",
        "nats_server": version,
        "cluster_nodes": 3,
        "unit": "events/s",
        "raw_r3_over_r1": raw_r3_r1,
        "relay_r3_over_r1": relay_r3_r1,
        "rates": drains.iter().map(|d| json!({
            "replicas": d.spec.replicas,
            "raw": round2(d.raw_rate()),
            "relay": round2(d.rate()),
        })).collect::<Vec<_>>(),
        "runs": drains.iter().map(Drain::json).collect::<Vec<_>>(),
    }));
    drop(cluster);
    Ok(())
}
