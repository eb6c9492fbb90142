//! A local billing service with idempotency keys, and its client: the
//! invoicing example's external side effect.
//!
//! * `POST /charges` with `{"order_id", "amount_cents"}` and an
//!   `Idempotency-Key` header charges the order (200 with the charge). A key
//!   seen before applies nothing and answers the first charge again (with
//!   `Idempotent-Replayed: true`), as Stripe's API does. No key: 400.
//! * `GET /stats`: `calls`, `applied`, `replayed`, `orders_charged`,
//!   `duplicates` — orders charged more than once, counting effects, not
//!   calls — and `overlapping`: calls for an order that arrived while another
//!   call for it was in flight (two runs of one key at once).
//! * `GET /charges`: the charges applied per order, `{"<order id>": n}`.
//!
//! `--latency-ms` makes every answer slow *after* the charge is applied: a
//! run killed, stopped or cut off in the middle of the call has charged the
//! order without knowing it, which is what idempotency keys are for.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use converge::handlers::ReconcileError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The header carrying the idempotency key.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A charge request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The order charged.
    pub order_id: i64,
    /// The amount.
    pub amount_cents: i64,
}

/// A charge as the service stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Charge {
    /// The charge's id.
    pub charge_id: u64,
    /// The order charged.
    pub order_id: i64,
    /// The amount.
    pub amount_cents: i64,
}

/// What the service has seen: `GET /stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingStats {
    /// `POST /charges` requests with a key.
    pub calls: u64,
    /// Charges applied (new keys).
    pub applied: u64,
    /// Calls answered from an earlier charge with the same key.
    pub replayed: u64,
    /// Orders charged at least once.
    pub orders_charged: u64,
    /// Orders charged more than once: double effects.
    pub duplicates: u64,
    /// Calls that arrived while another call for the same order was still
    /// in flight: two runs of one key at once.
    pub overlapping: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    by_key: HashMap<String, Charge>,
    per_order: BTreeMap<i64, u64>,
    in_flight: HashMap<i64, u32>,
    stats: BillingStats,
}

#[derive(Debug, Clone)]
struct Service {
    ledger: Arc<Mutex<Ledger>>,
    latency: Duration,
}

/// The billing service's routes, with answers delayed by `latency`.
pub fn router(latency: Duration) -> Router {
    let service = Service {
        ledger: Arc::default(),
        latency,
    };
    Router::new()
        .route("/charges", post(charge).get(charges))
        .route("/stats", get(stats))
        .with_state(service)
}

/// Serves the billing service on `listen` until `shutdown` resolves; returns
/// the bound address through `bound` (e.g. for port 0).
pub async fn serve(
    listen: SocketAddr,
    latency: Duration,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    bound(listener.local_addr()?);
    axum::serve(listener, router(latency))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn charge(
    State(service): State<Service>,
    headers: HeaderMap,
    Json(request): Json<ChargeRequest>,
) -> Response {
    let Some(key) = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|k| k.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
    else {
        return (
            StatusCode::BAD_REQUEST,
            "an Idempotency-Key header is required",
        )
            .into_response();
    };
    let (charge, replayed) = {
        let mut ledger = service
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ledger.stats.calls += 1;
        match ledger.by_key.get(&key).cloned() {
            Some(first) => {
                ledger.stats.replayed += 1;
                (first, true)
            }
            None => {
                ledger.stats.applied += 1;
                let charge = Charge {
                    charge_id: ledger.stats.applied,
                    order_id: request.order_id,
                    amount_cents: request.amount_cents,
                };
                ledger.by_key.insert(key, charge.clone());
                let n = ledger.per_order.entry(request.order_id).or_default();
                *n += 1;
                match *n {
                    1 => ledger.stats.orders_charged += 1,
                    2 => ledger.stats.duplicates += 1,
                    _ => {}
                }
                (charge, false)
            }
        }
    };
    // The charge is applied; the answer may never arrive. The call counts
    // as in flight until it is answered (or its client went away).
    let _answered = InFlight {
        ledger: service.ledger.clone(),
        order_id: request.order_id,
    };
    tokio::time::sleep(service.latency).await;
    let mut response = Json(charge).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("Idempotent-Replayed", "true".parse().expect("header value"));
    }
    response
}

/// Ends a call's time in flight when dropped (answered or abandoned).
struct InFlight {
    ledger: Arc<Mutex<Ledger>>,
    order_id: i64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = ledger.in_flight.get_mut(&self.order_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ledger.in_flight.remove(&self.order_id);
            }
        }
    }
}

async fn stats(State(service): State<Service>) -> Json<BillingStats> {
    Json(
        service
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats,
    )
}

async fn charges(State(service): State<Service>) -> Json<BTreeMap<String, u64>> {
    let ledger = service
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Json(
        ledger
            .per_order
            .iter()
            .map(|(order, n)| (order.to_string(), *n))
            .collect(),
    )
}

/// Why a charge failed: a transport error or a 5xx is retryable, a 4xx not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BillingError {
    /// The service could not be reached or did not answer in time.
    #[error("billing service unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// The service answered with an error.
    #[error("billing service answered {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer's body.
        body: String,
    },
}

impl BillingError {
    /// Whether a later call can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BillingError::Transport(_) => true,
            BillingError::Refused { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

impl From<BillingError> for ReconcileError {
    fn from(e: BillingError) -> Self {
        if e.is_retryable() {
            ReconcileError::retryable(e)
        } else {
            ReconcileError::permanent(e)
        }
    }
}

/// The JSON of a successful answer, or [`BillingError::Refused`] with the body.
async fn answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, BillingError> {
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(BillingError::Refused {
            status: status.as_u16(),
            body,
        });
    }
    response.json().await.map_err(BillingError::Transport)
}

/// A client of the billing service.
#[derive(Debug, Clone)]
pub struct BillingClient {
    base: String,
    http: reqwest::Client,
}

impl BillingClient {
    /// A client of the service at `base_url` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base_url: &str) -> Result<Self, reqwest::Error> {
        Ok(BillingClient {
            base: base_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// Charges `order_id` under `key`; the same key charges at most once.
    pub async fn charge(
        &self,
        order_id: i64,
        amount_cents: i64,
        key: Uuid,
    ) -> Result<Charge, BillingError> {
        let response = self
            .http
            .post(format!("{}/charges", self.base))
            .header(IDEMPOTENCY_KEY, key.to_string())
            .json(&ChargeRequest {
                order_id,
                amount_cents,
            })
            .send()
            .await
            .map_err(BillingError::Transport)?;
        answer(response).await
    }

    /// `GET /stats`.
    pub async fn stats(&self) -> Result<BillingStats, BillingError> {
        self.get("stats").await
    }

    /// `GET /charges`: charges applied per order.
    pub async fn charges(&self) -> Result<BTreeMap<i64, u64>, BillingError> {
        let raw: BTreeMap<String, u64> = self.get("charges").await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| k.parse().ok().map(|k| (k, v)))
            .collect())
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, BillingError> {
        let response = self
            .http
            .get(format!("{}/{path}", self.base))
            .send()
            .await
            .map_err(BillingError::Transport)?;
        answer(response).await
    }
}
