//! NATS authorization for an application's control plane and stream: the
//! `permissions` block a `nats-server` user of each role needs.
//!
//! NATS, not converge, enforces them: only workers may join the workers'
//! queue group, only operators may send control requests, only workers may
//! answer them (on the operators' own inbox prefix), viewers read. Each role
//! uses an inbox prefix of its own ([`inbox_prefix`]; `NATS_INBOX_PREFIX`),
//! so no other client can read, or answer on, another role's inbox.
//!
//! ```
//! use converge::control::{nats_permissions, NatsRole, StreamScope};
//! let scope = StreamScope::new("ORDERS", "orders");
//! let block = nats_permissions("invoicing", NatsRole::Viewer, &scope).unwrap();
//! assert!(block.contains("\"_INBOX_invoicing_viewer.>\""));
//! assert!(!block.contains("converge.control"));
//! // Names are checked: no wildcard, whitespace, `$` or `_INBOX` prefix.
//! assert!(nats_permissions("app\n}", NatsRole::Viewer, &scope).is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use super::{control_subject, CONTROL_QUEUE_GROUP};

/// A NATS user's role toward one converge application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NatsRole {
    /// Relays events, consumes them, answers control requests.
    Worker,
    /// Sends control requests (`converge sweep run`, retries), replays the
    /// outbox and reads what a viewer reads.
    Operator,
    /// Reads the stream's and consumers' state (`converge status`).
    Viewer,
}

impl NatsRole {
    /// The role's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            NatsRole::Worker => "worker",
            NatsRole::Operator => "operator",
            NatsRole::Viewer => "viewer",
        }
    }
}

impl fmt::Display for NatsRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A NATS role name that is not `worker`, `operator` or `viewer`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown NATS role {0:?}: expected worker, operator or viewer")]
pub struct UnknownNatsRole(pub String);

impl FromStr for NatsRole {
    type Err = UnknownNatsRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [NatsRole::Worker, NatsRole::Operator, NatsRole::Viewer]
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownNatsRole(s.to_owned()))
    }
}

/// A name `nats_permissions` will not write into a permissions block.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{what} {value:?}: use subject tokens of letters, digits, '_' and '-' (a prefix may have \
     several, '.'-separated), not starting with '$' or '_INBOX'"
)]
pub struct InvalidPermissionName {
    /// Which argument (`application`, `stream`, `subject prefix`).
    pub what: &'static str,
    /// The value refused.
    pub value: String,
}

/// Whether `s` is a plain subject token: no wildcard, separator, space,
/// control character or quote can reach the configuration.
fn plain_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn checked(what: &'static str, value: &str, tokens: bool) -> Result<(), InvalidPermissionName> {
    let ok = if tokens {
        value.split('.').all(plain_token)
    } else {
        plain_token(value)
    } && !value.starts_with("_INBOX");
    if ok {
        Ok(())
    } else {
        Err(InvalidPermissionName {
            what,
            value: value.to_owned(),
        })
    }
}

/// The stream an application's events go to: its name and subject prefix
/// (as in its `StreamConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamScope {
    /// The JetStream stream's name.
    pub stream: String,
    /// The events' subject prefix (`<prefix>.<aggregate_type>.<event_type>`).
    pub subject_prefix: String,
}

impl StreamScope {
    /// The stream `stream` with subjects under `subject_prefix`.
    pub fn new(stream: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        StreamScope {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
        }
    }
}

/// The inbox prefix clients of `role` use for `application`
/// (`_INBOX_<application>_<role>`): set it as `NATS_INBOX_PREFIX` (or
/// [`crate::nats::NatsConnect::inbox_prefix`], the CLI's `--inbox-prefix`).
pub fn inbox_prefix(application: &str, role: NatsRole) -> String {
    format!("_INBOX_{application}_{role}")
}

/// The `permissions { … }` block (nats-server configuration syntax) for a
/// user of `role` in `application`, whose events go to `scope`. Paste it
/// into the user's entry of the server's `authorization` (or an account's
/// `users`).
///
/// Every name must be plain subject tokens (letters, digits, `_`, `-`): a
/// wildcard, `$`-subject or `_INBOX` prefix would grant far more than the
/// application's own subjects.
pub fn nats_permissions(
    application: &str,
    role: NatsRole,
    scope: &StreamScope,
) -> Result<String, InvalidPermissionName> {
    checked("application", application, false)?;
    checked("stream", &scope.stream, false)?;
    checked("subject prefix", &scope.subject_prefix, true)?;
    // `converge` (StreamConfig's default) would cover every application's
    // control subjects, `converge.control.>`.
    if scope.subject_prefix.split('.').next() == Some("converge") {
        return Err(InvalidPermissionName {
            what: "subject prefix (it would cover the control plane's converge.control.>; give \
                   the stream a prefix of its own)",
            value: scope.subject_prefix.clone(),
        });
    }
    let stream = &scope.stream;
    let control = format!("{}.>", control_subject(application));
    let events = format!("{}.>", scope.subject_prefix);
    // What `converge status` reads: the stream and its consumers.
    let read = vec![
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.LIST.{stream}"),
        format!("$JS.API.CONSUMER.NAMES.{stream}"),
    ];
    let own_inbox = format!("{}.>", inbox_prefix(application, role));
    let (publish, subscribe, note) = match role {
        NatsRole::Worker => {
            let mut publish = vec![events];
            publish.extend(read);
            publish.extend([
                // Creates the stream when it is missing (the relay never
                // updates one): pre-create it and drop this line to keep
                // stream configuration with an administrator.
                format!("$JS.API.STREAM.CREATE.{stream}"),
                format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"),
                format!("$JS.ACK.{stream}.>"),
                // Answers to operators, on their inbox prefix only.
                format!("{}.>", inbox_prefix(application, NatsRole::Operator)),
            ]);
            let subscribe = vec![own_inbox, format!("{control} {CONTROL_QUEUE_GROUP}")];
            (
                publish,
                subscribe,
                "relays events, consumes them and answers control requests \
                 (in the workers' queue group only)",
            )
        }
        NatsRole::Operator => {
            let mut publish = vec![control, events];
            publish.extend(read);
            (
                publish,
                vec![own_inbox],
                "sends control requests, replays the outbox and reads the stream's state",
            )
        }
        NatsRole::Viewer => (
            read,
            vec![own_inbox],
            "reads the stream's and consumers' state; sends no control request",
        ),
    };
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| format!("      {}", quote(s)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(format!(
        "# converge {role} of application {application:?} (stream {stream}): {note}.\n\
         # Connect with NATS_INBOX_PREFIX={prefix} (converge --inbox-prefix {prefix}).\n\
         # Users without a permissions block may do anything: give every user of this\n\
         # account one, or keep converge's applications in an account of their own.\n\
         permissions: {{\n  publish: {{\n    allow: [\n{}\n    ]\n  }}\n  \
         subscribe: {{\n    allow: [\n{}\n    ]\n  }}\n}}\n",
        list(&publish),
        list(&subscribe),
        prefix = inbox_prefix(application, role),
    ))
}

/// `s` as a double-quoted nats-server configuration string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workers_join_the_queue_group_and_only_operators_send_requests() {
        let scope = StreamScope::new("ORDERS", "orders");
        let worker = nats_permissions("app", NatsRole::Worker, &scope).unwrap();
        assert!(worker.contains("\"converge.control.app.> converge-workers\""));
        assert!(worker.contains("\"_INBOX_app_operator.>\""));
        let operator = nats_permissions("app", NatsRole::Operator, &scope).unwrap();
        assert!(operator.contains("\"converge.control.app.>\""));
        assert!(!operator.contains("converge-workers"));
        let viewer = nats_permissions("app", NatsRole::Viewer, &scope).unwrap();
        assert!(!viewer.contains("converge.control"));
        assert!(!viewer.contains("orders.>"));
        assert!(!worker.contains("STREAM.UPDATE"));
    }

    #[test]
    fn names_that_would_widen_or_inject_are_refused() {
        let scope = |p: &str| StreamScope::new("ORDERS", p);
        for prefix in [
            "$JS",
            "_INBOX",
            "orders.*",
            "orders.>",
            "a b",
            "x\n}",
            "a..b",
            "",
            "converge",
            "converge.events",
        ] {
            assert!(
                nats_permissions("app", NatsRole::Worker, &scope(prefix)).is_err(),
                "{prefix:?}"
            );
        }
        assert!(nats_permissions("app", NatsRole::Worker, &scope("orders.eu")).is_ok());
        assert!(nats_permissions("a\"pp", NatsRole::Worker, &scope("orders")).is_err());
    }
}
