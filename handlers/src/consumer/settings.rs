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
    match stream.create_consumer(wanted).await {
        Ok(consumer) => {
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
    let subjects = |one: &str, many: &[String]| {
        let mut all: Vec<String> = many.to_vec();
        if !one.is_empty() {
            all.push(one.to_owned());
        }
        all.sort();
        all.join(",")
    };
    differ(
        "filter subjects",
        subjects(&have.filter_subject, &have.filter_subjects),
        subjects(&want.filter_subject, &want.filter_subjects),
    );
    out
}
