//! Binding the durable consumer: create it, or update an existing one's
//! settings, or refuse naming each setting JetStream will not change.

use super::*;

/// Creates the durable consumer, or binds the existing one: an existing one
/// with other settings (after a configuration change) is updated where
/// JetStream allows it; otherwise starting fails naming each setting.
pub(super) async fn bind_consumer(
    stream: &jetstream::stream::Stream,
    config: &ConsumerConfig,
    wanted: pull::Config,
) -> Result<jetstream::consumer::Consumer<pull::Config>, ConsumerError> {
    let js_error = |operation: &'static str| {
        move |e: async_nats::Error| ConsumerError::JetStream {
            operation,
            source: e,
        }
    };
    let existing = match stream.consumer_info(&config.name).await {
        Ok(info) => Some(info.config),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => None,
        Err(e) => return Err(js_error("read the consumer")(e.into())),
    };
    let differences = existing
        .as_ref()
        .map(|have| settings_differences(have, &wanted))
        .unwrap_or_default();
    if existing.is_some() && differences.is_empty() {
        return stream
            .get_consumer(&config.name)
            .await
            .map_err(|e| js_error("bind the consumer")(e));
    }
    let wanted_filters = subjects(&wanted.filter_subject, &wanted.filter_subjects);
    match stream.create_consumer(wanted).await {
        Ok(consumer) => {
            // A server older than 2.10 ignores `filter_subjects` and makes
            // an unfiltered consumer: every event would reach this reconciler.
            let made = &consumer.cached_info().config;
            let made_filters = subjects(&made.filter_subject, &made.filter_subjects);
            if made_filters != wanted_filters {
                let _ = stream.delete_consumer(&config.name).await;
                return Err(ConsumerError::Config(format!(
                    "the NATS server made consumer {:?} with filter subjects {made_filters:?}, \
                     not {wanted_filters:?}: several subjects per consumer need NATS 2.10 or \
                     later; upgrade, or give each event type its own reconciler",
                    config.name
                )));
            }
            if !differences.is_empty() {
                tracing::warn!(
                    consumer = %config.name,
                    changed = %differences.join("; "),
                    "updated the existing durable consumer's settings"
                );
            }
            Ok(consumer)
        }
        Err(e) if !differences.is_empty() => Err(ConsumerError::SettingsMismatch {
            consumer: config.name.clone(),
            stream: config.stream.clone(),
            differences,
            reason: e.to_string(),
        }),
        Err(e) => Err(js_error("create consumer")(e.into())),
    }
}

/// A consumer's filter subjects, sorted and joined: the single and the
/// several forms compare equal.
fn subjects(one: &str, many: &[String]) -> String {
    let mut all: Vec<String> = many.to_vec();
    if !one.is_empty() {
        all.push(one.to_owned());
    }
    all.sort();
    all.join(",")
}

/// The settings converge sets that differ between the existing durable
/// consumer and the one configured, e.g. `ack_wait 30s → 2s`.
fn settings_differences(have: &jetstream::consumer::Config, want: &pull::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |name: &str, have: String, want: String| {
        if have != want {
            out.push(format!("{name} {have} → {want}"));
        }
    };
    differ(
        "ack_policy",
        format!("{:?}", have.ack_policy),
        format!("{:?}", want.ack_policy),
    );
    differ(
        "ack_wait",
        format!("{:?}", have.ack_wait),
        format!("{:?}", want.ack_wait),
    );
    differ(
        "max_ack_pending",
        have.max_ack_pending.to_string(),
        want.max_ack_pending.to_string(),
    );
    differ(
        "filter subjects",
        subjects(&have.filter_subject, &have.filter_subjects),
        subjects(&want.filter_subject, &want.filter_subjects),
    );
    out
}
