//! The compare-and-set statements: transitions, claims and reads, in the
//! caller's transaction or executor, on the database clock.

use super::*;

impl StateMachine {
    /// Moves `key` from `from` to `to` if, and only if, it is in `from` now: a
    /// compare-and-set `UPDATE` on `conn` (pass `&mut tx` to run it in the
    /// caller's transaction, which keeps the row locked until it ends).
    ///
    /// * When `from` is intermediate, the caller must hold its claim
    ///   (`claimed_by = claimant`); otherwise the claimant is not checked.
    /// * When `to` is intermediate, the claim is set to `claimant` at the
    ///   database's current time; otherwise the claim columns are cleared.
    ///
    /// Concurrent callers cannot both apply it: the second waits for the first
    /// transaction's row lock and then finds the row moved ([`Transition::Conflict`]
    /// under `READ COMMITTED`, a retryable serialization failure under
    /// `REPEATABLE READ` / `SERIALIZABLE`). An undeclared transition is
    /// rejected before any SQL runs.
    pub async fn transition_to(
        &self,
        conn: &mut PgConnection,
        key: &str,
        from: &str,
        to: &str,
        claimant: &str,
    ) -> Result<Transition, StateError> {
        self.check_transition(from, to)?;
        let fenced = self.intermediate.contains_key(from);
        let claims_to = self.intermediate.contains_key(to);
        let mut sql = format!(
            "UPDATE {t} SET {state} = CAST($3 AS {st})",
            t = self.table,
            state = self.state,
            st = self.state_type,
        );
        if claims_to {
            let _ = write!(
                sql,
                ", {by} = $4, {at} = statement_timestamp()",
                by = self.claimed_by,
                at = self.claimed_at
            );
        } else if self.has_claims() {
            let _ = write!(
                sql,
                ", {by} = NULL, {at} = NULL",
                by = self.claimed_by,
                at = self.claimed_at
            );
        }
        let _ = write!(
            sql,
            " WHERE {key} = CAST($1 AS {kt}) AND {state} = CAST($2 AS {st})",
            key = self.key,
            kt = self.key_type,
            state = self.state,
            st = self.state_type,
        );
        if fenced {
            let _ = write!(sql, " AND {by} = $4", by = self.claimed_by);
        }
        let mut query = sqlx::query(&sql).bind(key).bind(from).bind(to);
        if claims_to || fenced {
            query = query.bind(claimant);
        }
        let done = query.execute(&mut *conn).await?;
        if done.rows_affected() > 0 {
            return Ok(Transition::Applied);
        }
        let (current, claimed_by) = self.read(conn, key).await?;
        Ok(Transition::Conflict {
            current,
            claimed_by,
        })
    }

    /// Claims the intermediate state `to` for `claimant`: moves `key` from `from`
    /// into `to` ([`Claim::Claimed`]), or, when `key` is already in `to` with a
    /// claim older than `to`'s lease (or none), takes the claim over
    /// ([`Claim::Resumed`]: the step died half-way, resume it). Otherwise nothing
    /// is written ([`Claim::NotClaimable`]). The lease is measured on the
    /// database clock. When `from` is itself intermediate, the caller must hold
    /// its claim.
    ///
    /// Runs on `conn` (pass `&mut tx` for the caller's transaction); concurrent
    /// claims of one key cannot both succeed, as with
    /// [`transition_to`](Self::transition_to).
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &str,
        from: &str,
        to: &str,
        claimant: &str,
    ) -> Result<Claim, StateError> {
        let lease = self.lease_of(to)?;
        self.check_transition(from, to)?;
        let fence = if self.intermediate.contains_key(from) {
            format!(" AND {by} = $4", by = self.claimed_by)
        } else {
            String::new()
        };
        // The sub-select locks the row only when it is claimable (re-checked on
        // the newest row version after waiting for a concurrent writer) and
        // hands the previous claimant to RETURNING.
        let sql = format!(
            "UPDATE {t} AS cur \
             SET {state} = CAST($3 AS {st}), {by} = $4, {at} = statement_timestamp() \
             FROM (SELECT {key} AS k, {state}::text AS s, {by}::text AS b FROM {t} \
                   WHERE {key} = CAST($1 AS {kt}) \
                     AND (({state} = CAST($2 AS {st}){fence}) \
                          OR ({state} = CAST($3 AS {st}) \
                              AND ({at} IS NULL \
                                   OR {at} < statement_timestamp() - make_interval(secs => $5)))) \
                   FOR UPDATE) AS prev \
             WHERE cur.{key} = prev.k \
             RETURNING prev.s, prev.b",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
            st = self.state_type,
            by = self.claimed_by,
            at = self.claimed_at,
        );
        let row = sqlx::query(&sql)
            .bind(key)
            .bind(from)
            .bind(to)
            .bind(claimant)
            .bind(lease.as_secs_f64())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            let previous_state: Option<String> = row.try_get(0)?;
            return Ok(if previous_state.as_deref() == Some(to) {
                Claim::Resumed {
                    previous: row.try_get(1)?,
                }
            } else {
                Claim::Claimed
            });
        }
        let (current, claimed_by) = self.read(conn, key).await?;
        Ok(Claim::NotClaimable {
            current,
            claimed_by,
        })
    }

    /// The state of `key`, `None` if the key does not exist.
    pub async fn current<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        key: &str,
    ) -> Result<Option<String>, StateError> {
        let sql = format!(
            "SELECT {state}::text FROM {t} WHERE {key} = CAST($1 AS {kt})",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
        );
        let state = sqlx::query_scalar::<_, Option<String>>(&sql)
            .bind(key)
            .fetch_optional(executor)
            .await?;
        Ok(state.flatten())
    }

    /// Keys in the intermediate `state` whose claim is older than its lease (or
    /// missing): steps that died half-way, to resume with [`claim`](Self::claim).
    ///
    /// Keyset-paginated: the keys after `after` (`None` for the first page), in
    /// key order (of the key type), at most `limit`; pass the last key of a page
    /// as `after` for the next one. Keys are returned as text.
    pub async fn expired_claims<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        let lease = self.lease_of(state)?;
        self.page(executor, state, Some(lease), after, limit).await
    }

    /// Keys in `state` (typically a state that is not intermediate, e.g. the
    /// `SHIPPED` orders still to invoice), keyset-paginated like
    /// [`expired_claims`](Self::expired_claims).
    pub async fn keys_in<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        if !self.is_known(state) {
            return Err(StateError::UnknownState {
                state: state.to_owned(),
            });
        }
        self.page(executor, state, None, after, limit).await
    }

    pub(super) async fn page<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        expired_after: Option<Duration>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        let mut sql = format!(
            "SELECT r.{key}::text FROM {t} AS r WHERE r.{state} = CAST($1 AS {st})",
            t = self.table,
            key = self.key,
            state = self.state,
            st = self.state_type,
        );
        let mut next = 2;
        if expired_after.is_some() {
            let _ = write!(
                sql,
                " AND (r.{at} IS NULL OR r.{at} < statement_timestamp() - make_interval(secs => $2))",
                at = self.claimed_at
            );
            next += 1;
        }
        if after.is_some() {
            let _ = write!(
                sql,
                " AND r.{key} > CAST(${next} AS {kt})",
                key = self.key,
                kt = self.key_type
            );
            next += 1;
        }
        // Qualified: a bare name would sort by the text output column of that name.
        let _ = write!(sql, " ORDER BY r.{key} LIMIT ${next}", key = self.key);
        let mut query = sqlx::query_scalar::<_, String>(&sql).bind(state);
        if let Some(lease) = expired_after {
            query = query.bind(lease.as_secs_f64());
        }
        if let Some(after) = after {
            query = query.bind(after);
        }
        Ok(query.bind(limit.max(0)).fetch_all(executor).await?)
    }

    /// The row's state and claimant, `(None, None)` if the key does not exist.
    pub(super) async fn read(
        &self,
        conn: &mut PgConnection,
        key: &str,
    ) -> Result<(Option<String>, Option<String>), StateError> {
        let claimed_by = if self.has_claims() {
            format!("{}::text", self.claimed_by)
        } else {
            "NULL::text".to_owned()
        };
        let sql = format!(
            "SELECT {state}::text, {claimed_by} FROM {t} WHERE {key} = CAST($1 AS {kt})",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
        );
        let row = sqlx::query(&sql).bind(key).fetch_optional(conn).await?;
        match row {
            Some(row) => Ok((row.try_get(0)?, row.try_get(1)?)),
            None => Ok((None, None)),
        }
    }
}
