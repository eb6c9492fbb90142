//! Partition leases: which relay instance publishes which partition.
//!
//! Every time is taken from the database clock (`now()`), never from the
//! instance, so clock skew between nodes cannot make two owners. Locally the
//! instance keeps a conservative deadline on its monotonic clock: the lease
//! was renewed no earlier than the moment the renewal was sent, so it lasts at
//! least until then + `lease_ttl`.

use std::sync::Arc;

use sqlx::Row;
use tokio::time::Instant;

use super::{Owned, Shared};
use crate::metrics as metrics_names;

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Sets `converge_relay_partitions_owned` for this instance.
pub(super) fn gauge_owned(shared: &Shared, held: usize) {
    metrics::gauge!(metrics_names::RELAY_PARTITIONS_OWNED, "instance" => shared.config.instance_name.clone())
        .set(held as f64);
}

/// Counts one partition lease lost without handing it back.
pub(super) fn count_loss(shared: &Shared) {
    metrics::counter!(metrics_names::RELAY_PARTITION_LOSSES, "instance" => shared.config.instance_name.clone())
        .increment(1);
}

/// Records this instance as live.
pub(super) async fn register(shared: &Shared) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO converge.relay_instances (instance_id, name, protocol) VALUES ($1, $2, $3) \
         ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), protocol = $3",
    )
    .bind(shared.instance_id)
    .bind(&shared.config.instance_name)
    .bind(RELAY_PROTOCOL)
    .execute(&shared.pool)
    .await?;
    *shared.last_heartbeat.lock().expect("relay heartbeat lock") = Some(Instant::now());
    Ok(())
}

/// What this relay publishes, for `converge.relay_instances.protocol`: 2
/// sends each event's schema version (`Converge-Schema-Version`); relays of
/// earlier converge versions leave it NULL and send none.
pub(crate) const RELAY_PROTOCOL: i32 = 2;

/// Hands every partition back and removes the instance, so that the others
/// take over at their next heartbeat instead of after the lease expires.
pub(super) async fn deregister(shared: &Shared) -> Result<(), sqlx::Error> {
    let mut tx = shared.pool.begin().await?;
    sqlx::query(
        "UPDATE converge.relay_partitions \
         SET owner_id = NULL, owner_name = NULL, lease_until = NULL, updated_at = now() \
         WHERE owner_id = $1",
    )
    .bind(shared.instance_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM converge.relay_instances WHERE instance_id = $1")
        .bind(shared.instance_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    shared.owned.lock().expect("relay state lock").clear();
    gauge_owned(shared, 0);
    tracing::info!(instance_id = %shared.instance_id, "relay deregistered");
    Ok(())
}

/// Renews, rebalances and claims leases every `heartbeat_interval` until cancelled.
pub(super) async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(shared.config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // `start` already ran the first tick
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Err(error) = tick(&shared).await {
            // Leases run out on their own; the publisher stops at the local deadline.
            tracing::warn!(%error, "relay heartbeat failed; retrying at the next interval");
        }
    }
}

/// Forgets every partition without touching the database (their rows belong
/// to another cluster, or to a clock that changed): the next heartbeat claims
/// afresh, reading the cursors again.
pub(super) fn forget_all(shared: &Shared) {
    let mut owned = shared.owned.lock().expect("relay state lock");
    if !owned.is_empty() {
        count_loss(shared);
    }
    owned.clear();
    gauge_owned(shared, 0);
}

/// Checks that the database is still the cluster (and clock) the relay works
/// with; re-bases and starts over with fresh claims when it is not.
async fn check_clock(shared: &Shared) -> Result<(), sqlx::Error> {
    let known = *shared.clock.lock().expect("relay clock lock");
    if crate::clock::unchanged(&shared.pool, known).await? {
        return Ok(());
    }
    let clock = crate::clock::check(&shared.pool).await?;
    tracing::warn!(
        system_identifier = clock.system_identifier,
        tx_offset = clock.tx_offset,
        "the relay's database changed cluster or clock; claiming its partitions afresh"
    );
    *shared.clock.lock().expect("relay clock lock") = clock;
    forget_all(shared);
    Ok(())
}

/// Whether this instance should hand its partitions over (publishing has
/// failed for `handover_after`) or may claim again (it can reach NATS).
async fn check_health(shared: &Shared) -> bool {
    let (failing_since, handed_over) = {
        let h = shared.health.lock().expect("relay health lock");
        (h.failing_since, h.handed_over)
    };
    if let Some(at) = handed_over {
        // Claim again once NATS answers, and not sooner than handover_after:
        // a relay that can reach the server but not publish does not bounce
        // its partitions around faster than that.
        if at.elapsed() < shared.config.handover_after {
            return false;
        }
        let reachable = shared.client.connection_state()
            == async_nats::connection::State::Connected
            && tokio::time::timeout(
                shared.config.publish_timeout,
                shared.js.get_stream(&shared.config.stream.name),
            )
            .await
            .is_ok_and(|r| r.is_ok());
        if reachable {
            let mut h = shared.health.lock().expect("relay health lock");
            h.handed_over = None;
            h.failing_since = None;
            tracing::info!("relay reaches NATS again; claiming partitions");
            return true;
        }
        return false;
    }
    let failing = failing_since.is_some_and(|t| t.elapsed() >= shared.config.handover_after);
    if failing {
        shared.health.lock().expect("relay health lock").handed_over = Some(Instant::now());
        let mut owned = shared.owned.lock().expect("relay state lock");
        for o in owned.values_mut() {
            o.release = true;
        }
        tracing::warn!(
            partitions = owned.len(),
            after = ?shared.config.handover_after,
            "relay cannot publish: handing its partitions to the other relays until NATS answers"
        );
        shared.wake.notify_one();
        return false;
    }
    true
}

/// One heartbeat: mark the instance live, renew held leases, then release the
/// excess over a fair share or claim free partitions up to it.
pub(super) async fn tick(shared: &Shared) -> Result<(), sqlx::Error> {
    let cfg = &shared.config;
    let sent_at = Instant::now();
    check_clock(shared).await?;
    let healthy = check_health(shared).await;
    // Others count only the instances that can publish.
    let live: i64 = sqlx::query_scalar(
        "WITH beat AS ( \
             INSERT INTO converge.relay_instances (instance_id, name, publishing, protocol) \
             VALUES ($1, $2, $4, $5) \
             ON CONFLICT (instance_id) DO UPDATE \
                 SET heartbeat_at = now(), publishing = $4, protocol = $5), \
         gone AS ( \
             DELETE FROM converge.relay_instances \
             WHERE heartbeat_at < now() - make_interval(secs => $3 * 3) AND instance_id <> $1) \
         SELECT 1 + count(*) FROM converge.relay_instances \
         WHERE heartbeat_at >= now() - make_interval(secs => $3) AND instance_id <> $1 \
           AND publishing",
    )
    .bind(shared.instance_id)
    .bind(&cfg.instance_name)
    .bind(secs(cfg.lease_ttl))
    .bind(healthy)
    .bind(RELAY_PROTOCOL)
    .fetch_one(&shared.pool)
    .await?;
    // After an outage of its own (no heartbeat for a lease), the instance
    // renews what it holds but leaves other instances' expired leases alone
    // for one more lease: they were cut off too and get to write what they
    // published before anyone sends it again.
    let returning = {
        let mut last = shared.last_heartbeat.lock().expect("relay heartbeat lock");
        let returning = last.is_some_and(|t| sent_at.duration_since(t) > cfg.lease_ttl);
        *last = Some(sent_at);
        if returning {
            *shared
                .claim_others_after
                .lock()
                .expect("relay heartbeat lock") = Some(sent_at + cfg.lease_ttl);
        }
        returning
    };
    if returning {
        tracing::info!(
            "relay heartbeat is back after an outage; leaving others' expired leases for one lease"
        );
    }

    // Renew exactly the leases this instance knows it holds: a row owned in the
    // database but unknown here (a claim whose reply was lost) runs out and is
    // claimed again, instead of being renewed and never published.
    let (known_partitions, known_epochs): (Vec<i32>, Vec<i64>) = {
        let owned = shared.owned.lock().expect("relay state lock");
        owned.iter().map(|(p, o)| (*p, o.epoch)).unzip()
    };
    let renewed = sqlx::query(
        "UPDATE converge.relay_partitions p \
         SET lease_until = now() + make_interval(secs => $2), updated_at = now() \
         FROM unnest($3::int[], $4::bigint[]) AS m(partition, epoch) \
         WHERE p.partition = m.partition AND p.epoch = m.epoch AND p.owner_id = $1 \
         RETURNING p.partition, p.epoch",
    )
    .bind(shared.instance_id)
    .bind(secs(cfg.lease_ttl))
    .bind(&known_partitions)
    .bind(&known_epochs)
    .fetch_all(&shared.pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.relay_partitions")
        .fetch_one(&shared.pool)
        .await?;

    let deadline = sent_at + cfg.lease_ttl;
    let share = if healthy {
        ((total + live - 1) / live.max(1)) as usize
    } else {
        0
    };
    let need = {
        let mut owned = shared.owned.lock().expect("relay state lock");
        let held: std::collections::HashMap<i32, i64> =
            renewed.iter().map(|r| (r.get(0), r.get(1))).collect();
        owned.retain(|partition, o| {
            let kept = held.get(partition) == Some(&o.epoch);
            if !kept {
                tracing::warn!(partition, "relay partition lease lost");
                count_loss(shared);
            }
            kept
        });
        gauge_owned(shared, owned.len());
        for o in owned.values_mut() {
            o.deadline = deadline;
        }
        let keeping = owned.values().filter(|o| !o.release).count();
        if keeping > share {
            // Hand back the highest partitions; the publisher releases them
            // between batches so no batch is cut in half.
            for (_, o) in owned
                .iter_mut()
                .rev()
                .filter(|(_, o)| !o.release)
                .take(keeping - share)
            {
                o.release = true;
            }
            shared.wake.notify_one();
            0
        } else {
            share - keeping
        }
    };
    if need > 0 {
        let only_free = shared
            .claim_others_after
            .lock()
            .expect("relay heartbeat lock")
            .is_some_and(|t| Instant::now() < t);
        let claimed = sqlx::query(
            "UPDATE converge.relay_partitions p \
             SET owner_id = $1, owner_name = $2, lease_until = now() + make_interval(secs => $3), \
                 epoch = p.epoch + 1, updated_at = now() \
             WHERE p.partition IN ( \
                 SELECT partition FROM converge.relay_partitions \
                 WHERE owner_id IS NULL OR (lease_until < now() AND NOT $5) \
                 ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING p.partition, p.epoch, p.cursor_tx_order, p.cursor_id",
        )
        .bind(shared.instance_id)
        .bind(&cfg.instance_name)
        .bind(secs(cfg.lease_ttl))
        .bind(need as i64)
        .bind(only_free)
        .fetch_all(&shared.pool)
        .await?;
        if !claimed.is_empty() {
            let mut owned = shared.owned.lock().expect("relay state lock");
            for r in &claimed {
                let partition: i32 = r.get(0);
                owned.insert(
                    partition,
                    Owned {
                        epoch: r.get(1),
                        cursor: (r.get(2), r.get(3)),
                        deadline,
                        release: false,
                    },
                );
            }
            gauge_owned(shared, owned.len());
            tracing::info!(
                claimed = claimed.len(),
                held = owned.len(),
                share,
                live,
                "relay claimed partitions"
            );
            shared.wake.notify_one();
        }
    }
    Ok(())
}

/// Releases the partitions marked for hand-back (called by the publisher
/// between batches). Fenced by epoch: a lease already taken over is left alone.
pub(super) async fn release_marked(shared: &Shared) -> Result<(), sqlx::Error> {
    let marked: Vec<(i32, i64)> = {
        let owned = shared.owned.lock().expect("relay state lock");
        owned
            .iter()
            .filter(|(_, o)| o.release)
            .map(|(p, o)| (*p, o.epoch))
            .collect()
    };
    if marked.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = marked.iter().map(|m| m.0).collect();
    let epochs: Vec<i64> = marked.iter().map(|m| m.1).collect();
    sqlx::query(
        "UPDATE converge.relay_partitions p \
         SET owner_id = NULL, owner_name = NULL, lease_until = NULL, updated_at = now() \
         FROM unnest($2::int[], $3::bigint[]) AS m(partition, epoch) \
         WHERE p.partition = m.partition AND p.epoch = m.epoch AND p.owner_id = $1",
    )
    .bind(shared.instance_id)
    .bind(&partitions)
    .bind(&epochs)
    .execute(&shared.pool)
    .await?;
    let mut owned = shared.owned.lock().expect("relay state lock");
    for (p, epoch) in &marked {
        // Only the lease released here: a newer claim of it stays.
        if owned.get(p).is_some_and(|o| o.epoch == *epoch) {
            owned.remove(p);
        }
    }
    gauge_owned(shared, owned.len());
    tracing::info!(
        released = partitions.len(),
        held = owned.len(),
        "relay released partitions"
    );
    Ok(())
}
