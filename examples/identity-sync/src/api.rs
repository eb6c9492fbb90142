//! A local stand-in for the identity provider's API: HTTP on a free
//! `127.0.0.1` port, in-process, with the provider's "comically low" limit.
//!
//! * `PUT /users/{id}` with `{"email", "display_name"}` stores the user (200),
//!   or answers 422 when the email has no `@` (a permanent failure).
//! * At most [`ApiConfig::limit`] requests in any window of
//!   [`ApiConfig::window`] (every request counts, answered or not); above it,
//!   429 with `Retry-After: 1`.
//! * Fails transiently (503) with probability [`ApiConfig::fail_rate`], from a
//!   seeded generator so a run can be repeated.
//! * `GET /users/{id}` returns what was stored (not rate-limited, not counted).
//!
//! [`IdentityApi::stats`] reports the request counts and the most requests
//! seen in any one window.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Settings of the fake identity API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Requests allowed in any window of [`window`](ApiConfig::window).
    pub limit: u32,
    /// The length of the sliding window.
    pub window: Duration,
    /// Probability (0.0–1.0) that an allowed request fails with 503.
    pub fail_rate: f64,
    /// Seed of the failure generator.
    pub seed: u64,
}

impl Default for ApiConfig {
    /// The provider's limit of 2 requests per second, 10 % transient failures.
    fn default() -> Self {
        ApiConfig {
            limit: 2,
            window: Duration::from_secs(1),
            fail_rate: 0.1,
            seed: 42,
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The failure probability is not within 0.0–1.0.
    #[error("the API's failure rate must be between 0.0 and 1.0, got {0}")]
    InvalidFailRate(f64),
    /// The limit or the window is zero.
    #[error("the API's rate limit needs a limit and a window above zero")]
    InvalidLimit,
    /// No port could be bound.
    #[error("cannot listen on 127.0.0.1 for the identity API")]
    Bind(#[source] std::io::Error),
}

/// A user as the identity API stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityUser {
    /// The email address.
    pub email: String,
    /// The display name.
    pub display_name: String,
}

/// What the API has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// `PUT` requests received.
    pub requests: u64,
    /// Requests that stored a user (200).
    pub accepted: u64,
    /// Requests answered 429 (over the rate limit).
    pub rate_limited: u64,
    /// Requests answered 503 (transient failure).
    pub unavailable: u64,
    /// Requests answered 422 (invalid user).
    pub invalid: u64,
    /// The most requests seen in any one window (including the one counted).
    pub max_per_window: u32,
    /// The shortest time spanned by `limit + 1` consecutive requests (`None`
    /// while fewer arrived): at least the window while the limit is kept.
    pub closest_span: Option<Duration>,
}

struct ApiState {
    config: ApiConfig,
    rng: StdRng,
    /// Arrivals within the current window.
    window: VecDeque<Instant>,
    /// The last `limit + 1` arrivals.
    recent: VecDeque<Instant>,
    stats: ApiStats,
    users: HashMap<i64, IdentityUser>,
}

type Shared = Arc<Mutex<ApiState>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, ApiState> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running API; [`shutdown`](IdentityApi::shutdown) stops it.
#[derive(Debug)]
pub struct IdentityApi {
    addr: SocketAddr,
    state: Shared,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl IdentityApi {
    /// Starts the API on a free port of 127.0.0.1.
    pub async fn start(config: ApiConfig) -> Result<IdentityApi, ApiError> {
        if !(0.0..=1.0).contains(&config.fail_rate) {
            return Err(ApiError::InvalidFailRate(config.fail_rate));
        }
        if config.limit == 0 || config.window.is_zero() {
            return Err(ApiError::InvalidLimit);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ApiError::Bind)?;
        let addr = listener.local_addr().map_err(ApiError::Bind)?;
        let state = Arc::new(Mutex::new(ApiState {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            window: VecDeque::new(),
            recent: VecDeque::new(),
            stats: ApiStats::default(),
            users: HashMap::new(),
        }));
        let app = Router::new()
            .route("/users/{id}", put(put_user).get(get_user))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "identity API stopped");
            }
        });
        tracing::info!(%addr, "identity API listening");
        Ok(IdentityApi {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counts so far.
    pub fn stats(&self) -> ApiStats {
        lock(&self.state).stats
    }

    /// The user stored under `id`, if any.
    pub fn user(&self, id: i64) -> Option<IdentityUser> {
        lock(&self.state).users.get(&id).cloned()
    }

    /// Stops listening (open connections get up to 2 s to finish).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for IdentityApi {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn put_user(
    State(state): State<Shared>,
    Path(id): Path<i64>,
    Json(user): Json<IdentityUser>,
) -> Response {
    let now = Instant::now();
    let mut s = lock(&state);
    let limit = s.config.limit as usize;
    let window = s.config.window;
    s.stats.requests += 1;
    while s.window.front().is_some_and(|&t| now - t >= window) {
        s.window.pop_front();
    }
    s.window.push_back(now);
    s.recent.push_back(now);
    if s.recent.len() > limit + 1 {
        s.recent.pop_front();
    }
    if s.recent.len() == limit + 1 {
        let span = now - s.recent[0];
        s.stats.closest_span = Some(s.stats.closest_span.map_or(span, |c| c.min(span)));
    }
    let in_window = s.window.len();
    s.stats.max_per_window = s.stats.max_per_window.max(in_window as u32);
    if in_window > limit {
        s.stats.rate_limited += 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "rate limit exceeded",
        )
            .into_response();
    }
    let fail_rate = s.config.fail_rate;
    if s.rng.random_bool(fail_rate) {
        s.stats.unavailable += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "identity store unavailable",
        )
            .into_response();
    }
    if !user.email.contains('@') {
        s.stats.invalid += 1;
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid email address {:?}", user.email),
        )
            .into_response();
    }
    s.stats.accepted += 1;
    s.users.insert(id, user);
    StatusCode::OK.into_response()
}

async fn get_user(State(state): State<Shared>, Path(id): Path<i64>) -> Response {
    match lock(&state).users.get(&id) {
        Some(user) => Json(user.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
