//! The repository of an event-sourced aggregate: loads it by folding its
//! history (from its snapshot), and saves the events a command decides with
//! the expected version, in the caller's transaction.

use std::marker::PhantomData;
use std::sync::Arc;

use converge_outbox::{
    transaction, AppendOptions, Appended, DomainEvent, Outbox, TransactionRetry, Upcasters,
};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Acquire, PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::aggregate::{decode, decode_str, encode, event_types, Aggregate};
use crate::error::{CommandError, RepositoryError};
use crate::projection::inline::{InlineProjections, Superseded};
use crate::projection::register::{register, ProjectionMode, Registrar};
use crate::projection::{ProjectedEvent, Projection};
use crate::{keep_forever, snapshot};

/// How a [`Repository`] loads and saves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RepositoryConfig {
    /// Take a snapshot when a load would fold at least this many events
    /// after the last one (`None`: never). Default 100.
    pub snapshot_every: Option<u32>,
    /// Events read per query while loading (every query has a limit).
    pub page_size: i64,
    /// How [`Repository::execute`] retries a command whose aggregate another
    /// writer changed first (and other transient failures).
    pub retry: TransactionRetry,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            snapshot_every: Some(100),
            page_size: 1_000,
            retry: TransactionRetry::default(),
        }
    }
}

/// An aggregate loaded from its history.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// The state after every event.
    pub state: A,
    /// The aggregate's version: its last event's (0: no event yet).
    pub version: i64,
    /// The version of the snapshot it started from (0: none).
    pub snapshot_version: i64,
    /// The events folded after the snapshot.
    pub folded: usize,
}

/// A command carried out: the events it decided (maybe none) and the state
/// after them.
#[derive(Debug)]
#[non_exhaustive]
pub struct Executed<A: Aggregate> {
    /// The state after the new events.
    pub state: A,
    /// The version after them.
    pub version: i64,
    /// The events decided, in order.
    pub events: Vec<A::Event>,
    /// Where each was stored.
    pub appended: Vec<Appended>,
}

/// One stored event of an aggregate, decoded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Recorded<E> {
    /// The event id.
    pub event_id: Uuid,
    /// The aggregate's version after it.
    pub version: i64,
    /// When it happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// The event, in its current shape.
    pub event: E,
}

/// Loads and saves the event-sourced aggregate `A`. Cheap to clone.
///
/// ```no_run
/// # use converge_eventsourcing::Aggregate;
/// # #[derive(Debug, Default, serde::Serialize, serde::Deserialize)] struct Account { balance: i64 }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] enum AccountEvent { Deposited { amount: i64 } }
/// # #[derive(Debug, thiserror::Error)] #[error("never")] struct Never;
/// # impl Aggregate for Account {
/// #     const TYPE: &'static str = "account";
/// #     type Event = AccountEvent; type Command = i64; type Error = Never;
/// #     fn apply(&mut self, AccountEvent::Deposited { amount }: &AccountEvent) { self.balance += amount }
/// #     fn decide(&self, amount: &i64) -> Result<Vec<AccountEvent>, Never> { Ok(vec![AccountEvent::Deposited { amount: *amount }]) }
/// # }
/// use converge_eventsourcing::Repository;
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let accounts = Repository::<Account>::builder(pool.clone()).start().await?;
///
/// // A command on its own, retried on conflicts:
/// let done = accounts.execute("a-1", &500).await?;
/// assert_eq!(done.state.balance, 500);
///
/// // Or in the caller's transaction, with the application's other writes:
/// let mut tx = pool.begin().await?;
/// accounts.execute_in(&mut tx, "a-1", &250).await?;
/// sqlx::query("INSERT INTO app.ledger_notes (note) VALUES ('deposit')").execute(&mut *tx).await?;
/// tx.commit().await?;
///
/// let account = accounts.load(&pool, "a-1").await?;
/// assert_eq!((account.state.balance, account.version), (750, 2));
/// # Ok(()) }
/// ```
pub struct Repository<A: Aggregate> {
    inner: Arc<Inner>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Repository {
            inner: self.inner.clone(),
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> std::fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate_type", &A::TYPE)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    config: RepositoryConfig,
    upcasters: Upcasters,
    outbox: Outbox,
    inline: InlineProjections,
}

/// A [`Repository`] being configured: [`start`](Self::start) checks it
/// against the database.
pub struct RepositoryBuilder<A: Aggregate> {
    pool: PgPool,
    config: RepositoryConfig,
    upcasters: Upcasters,
    outbox: Outbox,
    inline: InlineProjections,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> std::fmt::Debug for RepositoryBuilder<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryBuilder")
            .field("aggregate_type", &A::TYPE)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> RepositoryBuilder<A> {
    /// Loading and saving settings.
    pub fn config(mut self, config: RepositoryConfig) -> Self {
        self.config = config;
        self
    }

    /// The upcasters stored events are brought to their current shape with.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The outbox events are appended with (its size limit, notifications).
    pub fn outbox(mut self, outbox: Outbox) -> Self {
        self.outbox = outbox;
        self
    }

    /// Applies `projection` inline: to each event this repository saves, in
    /// the transaction that saves it. To rebuild it, run it on a worker with
    /// [`ProjectionRunner::rebuilds_of`](crate::ProjectionRunner::rebuilds_of).
    pub fn inline<P: Projection>(mut self, projection: Arc<P>) -> Self {
        self.inline.push(projection);
        self
    }

    /// Checks the aggregate's declarations and the database, and starts the
    /// repository: the schema is migrated and the role may use it; `A::TYPE`
    /// and every event type (`A::Event`'s variants) are subject tokens; the
    /// upcasters lead to each type's current schema version; inline
    /// projections are registered as inline. Before the first event can be
    /// saved, `A::TYPE` is kept from retention for ever
    /// (`converge.retention_policies`): its history is its state.
    pub async fn start(self) -> Result<Repository<A>, RepositoryError> {
        check_declarations::<A>(&self.upcasters)?;
        if self.config.page_size < 1 || self.config.page_size > 100_000 {
            return Err(RepositoryError::Config(format!(
                "RepositoryConfig::page_size {} must be from 1 to 100,000",
                self.config.page_size
            )));
        }
        if self.config.snapshot_every == Some(0) {
            return Err(RepositoryError::Config(
                "RepositoryConfig::snapshot_every must be at least 1 (None: no snapshots)".into(),
            ));
        }
        converge_schema::check(&self.pool, converge_schema::Role::App).await?;
        refuse_old_relays::<A>(&self.pool).await?;
        let instance = converge_handlers::instance_name("repository");
        let mut names: Vec<&str> = self.inline.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(RepositoryError::Config(format!(
                "projection {} is registered twice on the repository of {}",
                w[0],
                A::TYPE
            )));
        }
        for projection in self.inline.iter() {
            let types = projection.aggregate_types();
            if !types.contains(&A::TYPE) {
                return Err(RepositoryError::Config(format!(
                    "inline projection {} must name {} among its AGGREGATE_TYPES ({}): a rebuild \
                     reads every event of its types, and an inline projection sees only what \
                     its repositories save — they must be the same types",
                    projection.name(),
                    A::TYPE,
                    if types.is_empty() {
                        "none: every type".to_owned()
                    } else {
                        types.join(", ")
                    }
                )));
            }
        }
        for projection in self.inline.iter() {
            register(
                &self.pool,
                projection.as_ref(),
                ProjectionMode::Inline,
                Registrar::Repository,
                &instance,
            )
            .await?;
        }
        keep_forever(
            &self.pool,
            A::TYPE,
            &format!("event-sourced ({})", std::any::type_name::<A>()),
        )
        .await?;
        Ok(Repository {
            inner: Arc::new(Inner {
                pool: self.pool,
                config: self.config,
                upcasters: self.upcasters,
                outbox: self.outbox,
                inline: self.inline,
            }),
            _aggregate: PhantomData,
        })
    }
}

/// `A::TYPE` and its event types are subject tokens, and each event type's
/// upcasters lead to its current version.
fn check_declarations<A: Aggregate>(upcasters: &Upcasters) -> Result<(), RepositoryError> {
    let config = |m: String| Err(RepositoryError::Config(m));
    if !is_token(A::TYPE) {
        return config(format!(
            "Aggregate::TYPE {:?} of {} must be 1 to 128 ASCII letters, digits, _ or -",
            A::TYPE,
            std::any::type_name::<A>()
        ));
    }
    let Some(types) = event_types::<A::Event>() else {
        return config(format!(
            "the events of {} ({}) must be an enum in serde's default (externally tagged) \
             form, one variant per event type",
            A::TYPE,
            std::any::type_name::<A::Event>()
        ));
    };
    for listed in upcasters.event_types_of(A::TYPE) {
        if !types.contains(&listed) {
            return config(format!(
                "upcasters are registered for {}.{listed}, which {} has no event type of: \
                 misspelt? (its event types: {})",
                A::TYPE,
                std::any::type_name::<A>(),
                types.join(", ")
            ));
        }
    }
    for event_type in types {
        if !is_token(event_type) {
            return config(format!(
                "event type {event_type:?} of {} is not a subject token: rename the variant \
                 (#[serde(rename = \"...\")]) to 1 to 128 ASCII letters, digits, _ or -",
                A::TYPE
            ));
        }
        let current = A::schema_version(event_type);
        if current == 0 {
            return config(format!(
                "Aggregate::schema_version({event_type:?}) of {} is 0: versions start at 1",
                A::TYPE
            ));
        }
        upcasters
            .check_named(A::TYPE, event_type, current)
            .map_err(|e| RepositoryError::Config(e.to_string()))?;
    }
    Ok(())
}

/// Events of a schema version above 1 are refused while a relay of an
/// earlier converge runs: it would publish them without their version, and
/// every reader would take them for version 1.
async fn refuse_old_relays<A: Aggregate>(pool: &PgPool) -> Result<(), RepositoryError> {
    let types = event_types::<A::Event>().unwrap_or_default();
    let Some(evolved) = types.iter().find(|t| A::schema_version(t) > 1) else {
        return Ok(());
    };
    // Any such row, however old its heartbeat: one that missed a few (a
    // fail-over, a long pause) is not gone. A relay of this converge
    // deletes rows three lease TTLs after their last heartbeat.
    let old: Vec<String> = sqlx::query_scalar(
        "SELECT name || ' (last heartbeat ' || \
                to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC)' \
         FROM converge.relay_instances WHERE protocol IS NULL ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    if old.is_empty() {
        return Ok(());
    }
    Err(RepositoryError::Config(format!(
        "{}.{evolved} is at schema version {}, but relays of an earlier converge still run \
         or ran lately ({}): they would publish it without its version, read as 1 \
         everywhere. Upgrade every relay first (a stopped relay's row goes three lease TTLs \
         after its last heartbeat, once a relay of this converge runs)",
        A::TYPE,
        A::schema_version(evolved),
        old.join(", ")
    )))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A decided event on its way into the outbox.
struct Decided<'a> {
    aggregate_id: &'a str,
    event_type: &'a str,
    schema_version: u32,
    aggregate_type: &'static str,
    payload: &'a Value,
}

impl Serialize for Decided<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.payload.serialize(s)
    }
}

impl DomainEvent for Decided<'_> {
    fn aggregate_type(&self) -> &str {
        self.aggregate_type
    }

    fn aggregate_id(&self) -> String {
        self.aggregate_id.to_owned()
    }

    fn event_type(&self) -> &str {
        self.event_type
    }

    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository of `A` to configure, then [`start`](RepositoryBuilder::start).
    pub fn builder(pool: PgPool) -> RepositoryBuilder<A> {
        RepositoryBuilder {
            pool,
            config: RepositoryConfig::default(),
            upcasters: Upcasters::default(),
            outbox: Outbox::default(),
            inline: InlineProjections::default(),
            _aggregate: PhantomData,
        }
    }

    /// The pool [`execute`](Self::execute) runs its transactions on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The upcasters.
    pub fn upcasters(&self) -> &Upcasters {
        &self.inner.upcasters
    }

    /// Loads the aggregate `id`: its snapshot (of the current shape), then
    /// every later event, upcast and folded in version order. An aggregate
    /// without events is `A::default()` at version 0. Works on a pool, a
    /// connection or a transaction (`&mut tx`).
    #[tracing::instrument(skip(self, conn), fields(aggregate_type = A::TYPE), err)]
    pub async fn load<'c>(
        &self,
        conn: impl Acquire<'c, Database = Postgres>,
        id: &str,
    ) -> Result<Loaded<A>, RepositoryError> {
        let mut conn = conn.acquire().await?;
        self.load_in(&mut conn, id).await
    }

    /// [`load`](Self::load) on a connection or in a transaction (`tx` or
    /// `&mut *tx`): the form to use inside a [`transaction`] body, where a
    /// generic executor would not satisfy the body's lifetimes.
    pub async fn load_in(
        &self,
        conn: &mut PgConnection,
        id: &str,
    ) -> Result<Loaded<A>, RepositoryError> {
        let page = self.inner.config.page_size;
        let mut state = A::default();
        let mut snapshot_version = 0;
        // The head as the first page saw it (its rows may be only the snapshot).
        let mut first_head: Option<i64> = None;
        // The first page comes with the snapshot, in one round trip.
        let mut rows = match self.inner.config.snapshot_every {
            Some(_) => {
                let mut rows = sqlx::query(snapshot::FIRST_PAGE)
                    .bind(A::TYPE)
                    .bind(id)
                    .bind(A::SHAPE_VERSION as i32)
                    .bind(page)
                    .fetch_all(&mut *conn)
                    .await?;
                if let Some(r) = rows.first() {
                    first_head = r.try_get(5)?;
                }
                let snapshot = match rows.first() {
                    Some(r) if r.try_get::<Option<Uuid>, _>(0)?.is_none() => {
                        Some((r.try_get::<i64, _>(1)?, r.try_get::<String, _>(4)?))
                    }
                    _ => None,
                };
                match snapshot {
                    None => rows,
                    Some((version, text)) => {
                        rows.remove(0);
                        match snapshot::decode::<A>(id, &text) {
                            Some(taken) => {
                                state = taken;
                                snapshot_version = version;
                                rows
                            }
                            None => self.page_after(&mut *conn, id, 0).await?,
                        }
                    }
                }
            }
            None => self.page_after(&mut *conn, id, 0).await?,
        };
        let mut version = snapshot_version;
        let mut folded = 0;
        loop {
            let n = rows.len() as i64;
            // The head, read with this page: the last page says whether the
            // history ends where the head does.
            let head: Option<i64> = match rows.first() {
                Some(r) => r.try_get(5)?,
                None => first_head,
            };
            first_head = None;
            for row in rows {
                let stored = StoredRow::read(&row)?;
                if stored.version != version + 1 {
                    return Err(RepositoryError::HistoryGap {
                        aggregate_type: A::TYPE.to_owned(),
                        aggregate_id: id.to_owned(),
                        expected: version + 1,
                        found: stored.version,
                    });
                }
                let event = self.decode_row(id, &stored)?;
                state.apply(&event);
                version = stored.version;
                folded += 1;
            }
            if n < page {
                if let Some(head) = head.filter(|h| *h > version) {
                    // Events after the last one stored were deleted.
                    return Err(RepositoryError::HistoryGap {
                        aggregate_type: A::TYPE.to_owned(),
                        aggregate_id: id.to_owned(),
                        expected: version + 1,
                        found: head + 1,
                    });
                }
                break;
            }
            rows = self.page_after(&mut *conn, id, version).await?;
        }
        Ok(Loaded {
            state,
            version,
            snapshot_version,
            folded,
        })
    }

    /// One page of the aggregate's events after `version`.
    async fn page_after(
        &self,
        conn: &mut PgConnection,
        id: &str,
        version: i64,
    ) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
        sqlx::query(
            "SELECT event_id, version, event_type, schema_version, payload::text, \
                    (SELECT h.version FROM converge.outbox_heads h \
                     WHERE h.aggregate_type = $1 AND h.aggregate_id = $2) AS head \
             FROM converge.outbox o \
             WHERE o.aggregate_type = $1 AND o.aggregate_id = $2 AND o.version > $3 \
             ORDER BY o.version LIMIT $4",
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(version)
        .bind(self.inner.config.page_size)
        .fetch_all(conn)
        .await
    }

    /// A stored event in its current shape.
    fn decode_row(&self, id: &str, row: &StoredRow) -> Result<A::Event, RepositoryError> {
        let current = A::schema_version(&row.event_type);
        let upcast_error = |source| RepositoryError::Upcast {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: id.to_owned(),
            event_id: row.event_id,
            source: Box::new(source),
        };
        let codec_error = |source| RepositoryError::Codec {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: id.to_owned(),
            event_id: row.event_id,
            source: Box::new(source),
        };
        if row.schema_version == current {
            return decode_str(&row.event_type, &row.payload).map_err(codec_error);
        }
        let payload: Value = serde_json::from_str(&row.payload).map_err(|e| {
            codec_error(crate::aggregate::CodecError::Decode {
                event_type: row.event_type.clone(),
                source: e,
            })
        })?;
        let payload = self
            .inner
            .upcasters
            .upcast_to(
                A::TYPE,
                &row.event_type,
                row.schema_version,
                payload,
                Some(current),
            )
            .map_err(upcast_error)?
            .1;
        decode(&row.event_type, payload).map_err(codec_error)
    }

    /// The aggregate's events after `after_version`, at most `limit`,
    /// decoded in their current shape.
    pub async fn history<'c>(
        &self,
        conn: impl Acquire<'c, Database = Postgres>,
        id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<Recorded<A::Event>>, RepositoryError> {
        let mut conn = conn.acquire().await?;
        let rows = sqlx::query(
            "SELECT event_id, version, event_type, schema_version, payload::text, \
                    converge.event_time(occurred_at) \
             FROM converge.outbox \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 \
             ORDER BY version LIMIT $4",
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                let stored = StoredRow::read(row)?;
                Ok(Recorded {
                    event_id: stored.event_id,
                    version: stored.version,
                    occurred_at: row
                        .try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(5)?
                        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH),
                    event: self.decode_row(id, &stored)?,
                })
            })
            .collect()
    }

    /// Carries out `command` on the aggregate `id` in the caller's
    /// transaction: loads it, decides, appends the events with the loaded
    /// version expected, applies the inline projections, takes a snapshot
    /// when due. Nothing is visible until the caller commits, and the other
    /// writes of the transaction commit with the events.
    ///
    /// Another writer saving first fails the append with a retryable
    /// [`CommandError::Save`] (roll back and run it again; see
    /// [`execute`](Self::execute)). A command that decides no events saves
    /// nothing and succeeds.
    // Refusals and conflicts are the caller's to handle: logged at DEBUG.
    #[tracing::instrument(
        skip(self, tx, command),
        fields(aggregate_type = A::TYPE),
        err(level = tracing::Level::DEBUG)
    )]
    pub async fn execute_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let loaded = self.load_in(&mut *tx, id).await?;
        let events = loaded
            .state
            .decide(command)
            .map_err(CommandError::Rejected)?;
        let mut state = loaded.state;
        let mut version = loaded.version;
        let mut appended = Vec::with_capacity(events.len());
        if !events.is_empty() && !self.inner.inline.is_empty() {
            match self.inner.inline.lock(&mut *tx).await {
                Ok(()) => {}
                Err(Superseded::Database(e)) => return Err(RepositoryError::from(e).into()),
                Err(Superseded::Version {
                    projection,
                    registered,
                    version,
                }) => {
                    return Err(CommandError::Projection {
                        projection,
                        source: crate::error::ProjectionError::permanent(format!(
                            "projection {projection} is registered at version {registered}, \
                             newer than this build's {version}: a newer build keeps its read \
                             model, and this one would write the old version's effects into \
                             it; deploy the newer build here"
                        )),
                    })
                }
            }
        }
        for event in &events {
            let (event_type, payload) = encode(event).map_err(|e| {
                CommandError::Load(RepositoryError::Config(format!(
                    "an event of {} does not encode: {e}",
                    A::TYPE
                )))
            })?;
            let schema_version = A::schema_version(&event_type);
            let decided = Decided {
                aggregate_id: id,
                event_type: &event_type,
                schema_version,
                aggregate_type: A::TYPE,
                payload: &payload,
            };
            let stored = self
                .inner
                .outbox
                .append_with(tx, &decided, &AppendOptions::expect_version(version))
                .await?;
            state.apply(event);
            version = stored.version;
            if !self.inner.inline.is_empty() {
                let projected = ProjectedEvent {
                    event_id: stored.event_id,
                    aggregate_type: A::TYPE.to_owned(),
                    aggregate_id: id.to_owned(),
                    version: stored.version,
                    event_type,
                    schema_version,
                    occurred_at: Some(stored.occurred_at),
                    payload,
                };
                self.inner
                    .inline
                    .apply(&mut *tx, &projected)
                    .await
                    .map_err(|(projection, source)| CommandError::Projection {
                        projection,
                        source,
                    })?;
            }
            appended.push(stored);
        }
        if let Some(every) = self.inner.config.snapshot_every {
            if !events.is_empty() && version - loaded.snapshot_version >= i64::from(every) {
                snapshot::write(&mut *tx, id, version, &state).await?;
            }
        }
        Ok(Executed {
            state,
            version,
            events,
            appended,
        })
    }

    /// Carries out `command` in a transaction of its own, retried (on a
    /// fresh load) when another writer saved first or the failure is
    /// otherwise transient ([`RepositoryConfig::retry`]). A COMMIT whose
    /// answer was lost is [`CommandError::CommitUnknown`], never run again.
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        transaction(&self.inner.pool, self.inner.config.retry.clone(), |tx| {
            Box::pin(self.execute_in(tx, id, command))
        })
        .await
    }
}

/// The columns of a stored event that loading reads.
struct StoredRow {
    event_id: Uuid,
    version: i64,
    event_type: String,
    schema_version: u32,
    payload: String,
}

impl StoredRow {
    fn read(row: &sqlx::postgres::PgRow) -> Result<Self, RepositoryError> {
        Ok(StoredRow {
            event_id: row.try_get(0)?,
            version: row.try_get(1)?,
            event_type: row.try_get(2)?,
            schema_version: u32::try_from(row.try_get::<i32, _>(3)?).unwrap_or(0).max(1),
            payload: row.try_get(4)?,
        })
    }
}
