//! Inline projections: applied by a repository in the transaction that
//! saves the events, to the live tables.

use sqlx::PgConnection;

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
    /// write of it. Idempotent within the transaction.
    pub(crate) async fn lock(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut tables: Vec<String> = self
            .projections
            .iter()
            .flat_map(|(p, _)| p.tables().iter().map(|t| super::names::quoted(t)))
            .collect();
        if tables.is_empty() {
            return Ok(());
        }
        tables.sort();
        tables.dedup();
        sqlx::query(&format!(
            "LOCK TABLE {} IN ROW EXCLUSIVE MODE",
            tables.join(", ")
        ))
        .execute(conn)
        .await?;
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
