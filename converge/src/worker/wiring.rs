//! Checking a worker's wiring before anything starts: names that must agree,
//! consumers their streams can feed, settings that would be overwritten.
//! Every refusal names what disagrees and how to fix it.

use std::collections::{BTreeMap, BTreeSet};

use converge_handlers::ConsumerConfig;
use converge_outbox::{subjects_overlap, StreamConfig};
use sqlx::PgPool;

use super::{StartConsumer, Worker, WorkerError};

fn config_error(message: String) -> WorkerError {
    WorkerError::Config(message)
}

/// A NATS subject token: non-empty, without `.`, wildcards or whitespace.
fn is_token(s: &str) -> bool {
    !s.is_empty() && !s.contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
}

impl Worker {
    /// The stream the registrations' events arrive on: the relay's, or the
    /// one given with [`Worker::stream`] (they must agree).
    fn event_stream(&self) -> Result<Option<&StreamConfig>, WorkerError> {
        match (&self.relay, &self.stream) {
            (Some(relay), Some(stream))
                if relay.stream.name != stream.name
                    || relay.stream.subject_prefix != stream.subject_prefix =>
            {
                Err(config_error(format!(
                    "Worker::stream is {:?} (prefix {:?}) but the relay publishes to {:?} \
                     (prefix {:?}): drop Worker::stream, the relay's stream is used",
                    stream.name,
                    stream.subject_prefix,
                    relay.stream.name,
                    relay.stream.subject_prefix
                )))
            }
            (Some(relay), _) => Ok(Some(&relay.stream)),
            (None, stream) => Ok(stream.as_ref()),
        }
    }

    /// Checks what can be checked without the database or NATS.
    pub(super) fn validate(&self) -> Result<(), WorkerError> {
        if let Some(problem) = self.problems.first() {
            return Err(config_error(problem.clone()));
        }
        // Sweeps and reconcilers name control-plane subjects.
        for (what, name) in self
            .sweeps
            .iter()
            .map(|n| ("sweep", n))
            .chain(self.reconcilers.keys().map(|n| ("reconciler", n)))
        {
            if self.control_plane && !is_token(name) {
                return Err(config_error(format!(
                    "{what} name {name:?} must be a NATS subject token (no '.', '*', '>' or spaces): \
                     operators reach it on converge.control.<application>.{what}.<name>"
                )));
            }
        }
        if !is_token(&self.application) {
            return Err(config_error(format!(
                "application name {:?} must be a NATS subject token: non-empty, without '.', '*', '>' or spaces",
                self.application
            )));
        }
        if self.instance.is_empty() {
            return Err(config_error("instance name must not be empty".into()));
        }
        if let Some(relay) = &self.relay {
            if !relay.instance_name.is_empty() && relay.instance_name != self.instance {
                return Err(config_error(format!(
                    "RelayConfig::instance_name is {:?} but the worker's instance name is {:?}: \
                     a worker's parts share one name; set it once with Worker::instance_name",
                    relay.instance_name, self.instance
                )));
            }
        }
        self.event_stream()?;
        self.check_identities()?;
        let mut names: Vec<&str> = self.consumers.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(config_error(format!(
                "two consumers are named {:?}; a reconciler has one consumer per worker \
                 (list several events with .on::<A>().on::<B>())",
                w[0]
            )));
        }
        Ok(())
    }

    /// One reconciler value under one name, one type per name: a consumer
    /// and a sweep of the same reconciler under two names take two leases for
    /// the same key and run it twice at once. The same type under two names
    /// with two values may be deliberate (one reconciler type for two key
    /// sets) or that mistake: it is logged at WARN.
    fn check_identities(&self) -> Result<(), WorkerError> {
        let mut by_value: BTreeMap<usize, &str> = BTreeMap::new();
        let mut by_name: BTreeMap<&str, &str> = BTreeMap::new();
        let mut names_of_type: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for identity in &self.identities {
            let name = identity.name.as_str();
            let type_name = identity.type_name;
            if let Some(other) = by_value.insert(identity.address, name) {
                if other != name {
                    return Err(config_error(format!(
                        "one {type_name} is registered under two names, {other:?} and {name:?}: \
                         its consumer and sweep would take different leases for the same key and \
                         run it twice at once; register it once, \
                         worker.reconciler({other:?}, r).on::<Event>().sweep(timing, candidates), \
                         and name the sweep's reconciler {other:?}"
                    )));
                }
            }
            if let Some(other_type) = by_name.insert(name, type_name) {
                if other_type != type_name {
                    return Err(config_error(format!(
                        "reconciler name {name:?} is registered for two types, {other_type} and \
                         {type_name}: one name is one reconciler (its leases, dead letters and \
                         manual runs)"
                    )));
                }
            }
            names_of_type.entry(type_name).or_default().insert(name);
        }
        for (type_name, names) in names_of_type.iter().filter(|(_, n)| n.len() > 1) {
            tracing::warn!(
                reconciler_type = type_name,
                names = ?names,
                "one reconciler type is registered under several names: right if each name \
                 serves other keys; if a consumer and a sweep of the same keys got different \
                 names, they run a key twice at once (register it once with Worker::reconciler)"
            );
        }
        Ok(())
    }

    /// Each consumer's final configuration: derived from the event stream
    /// for registrations, checked against the worker for hand-made ones.
    pub(super) fn resolve_consumers(
        &mut self,
    ) -> Result<Vec<(ConsumerConfig, StartConsumer)>, WorkerError> {
        let stream = self.event_stream()?.cloned();
        let mut out = Vec::new();
        for planned in std::mem::take(&mut self.consumers) {
            let mut config = match planned.config {
                Some(config) => config,
                None => {
                    let Some(stream) = &stream else {
                        return Err(config_error(format!(
                            "reconciler {:?} listens to {} but the worker has no stream: add \
                             .relay(RelayConfig::new(stream)) or, when another process relays, \
                             .stream(StreamConfig::new(name, prefix))",
                            planned.name,
                            planned
                                .events
                                .iter()
                                .map(|(a, e)| format!("{a}.{e}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    };
                    let subjects: Vec<String> = planned
                        .events
                        .iter()
                        .map(|(aggregate, event)| stream.subject(aggregate, event))
                        .collect();
                    let mut config = ConsumerConfig::new(
                        planned.name.as_str(),
                        stream.name.as_str(),
                        subjects[0].as_str(),
                    );
                    config.filter_subjects.clone_from(&subjects);
                    if let Some(settings) = planned.settings {
                        settings(&mut config);
                    }
                    if config.name != planned.name
                        || config.stream != stream.name
                        || config.filter_subjects != subjects
                    {
                        return Err(config_error(format!(
                            "consumer_settings of reconciler {:?} changed its name, stream or \
                             subjects (to {:?} on {:?}, {:?}): they come from the registration; \
                             register another reconciler or add events with .on::<E>()",
                            planned.name, config.name, config.stream, config.filter_subjects
                        )));
                    }
                    config
                }
            };
            if let Some(upcasters) = &self.upcasters {
                config.upcasters = upcasters.clone();
            }
            if !config.instance_name.is_empty() && config.instance_name != self.instance {
                return Err(config_error(format!(
                    "ConsumerConfig::instance_name of consumer {:?} is {:?} but the worker's \
                     instance name is {:?}: a worker's parts share one name; set it once with \
                     Worker::instance_name",
                    config.name, config.instance_name, self.instance
                )));
            }
            if let Some(stream) = &stream {
                // The relay publishes `<prefix>.<aggregate type>.<event type>`.
                let published = format!("{}.*.*", stream.subject_prefix);
                if config.stream == stream.name {
                    if let Some(subject) = config
                        .filter_subjects
                        .iter()
                        .find(|s| !subjects_overlap(&published, s))
                    {
                        return Err(config_error(format!(
                            "consumer {:?} filters {subject:?} but the relay publishes {published:?} \
                             to stream {:?}: it would never receive an event; derive the subject \
                             from the event type (worker.reconciler(name, r).on::<Event>())",
                            config.name, stream.name
                        )));
                    }
                }
            }
            let mut config = config;
            config.instance_name.clone_from(&self.instance);
            out.push((config, planned.start));
        }
        Ok(out)
    }
}

/// Refuses a consumer whose filter subjects no subject of its stream, as the
/// server has it, can match. Streams that also source, mirror or transform
/// subjects are not judged; a missing stream is left to the consumer's own
/// start, which names it.
pub(super) async fn check_streams_carry(
    nats: &async_nats::Client,
    consumers: &[(ConsumerConfig, StartConsumer)],
) -> Result<(), WorkerError> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut seen: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    for (config, _) in consumers {
        if !seen.contains_key(&config.stream) {
            let subjects = match js.get_stream(&config.stream).await {
                Ok(mut stream) => match stream.info().await {
                    Ok(info) => {
                        let c = &info.config;
                        let derived = c.mirror.is_some()
                            || c.sources.as_ref().is_some_and(|s| !s.is_empty())
                            || c.subject_transform.is_some()
                            || c.subjects.is_empty();
                        (!derived).then(|| c.subjects.clone())
                    }
                    Err(_) => None,
                },
                Err(_) => None,
            };
            seen.insert(config.stream.clone(), subjects);
        }
        let Some(Some(subjects)) = seen.get(&config.stream) else {
            continue;
        };
        for filter in &config.filter_subjects {
            if !subjects.iter().any(|s| subjects_overlap(s, filter)) {
                return Err(config_error(format!(
                    "consumer {:?} filters {filter:?} but stream {:?} captures only {}: it would \
                     never receive an event; fix the subject or the stream",
                    config.name,
                    config.stream,
                    subjects.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Warns about session settings that let an abandoned transaction hold
/// back the relays (and keys' leases) for ever.
pub(super) async fn warn_about_session_settings(pool: &PgPool) {
    match sqlx::query_scalar::<_, String>(
        "SELECT current_setting('idle_in_transaction_session_timeout')",
    )
    .fetch_one(pool)
    .await
    {
        Ok(value) if value == "0" => tracing::warn!(
            "idle_in_transaction_session_timeout is 0 (off): a transaction left open by a \
             stuck client holds back the relays and the outbox's cleanup until someone kills it; \
             set it for the application's role, e.g. ALTER ROLE app SET \
             idle_in_transaction_session_timeout = '60s'"
        ),
        Ok(_) => {}
        Err(error) => tracing::debug!(%error, "could not read idle_in_transaction_session_timeout"),
    }
}
