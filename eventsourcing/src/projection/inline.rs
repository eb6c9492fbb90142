//! Inline projections: applied by a repository in the transaction that
//! saves the events, to the live tables.

use sqlx::{PgConnection, Row};

use super::{ProjectedEvent, ProjectionTx, SharedProjection, Tables};
use crate::error::ProjectionError;

/// The inline projections of one repository, with their live table names.
#[derive(Clone, Default)]
pub(crate) struct InlineProjections {
    projections: Vec<(SharedProjection, Tables)>,
}

impl InlineProjections {
    pub(crate) fn push(&mut self, projection: SharedProjection) {
        let tables = Tables::live(projection.tables());
        self.projections.push((projection, tables));
    }

    /// Takes the projections' tables `ROW EXCLUSIVE`, in one order, before
    /// the first event is applied in a transaction: a rebuild's swap (which
    /// takes them `EXCLUSIVE`) then either waits for this transaction or is
    /// waited for — never between a projection's read of a row and its
    /// write of it. In the same round trip, reads the registered versions:
    /// a projection registered at a newer version than this build's (a
    /// worker of the new build registered it, and rebuilds or rebuilt it)
    /// is an error naming it, so an instance still on the old build never
    /// writes the old version's effects over the new read model.
    /// Idempotent within the transaction.
    pub(crate) async fn lock(&self, conn: &mut PgConnection) -> Result<(), Superseded> {
        let mut tables: Vec<String> = self
            .projections
            .iter()
            .flat_map(|(p, _)| p.tables().iter().map(|t| super::names::quoted(t)))
            .collect();
        // Names are checked at registration (ASCII letters, digits, _ and
        // -), so they are safe as literals.
        let names: Vec<String> = self
            .projections
            .iter()
            .map(|(p, _)| format!("'{}'", p.name().replace('\'', "''")))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        tables.sort();
        tables.dedup();
        let lock = if tables.is_empty() {
            String::new()
        } else {
            format!("LOCK TABLE {} IN ROW EXCLUSIVE MODE; ", tables.join(", "))
        };
        // One round trip (the simple protocol, two statements).
        let sql = format!(
            "{lock}SELECT name, version FROM converge.projections WHERE name IN ({})",
            names.join(", ")
        );
        let rows = sqlx::Executor::fetch_all(&mut *conn, sqlx::raw_sql(&sql))
            .await
            .map_err(Superseded::Database)?;
        for row in rows {
            let (name, registered): (String, i32) = (row.try_get(0)?, row.try_get(1)?);
            let Some((projection, _)) = self.projections.iter().find(|(p, _)| p.name() == name)
            else {
                continue;
            };
            if registered > projection.version() as i32 {
                return Err(Superseded::Version {
                    projection: projection.name(),
                    registered,
                    version: projection.version(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &SharedProjection> {
        self.projections.iter().map(|(p, _)| p)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.projections.is_empty()
    }

    /// Applies `event` to every inline projection that reads its type.
    pub(crate) async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &ProjectedEvent,
    ) -> Result<(), (&'static str, ProjectionError)> {
        for (projection, tables) in &self.projections {
            if !projection.reads(&event.aggregate_type) {
                continue;
            }
            let mut tx = ProjectionTx::new(&mut *conn, tables);
            projection
                .apply(&mut tx, event)
                .await
                .map_err(|e| (projection.name(), e))?;
        }
        Ok(())
    }
}

/// Why the inline projections cannot be applied in this transaction.
#[derive(Debug)]
pub(crate) enum Superseded {
    /// The lock or the read failed.
    Database(sqlx::Error),
    /// A newer version of a projection is registered.
    Version {
        projection: &'static str,
        registered: i32,
        version: u32,
    },
}

impl From<sqlx::Error> for Superseded {
    fn from(e: sqlx::Error) -> Self {
        Superseded::Database(e)
    }
}
