//! Projections: read models kept by projection functions, inline (in the
//! transaction that saves the events) or asynchronous (from the outbox, with
//! a cursor written in the transaction that applies the events), and rebuilt
//! from history beside the live read model, then swapped in.

mod apply;
mod batch;
mod fetch;
pub(crate) mod inline;
mod names;
mod rebuild;
pub(crate) mod register;
mod runner;

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use converge_outbox::{Event, Upcasters};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::aggregate::{decode, Aggregate};
use crate::error::ProjectionError;

pub(crate) use names::Tables;
pub use register::{cancel_rebuild, forget_projection, request_rebuild, ProjectionMode};
pub use runner::{ProjectionRunner, ProjectionsHandle, RunnerConfig};

/// A projection: a read model kept up to date by applying events to it.
///
/// `apply` writes the event's effect in the transaction it is given, through
/// [`ProjectionTx::conn`], into the tables it declares in `TABLES` — named
/// through [`ProjectionTx::table`], so that a rebuild can fill copies of them
/// beside the live ones. It must be deterministic: a rebuild applies the same
/// events again and must arrive at the same read model.
///
/// Exactly once: an asynchronous projection's cursor is written in the
/// transaction that applies the events, so an event is applied once whatever
/// crashes (a crash rolls both back); an inline projection is applied in the
/// transaction that saves the event.
///
/// ```
/// use converge_eventsourcing::{Projection, ProjectionError, ProjectionTx, ProjectedEvent};
///
/// struct Balances;
///
/// impl Projection for Balances {
///     const NAME: &'static str = "balances";
///     const TABLES: &'static [&'static str] = &["bank.balances"];
///     const AGGREGATE_TYPES: &'static [&'static str] = &["account"];
///
///     async fn apply(&self, tx: &mut ProjectionTx<'_>, event: &ProjectedEvent) -> Result<(), ProjectionError> {
///         let delta = event.payload["amount"].as_i64().unwrap_or(0);
///         let sql = format!(
///             "INSERT INTO {} (account, balance) VALUES ($1, $2) \
///              ON CONFLICT (account) DO UPDATE SET balance = {0}.balance + $2",
///             tx.table("bank.balances")?
///         );
///         sqlx::query(&sql).bind(&event.aggregate_id).bind(delta).execute(tx.conn()).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Projection: Send + Sync + 'static {
    /// The projection's name: its row in `converge.projections`, the name
    /// operators use (`converge projections rebuild NAME`). The same value
    /// wherever the projection is registered.
    const NAME: &'static str;

    /// The tables the read model consists of (`schema.table`, lower case):
    /// a rebuild fills a copy of each (`<table>__rebuild`, made with
    /// `CREATE TABLE … (LIKE … INCLUDING ALL)`) from history, then makes the
    /// live table equal to it, writing only the rows that differ. The
    /// tables hold only what the projection's events put there (a rebuild
    /// starts the copies empty: no seed rows), and belong to this projection
    /// alone (two projections declaring one table are refused at start).
    /// Empty (the default): the projection cannot be rebuilt.
    const TABLES: &'static [&'static str] = &[];

    /// The aggregate types whose events it reads; empty (the default): all
    /// (and the projection stops on any event it cannot read). Retention
    /// keeps the events of these types until the projection has applied
    /// them.
    const AGGREGATE_TYPES: &'static [&'static str] = &[];

    /// The version of the projection's code. Raise it whenever `apply`,
    /// `TABLES`, `AGGREGATE_TYPES` or an upcaster it reads through change
    /// what the read model holds: the first runner of the new
    /// version to start requests a rebuild from history (the change applies
    /// to every event, not only to the next ones), and runners of an older
    /// version stop applying events. Changing the declarations without a new
    /// version is refused at start. Default 1.
    const VERSION: u32 = 1;

    /// Applies one event to the read model, in `tx`.
    fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// The transaction a projection writes in, and the names of its tables in
/// it (the live tables, or the copies a rebuild fills).
pub struct ProjectionTx<'c> {
    conn: &'c mut PgConnection,
    tables: &'c Tables,
}

impl<'c> ProjectionTx<'c> {
    pub(crate) fn new(conn: &'c mut PgConnection, tables: &'c Tables) -> Self {
        ProjectionTx { conn, tables }
    }

    /// The connection, inside the transaction: run the projection's
    /// statements on it.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// The name to write to for the declared table `name` (one of
    /// [`Projection::TABLES`]), quoted for SQL (`"bank"."balances"`): the
    /// table itself, or its copy during a rebuild. An undeclared name is an
    /// error, so a rebuild can never write to a live table.
    pub fn table(&self, name: &str) -> Result<&str, ProjectionError> {
        self.tables.target(name).ok_or_else(|| {
            ProjectionError::permanent(format!(
                "table {name:?} is not among the projection's TABLES ({}): declare it",
                self.tables.declared().join(", ")
            ))
        })
    }

    /// Whether this transaction fills a rebuild's copies.
    pub fn rebuilding(&self) -> bool {
        self.tables.rebuilding()
    }
}

/// An event as a projection sees it: its envelope and its payload in the
/// newest shape the upcasters know.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectedEvent {
    /// The event id.
    pub event_id: Uuid,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The aggregate's version after the event.
    pub version: i64,
    /// The event type.
    pub event_type: String,
    /// The payload's schema version (after upcasting).
    pub schema_version: u32,
    /// When it happened (`None` for a stored time converge cannot carry,
    /// written by SQL around the API).
    pub occurred_at: Option<DateTime<Utc>>,
    /// The payload.
    pub payload: Value,
}

impl ProjectedEvent {
    /// The event as an event of the aggregate `A`: `None` for another
    /// aggregate type; an error when its version is not the one `A` reads
    /// (see [`Aggregate::schema_version`]) or it does not decode.
    pub fn decode<A: Aggregate>(&self) -> Result<Option<A::Event>, ProjectionError> {
        if self.aggregate_type != A::TYPE {
            return Ok(None);
        }
        let current = A::schema_version(&self.event_type);
        if self.schema_version != current {
            return Err(converge_outbox::UpcastError::NoUpcaster {
                event: converge_outbox::TypeName {
                    aggregate_type: self.aggregate_type.clone(),
                    event_type: self.event_type.clone(),
                },
                from: self.schema_version,
                to: current,
            }
            .into());
        }
        Ok(Some(decode(&self.event_type, self.payload.clone())?))
    }

    /// The event as `E` (`None` for another type), at `E::SCHEMA_VERSION`.
    pub fn decode_event<E: Event + DeserializeOwned>(&self) -> Result<Option<E>, ProjectionError> {
        if self.aggregate_type != E::AGGREGATE_TYPE || self.event_type != E::EVENT_TYPE {
            return Ok(None);
        }
        Ok(Some(Upcasters::new().decode(
            &self.aggregate_type,
            &self.event_type,
            self.schema_version,
            self.payload.clone(),
        )?))
    }
}

/// A projection behind a pointer: what repositories and runners hold.
pub(crate) trait DynProjection: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn tables(&self) -> &'static [&'static str];
    fn aggregate_types(&self) -> &'static [&'static str];
    fn apply<'a>(
        &'a self,
        tx: &'a mut ProjectionTx<'_>,
        event: &'a ProjectedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    fn reads(&self, aggregate_type: &str) -> bool {
        let types = self.aggregate_types();
        types.is_empty() || types.contains(&aggregate_type)
    }
}

impl<P: Projection> DynProjection for P {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn version(&self) -> u32 {
        P::VERSION
    }

    fn tables(&self) -> &'static [&'static str] {
        P::TABLES
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        P::AGGREGATE_TYPES
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut ProjectionTx<'_>,
        event: &'a ProjectedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(Projection::apply(self, tx, event))
    }
}

/// A shared projection.
pub(crate) type SharedProjection = Arc<dyn DynProjection>;
