//! The reconciler: one changed record → one `PUT` to the identity API, at
//! most 2 per second, then SYNCED; FAILED once the sweep gives up.
//!
//! The points between side effects are marked with [`Context::step`]:
//! `"sent"` (the `PUT` succeeded, the record is not SYNCED yet) and `"synced"`
//! (the compare-and-set ran) — the crash points `converge-testkit` exercises.

use std::time::Duration;

use converge::handlers::{Context, Outcome, Rate, RateLimits, ReconcileError, Reconciler};
use reqwest::StatusCode;

use crate::api::IdentityUser;

/// The rate limiter every call to the identity API waits on.
pub const LIMITER: &str = "identity-api";

/// The identity provider's limit: 2 calls in any window of one second.
pub const PROVIDER_LIMIT: Rate = Rate::per_second(2);

/// The limiter's rate: 2 calls per 1.05 s, burst 1 — [`PROVIDER_LIMIT`] with a
/// 5 % margin.
///
/// A limiter at exactly 2 per second spaces its *acquires* 500 ms apart, but
/// the provider counts *arrivals*: when the first of three calls takes a
/// millisecond longer on the way than the third (a new connection, a busy
/// CPU), all three land within one second and the third gets a 429 — seen in
/// this example's tests as three arrivals 0.9997 s apart. The margin absorbs
/// up to 50 ms of such jitter for 5 % of throughput.
pub const RATE: Rate = Rate::new(2, Duration::from_millis(1050));

/// How long one API call may take before it counts as a transient failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait a 429 without a usable `Retry-After` asks for.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The rate limits of this example: [`LIMITER`] at [`RATE`], in-process.
pub fn limits() -> RateLimits {
    RateLimits::new().local(LIMITER, RATE)
}

/// Why a call to the identity API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiCallError {
    /// The API answered with an error status.
    #[error("identity API answered {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The response body (truncated).
        body: String,
    },
    /// No answer: connection refused, reset or timed out.
    #[error("identity API unreachable")]
    Transport(#[source] reqwest::Error),
}

/// Syncs changed records (keys: user ids) to the identity API at `base_url`.
#[derive(Debug, Clone)]
pub struct IdentitySync {
    client: reqwest::Client,
    base_url: String,
}

impl IdentitySync {
    /// A reconciler calling the API at `base_url` (`http://host:port`).
    pub fn new(base_url: impl Into<String>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?;
        Ok(IdentitySync {
            client,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
        })
    }

    /// One `PUT /users/{id}`, classified: 429, 5xx and no answer are
    /// retryable (honouring `Retry-After`), other statuses permanent.
    async fn put_user(&self, id: i64, user: &IdentityUser) -> Result<(), ReconcileError> {
        let url = format!("{}/users/{id}", self.base_url);
        let response = match self.client.put(url).json(user).send().await {
            Ok(response) => response,
            Err(e) => return Err(ReconcileError::retryable(ApiCallError::Transport(e))),
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = response.text().await.unwrap_or_default();
        body.truncate(200);
        let error = ApiCallError::Status { status, body };
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
            Err(ReconcileError::retryable(error).retry_after(wait))
        } else if status.is_server_error() {
            let error = ReconcileError::retryable(error);
            Err(match retry_after {
                Some(wait) => error.retry_after(wait),
                None => error,
            })
        } else {
            Err(ReconcileError::permanent(error))
        }
    }
}

fn user_id(key: &str) -> Result<i64, ReconcileError> {
    key.parse().map_err(|_| {
        ReconcileError::permanent(format!("changed-record key {key:?} is not a user id"))
    })
}

impl Reconciler for IdentitySync {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let id = user_id(key)?;
        let row: Option<(String, i64, String, String)> = sqlx::query_as(
            "SELECT c.state, c.version, u.email, u.display_name \
             FROM identity_sync.changed_records c \
             JOIN identity_sync.users u ON u.id = c.user_id WHERE c.user_id = $1",
        )
        .bind(id)
        .fetch_optional(ctx.pool())
        .await?;
        let Some((state, version, email, display_name)) = row else {
            return Ok(Outcome::Unchanged);
        };
        if state != "PENDING" {
            return Ok(Outcome::Unchanged); // synced or given up since the sweep read it
        }
        sqlx::query(
            "UPDATE identity_sync.changed_records SET attempts = attempts + 1 \
             WHERE user_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .execute(ctx.pool())
        .await?;
        ctx.acquire(LIMITER).await?;
        let user = IdentityUser {
            email,
            display_name,
        };
        if let Err(error) = self.put_user(id, &user).await {
            sqlx::query(
                "UPDATE identity_sync.changed_records SET last_error = $3 \
                 WHERE user_id = $1 AND version = $2",
            )
            .bind(id)
            .bind(version)
            .bind(error.to_string())
            .execute(ctx.pool())
            .await?;
            return Err(error);
        }
        // A crash point: the API holds the user, the record is still PENDING
        // (the next run PUTs the same data again, which the API takes as is).
        ctx.step("sent")?;
        // Compare-and-set: a change that arrived during the call bumped the
        // version and keeps the record PENDING for the next sweep.
        let marked = sqlx::query(
            "UPDATE identity_sync.changed_records \
             SET state = 'SYNCED', synced_at = now(), last_error = NULL \
             WHERE user_id = $1 AND state = 'PENDING' AND version = $2",
        )
        .bind(id)
        .bind(version)
        .execute(ctx.pool())
        .await?;
        if marked.rows_affected() == 0 {
            tracing::info!(user_id = id, "user changed during its sync: stays pending");
        }
        ctx.step("synced")?;
        Ok(Outcome::Changed)
    }

    /// The seed's `@Recover`: the record is marked FAILED with the error.
    async fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        let id = user_id(key)?;
        sqlx::query(
            "UPDATE identity_sync.changed_records SET state = 'FAILED', last_error = $2 \
             WHERE user_id = $1 AND state = 'PENDING'",
        )
        .bind(id)
        .bind(error.to_string())
        .execute(ctx.pool())
        .await?;
        tracing::warn!(user_id = id, %error, "identity sync gave up: record FAILED");
        Ok(())
    }
}
