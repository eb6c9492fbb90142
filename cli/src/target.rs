//! Where a replay publishes: the application's stream and subject prefix,
//! from `converge.workers` or from `--stream` / `--prefix`.

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;

use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};

/// A stream and its subject prefix.
#[derive(Debug, Clone)]
pub(crate) struct StreamTarget {
    /// The stream's name.
    pub(crate) stream: String,
    /// Events go to `<prefix>.<aggregate_type>.<event_type>`.
    pub(crate) prefix: String,
}

impl StreamTarget {
    /// The subject of an event.
    pub(crate) fn subject(&self, aggregate_type: &str, event_type: &str) -> String {
        format!("{}.{aggregate_type}.{event_type}", self.prefix)
    }
}

fn one_of(found: Vec<(String, String)>, what: &str, hint: &str) -> CliResult<StreamTarget> {
    match found.as_slice() {
        [(stream, prefix)] => Ok(StreamTarget {
            stream: stream.clone(),
            prefix: prefix.clone(),
        }),
        [] => Err(bad_input(format!(
            "{what} in converge.workers\nhint: {hint}"
        ))),
        many => Err(bad_input(format!(
            "{what}: several are registered: {}\nhint: choose with --stream NAME --prefix P",
            many.iter()
                .map(|(s, p)| format!("{s} (prefix {p})"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The target from the options, completed from `converge.workers`.
pub(crate) async fn resolve(
    ctx: &Ctx,
    stream: Option<&str>,
    prefix: Option<&str>,
) -> CliResult<StreamTarget> {
    match (stream, prefix) {
        (Some(stream), Some(prefix)) => {
            if stream.is_empty() || stream.contains(['.', '*', '>', ' ']) {
                return Err(bad_input(format!(
                    "--stream {stream:?} is not a stream name"
                )));
            }
            if prefix.is_empty() || prefix.contains(['*', '>', ' ']) {
                return Err(bad_input(format!(
                    "--prefix {prefix:?} is not a subject prefix"
                )));
            }
            Ok(StreamTarget {
                stream: stream.into(),
                prefix: prefix.into(),
            })
        }
        (None, Some(_)) => Err(bad_input("--prefix needs --stream NAME too")),
        (Some(stream), None) => {
            let found = sqlx::query_as(
                "SELECT DISTINCT stream, stream_prefix FROM converge.workers \
                 WHERE stream = $1 AND stream_prefix IS NOT NULL",
            )
            .bind(stream)
            .fetch_all(ctx.pool().await?)
            .await?;
            one_of(
                found,
                &format!("no worker registered stream {stream:?} with a subject prefix"),
                "pass its subject prefix with --prefix P",
            )
        }
        (None, None) => {
            let app = ctx.app().await?;
            let found = sqlx::query_as(
                "SELECT DISTINCT stream, stream_prefix FROM converge.workers \
                 WHERE application = $1 AND stream IS NOT NULL AND stream_prefix IS NOT NULL",
            )
            .bind(&app)
            .fetch_all(ctx.pool().await?)
            .await?;
            one_of(
                found,
                &format!(
                    "application {app:?} has no stream registered (do its workers run a relay?)"
                ),
                "name the stream with --stream NAME --prefix P",
            )
        }
    }
}

/// Checks that the stream exists and captures the target's subjects.
pub(crate) async fn check_stream(
    js: &async_nats::jetstream::Context,
    target: &StreamTarget,
) -> CliResult<()> {
    let mut stream = match js.get_stream(&target.stream).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    bad_input(format!(
                        "stream {:?} does not exist on this NATS server",
                        target.stream
                    ))
                }
                _ => CliError::Failed(format!("cannot read stream {:?}: {e}", target.stream)),
            })
        }
    };
    let info = stream
        .info()
        .await
        .map_err(|e| CliError::Failed(format!("cannot read stream {:?}: {e}", target.stream)))?;
    let sample = target.subject("x", "y");
    if !info
        .config
        .subjects
        .iter()
        .any(|f| subject_matches(f, &sample))
    {
        return Err(bad_input(format!(
            "stream {:?} does not capture {}.>: its subjects are {}",
            target.stream,
            target.prefix,
            info.config.subjects.join(", ")
        )));
    }
    Ok(())
}

/// Whether NATS subject filter `filter` (with `*` and `>`) matches `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn filters_match_like_nats() {
        assert!(subject_matches("orders.>", "orders.order.Shipped"));
        assert!(subject_matches(">", "orders.order.Shipped"));
        assert!(subject_matches("orders.*.Shipped", "orders.order.Shipped"));
        assert!(!subject_matches("orders.*", "orders.order.Shipped"));
        assert!(!subject_matches("other.>", "orders.order.Shipped"));
        assert!(!subject_matches(
            "orders.order.Shipped.x",
            "orders.order.Shipped"
        ));
    }
}
