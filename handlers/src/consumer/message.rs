//! One message: parse its headers, find its key, run it (waiting for a busy
//! key with progress acks), then ack, nak with backoff, or dead-letter it.

use super::*;

/// Reads converge's headers; `Err` names what is missing.
pub(super) fn parse(message: &Message) -> Result<EventHint, String> {
    let headers = message
        .headers
        .as_ref()
        .ok_or("no headers: not a converge event")?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let need = |name: &str| {
        get(name).ok_or_else(|| format!("missing header {name}: not a converge event"))
    };
    let event_id = need(HEADER_EVENT_ID)?
        .parse()
        .map_err(|e| format!("header {HEADER_EVENT_ID} is not a UUID: {e}"))?;
    let version = need(HEADER_AGGREGATE_VERSION)?
        .parse()
        .map_err(|e| format!("header {HEADER_AGGREGATE_VERSION} is not a number: {e}"))?;
    let mut all = BTreeMap::new();
    for (k, v) in headers.iter() {
        if let Some(first) = v.first() {
            all.insert(k.to_string(), first.as_str().to_owned());
        }
    }
    Ok(EventHint {
        event_id,
        aggregate_type: need(HEADER_AGGREGATE_TYPE)?,
        aggregate_id: need(HEADER_AGGREGATE_ID)?,
        version,
        event_type: need(HEADER_EVENT_TYPE)?,
        schema_version: match get(HEADER_SCHEMA_VERSION) {
            None => 1,
            Some(v) => v.parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(|| {
                format!("header {HEADER_SCHEMA_VERSION} is not a positive number: {v:?}")
            })?,
        },
        subject: message.subject.to_string(),
        occurred_at: get(HEADER_OCCURRED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
        traceparent: get(HEADER_TRACEPARENT).and_then(|t| TraceParent::parse(&t).ok()),
        headers: all,
        payload: message.payload.clone(),
    })
}

pub(super) async fn ack(message: &Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        // A lost ack means a redelivery, which the reconciler absorbs.
        tracing::warn!(%error, "ack failed; the event will be redelivered");
    }
}

/// Records a message that can never run (malformed, or its key cannot be
/// found) as a keyless dead letter and terminates it; if it cannot be
/// recorded, it comes back in 5 s: nothing is acknowledged unrecorded.
async fn refuse<R: Reconciler>(
    shared: &Shared<R>,
    message: &Message,
    trigger: &Trigger,
    error: &ReconcileError,
    attempt: u32,
    first_attempt_at: Option<DateTime<Utc>>,
) {
    let cfg = &shared.config;
    match dead_letter::record(
        &shared.pool,
        &cfg.name,
        "",
        trigger,
        error,
        attempt,
        first_attempt_at,
    )
    .await
    {
        Ok(_) => ack(message, AckKind::Term).await,
        Err(db) => {
            tracing::warn!(error = %db, "cannot record an event that cannot run; retrying later");
            ack(message, AckKind::Nak(Some(Duration::from_secs(5)))).await;
        }
    }
}

pub(super) async fn handle<R: Reconciler>(shared: &Shared<R>, message: Message) {
    let cfg = &shared.config;
    let (delivered, first_attempt_at) = match message.info() {
        Ok(info) => (
            info.delivered.max(1),
            DateTime::<Utc>::from_timestamp(
                info.published.unix_timestamp(),
                info.published.nanosecond(),
            ),
        ),
        Err(_) => (1, None),
    };
    let attempt = delivered as u32;
    let hint = match parse(&message) {
        Ok(hint) => hint,
        Err(reason) => {
            // Not ours to run, never will be: record it and let the rest flow.
            let error = ReconcileError::permanent(reason);
            let trigger = Trigger::Manual {
                reason: Some(format!("malformed message on {}", message.subject)),
            };
            refuse(
                shared,
                &message,
                &trigger,
                &error,
                attempt,
                first_attempt_at,
            )
            .await;
            return;
        }
    };
    let event_id = hint.event_id;
    let key = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.reconciler.key_for(&hint)
    })) {
        Ok(Some(key)) => key,
        Ok(None) => {
            ack(&message, AckKind::Ack).await;
            return;
        }
        Err(_) => {
            // A panicking `key_for` panics again on every delivery: a dead
            // letter, not a loop.
            let error = ReconcileError::permanent("key_for panicked on this event");
            let trigger = Trigger::Event(hint);
            refuse(shared, &message, &trigger, &error, 1, first_attempt_at).await;
            return;
        }
    };
    // Attempts are deliveries that could run: the rounds this event was put
    // back because its key was busy do not count. The first delivery has
    // nothing to read.
    let busy_rounds = if delivered > 1 {
        match attempts::busy_rounds(&shared.pool, &cfg.name, event_id).await {
            Ok(n) => n,
            Err(db) => {
                tracing::warn!(error = %db, "cannot read the event's attempts; trying again later");
                ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        }
    } else {
        0
    };
    let attempt = (delivered as u32).saturating_sub(busy_rounds).max(1);
    let ctx = Context::new(
        shared.pool.clone(),
        Trigger::Event(hint),
        attempt,
        shared.limits.clone(),
        shared.claimant.clone(),
    )
    .with_key_lease(cfg.key_lease)
    .with_upcasters(cfg.upcasters.clone());
    let lock_deadline = tokio::time::Instant::now() + cfg.lock_wait;
    // Progress acks every third of `ack_wait`, while the reconcile runs and
    // while the event waits for its key.
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.ack_wait / 3,
        cfg.ack_wait / 3,
    );
    let result = loop {
        let run = run_key_leased(
            &shared.reconciler,
            &cfg.name,
            &ctx,
            &key,
            &shared.leases,
            false,
        );
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = progress.tick() => ack(&message, AckKind::Progress).await,
            }
        };
        match result {
            RunResult::Busy if tokio::time::Instant::now() < lock_deadline => {
                let pause =
                    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..80)));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        _ = progress.tick() => ack(&message, AckKind::Progress).await,
                    }
                }
            }
            other => break other,
        }
    };
    match result {
        RunResult::Done(_) => {
            ack(&message, AckKind::Ack).await;
            if busy_rounds > 0 {
                attempts::forget(&shared.pool, &cfg.name, event_id).await;
            }
        }
        // Still busy after `lock_wait`: back in a moment, no attempt used.
        RunResult::Busy => {
            if let Err(db) = attempts::count_busy(&shared.pool, &cfg.name, event_id).await {
                // Uncounted, the round costs an attempt: never one more.
                tracing::warn!(error = %db, "cannot count a busy round");
            }
            ack(&message, AckKind::Nak(Some(Duration::from_millis(500)))).await
        }
        RunResult::Failed(error) if error.is_retryable() && attempt < cfg.retry.max_attempts => {
            let delay = cfg.retry.delay(attempt, error.retry_after_hint());
            crate::metrics::count_retry(&cfg.name);
            ack(&message, AckKind::Nak(Some(delay))).await;
        }
        RunResult::Failed(error) => {
            let given_up = dead_letter::dead_letter_key(
                &shared.reconciler,
                &cfg.name,
                &ctx,
                &key,
                &error,
                attempt,
                first_attempt_at,
                cfg.lock_wait,
            )
            .await;
            match given_up {
                Ok(_) => {
                    ack(&message, AckKind::Term).await;
                    if busy_rounds > 0 {
                        attempts::forget(&shared.pool, &cfg.name, event_id).await;
                    }
                }
                Err(db) => {
                    // Never acknowledge what is not recorded: try again later.
                    tracing::warn!(error = %db, "cannot record a dead letter; the event stays pending");
                    ack(&message, AckKind::Nak(Some(cfg.retry.max_backoff))).await;
                }
            }
        }
    }
}
