//! The PostgreSQL roles converge is deployed with, the privileges each needs,
//! and the SQL that grants them.
//!
//! One table of privileges serves three readers: [`grant_sql`] prints it
//! (`converge grants`), [`crate::check`] verifies a worker's at start (and
//! names what is missing), and the tests run each command as each role.
//! Nothing but the owner may change the schema: workers, the application and
//! operators run without DDL rights.

use std::fmt;
use std::str::FromStr;

/// A role in a converge deployment. Each maps to one PostgreSQL role (or
/// several sharing the same grants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Owns the `converge` schema and runs the migrations (`converge migrate`).
    Owner,
    /// The application: appends events in its own transactions and reads
    /// histories. No access to the operational tables.
    App,
    /// A worker: relays, reconciles, sweeps, serves the control plane and
    /// records its actions in the audit log (which it cannot delete).
    Worker,
    /// An operator: everything a viewer reads, plus the CLI's actions
    /// (dead letters, lock release, replays, audit entries).
    Operator,
    /// A viewer: `status`, lists, histories and the audit log; changes nothing.
    Viewer,
}

impl Role {
    /// Every role, in the order the documentation lists them.
    pub const ALL: [Role; 5] = [
        Role::Owner,
        Role::App,
        Role::Worker,
        Role::Operator,
        Role::Viewer,
    ];

    /// The role's name as the CLI spells it (`owner`, `app`, …).
    pub fn name(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::App => "app",
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// One line on what the role may do.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Owner => "owns the converge schema and runs `converge migrate`",
            Role::App => "appends events and reads histories, nothing else",
            Role::Worker => {
                "relays, reconciles, sweeps and serves the control plane; no DDL, \
                 cannot delete audit rows or change who did what"
            }
            Role::Operator => {
                "reads everything a viewer does, retries and discards dead letters, \
                 releases locks, replays the outbox and writes audit entries"
            }
            Role::Viewer => "reads status, lists, histories and the audit log; changes nothing",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A PostgreSQL role name `converge grants` will not print SQL for.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{0:?} is not a role name converge grants to: use 1 to 63 bytes without control \
     characters or backslashes, not PUBLIC, NONE, CURRENT_USER, SESSION_USER, CURRENT_ROLE \
     or a name starting with pg_"
)]
pub struct InvalidRoleName(pub String);

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown converge role {0:?}: expected one of owner, app, worker, operator, viewer")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// Every table converge's migrations create (and that this build knows).
pub(crate) const TABLES: &[&str] = &[
    "outbox",
    "outbox_heads",
    "outbox_clock",
    "retention_positions",
    "relay_partitions",
    "partition_layout",
    "relay_instances",
    "relay_rejects",
    "dead_letters",
    "rate_limits",
    "leases",
    "key_leases",
    "step_keys",
    "event_attempts",
    "sweep_schedules",
    "sweep_runs",
    "sweep_run_failures",
    "convergence_history",
    "audit",
    "workers",
    "snapshots",
    "retention_policies",
    "projections",
    "_sqlx_migrations",
];

const READ: &[&str] = &["SELECT"];
const READ_WRITE: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE"];
/// Audit rows are added and their outcome recorded; who did what (actor,
/// action, target, time) cannot be changed, and no row deleted.
const AUDIT: &[&str] = &["SELECT", "INSERT", "UPDATE (outcome, finished_at, details)"];

/// The privileges `role` needs on `converge.<table>`. A privilege may name
/// columns (`UPDATE (a, b)`): only those may change.
pub(crate) fn table_privileges(role: Role, table: &str) -> &'static [&'static str] {
    match (role, table) {
        (Role::Owner, _) => &[],
        (_, "_sqlx_migrations") => READ,
        (Role::Viewer, _) => READ,
        (Role::App, "outbox") => &["SELECT", "INSERT"],
        (Role::App, "outbox_heads") => &["SELECT", "INSERT", "UPDATE"],
        (Role::App, "outbox_clock" | "relay_partitions" | "relay_instances") => READ,
        // Event-sourced aggregates: snapshots taken as events are saved, and
        // the type's history kept from retention before its first event.
        (Role::App, "snapshots") => &["SELECT", "INSERT", "UPDATE"],
        (Role::App, "retention_policies") => &["SELECT", "INSERT"],
        // A repository registers its inline projections (their name, mode,
        // version and declarations, and a rebuild request when one is new
        // over an existing history; no cursor, no later rebuild state).
        (Role::App, "projections") => &[
            "SELECT",
            "INSERT (name, mode, version, tables, aggregate_types, seen_by, rebuild_state, \
             rebuild_requested_at, rebuild_requested_by)",
            "UPDATE (seen_at, seen_by)",
        ],
        (Role::App, _) => &[],
        (Role::Worker | Role::Operator, "audit") => AUDIT,
        // Appends (follow-up events) and retention; a published event is
        // never rewritten, a head never removed, the clock only re-based
        // by `converge.rebase()`.
        (Role::Worker, "outbox") => &["SELECT", "INSERT", "DELETE"],
        (Role::Worker, "outbox_heads") => &["SELECT", "INSERT", "UPDATE"],
        (Role::Worker, "outbox_clock" | "partition_layout") => READ,
        // A worker may keep a type's history, never give it up.
        (Role::Worker, "retention_policies") => &["SELECT", "INSERT"],
        (Role::Worker, _) => READ_WRITE,
        (Role::Operator, "dead_letters") => {
            &["SELECT", "UPDATE (resolved_at, resolution, resolved_by)"]
        }
        (Role::Operator, "leases") => {
            &["SELECT", "UPDATE (lock_until, holder, released_at, token)"]
        }
        // `converge projections rebuild` (the request, or its cancellation;
        // a worker does the work) and `forget`.
        (Role::Operator, "projections") => &[
            "SELECT",
            "DELETE",
            "UPDATE (rebuild_state, rebuild_requested_at, rebuild_requested_by, rebuild_audit_id, \
             rebuild_error)",
        ],
        (Role::Operator, _) => READ,
    }
}

/// Sequences `role` draws from.
pub(crate) fn sequence_privileges(role: Role) -> &'static [&'static str] {
    match role {
        Role::Worker => &["key_lease_tokens"],
        _ => &[],
    }
}

/// Functions not executable by `PUBLIC` that `role` calls.
pub(crate) fn function_privileges(role: Role) -> &'static [&'static str] {
    match role {
        // Re-bases the outbox after a restore (SECURITY DEFINER: it rewrites
        // `converge.tx_order()`, which only the owner may).
        Role::Worker => &["rebase()"],
        _ => &[],
    }
}

/// The SQL granting `role` to the PostgreSQL role `grantee`: run it as a
/// superuser or as the schema's owner, in the application's database, after
/// `converge migrate` (and again after an upgrade adds tables, though the
/// default privileges it sets cover tables the owner creates later).
///
/// ```
/// use converge_schema::{grant_sql, Role};
/// let sql = grant_sql(Role::Viewer, "ops_viewer").unwrap();
/// assert!(sql.contains(r#"GRANT SELECT ON converge.audit TO "ops_viewer";"#));
/// assert!(!sql.contains("INSERT"));
/// assert!(grant_sql(Role::Worker, "public").is_err());
/// ```
pub fn grant_sql(role: Role, grantee: &str) -> Result<String, InvalidRoleName> {
    let reserved = [
        "public",
        "none",
        "current_user",
        "session_user",
        "current_role",
    ];
    let lower = grantee.to_ascii_lowercase();
    if grantee.is_empty()
        || grantee.len() > 63
        || grantee.chars().any(|c| c.is_control() || c == '\\')
        || reserved.contains(&lower.as_str())
        || lower.starts_with("pg_")
    {
        return Err(InvalidRoleName(grantee.to_owned()));
    }
    let who = quote_ident(grantee);
    let mut sql = format!(
        "-- converge role `{role}` for PostgreSQL role {who}: {}.\n\
         -- Run as a superuser or the converge schema's owner, in the application's database.\n\
         -- CREATE ROLE {who} LOGIN PASSWORD '...';   -- if it does not exist yet\n",
        role.describe()
    );
    sql += &do_block(&format!(
        "EXECUTE format({}, current_database(), {})",
        quote_literal("GRANT CONNECT ON DATABASE %I TO %s"),
        quote_literal(&who)
    ));
    if role == Role::Owner {
        sql += &format!(
            "CREATE SCHEMA IF NOT EXISTS converge AUTHORIZATION {who};\n\
             -- If the schema exists already, owned by another role, keep migrating as that \
             role,\n-- or hand the schema and each of its tables, sequences and functions over \
             with\n-- ALTER … OWNER TO {who}; (not REASSIGN OWNED, which moves the old owner's \
             other objects too)\n"
        );
        return Ok(sql);
    }
    sql += &format!("GRANT USAGE ON SCHEMA converge TO {who};\n");
    for table in TABLES {
        let privileges = table_privileges(role, table);
        if !privileges.is_empty() {
            sql += &format!(
                "GRANT {} ON converge.{} TO {who};\n",
                privileges.join(", "),
                quote_ident_if_needed(table)
            );
        }
    }
    for sequence in sequence_privileges(role) {
        sql += &format!("GRANT USAGE ON SEQUENCE converge.{sequence} TO {who};\n");
    }
    for function in function_privileges(role) {
        sql += &format!("GRANT EXECUTE ON FUNCTION converge.{function} TO {who};\n");
    }
    if matches!(role, Role::Worker | Role::Operator | Role::Viewer) {
        sql += &format!(
            "-- Optional: to see other roles' transactions that hold the relays back \
             (converge status,\n-- the relay's warning), PostgreSQL needs: \
             GRANT pg_read_all_stats TO {who};\n"
        );
    }
    let future = match role {
        Role::Worker => Some("SELECT, INSERT, UPDATE, DELETE"),
        Role::Viewer | Role::Operator => Some("SELECT"),
        _ => None,
    };
    if let Some(privileges) = future {
        sql += "-- Tables a later converge version's migrations add:\n";
        sql += &do_block(&format!(
            "EXECUTE format({}, (SELECT nspowner::regrole::text FROM pg_namespace \
             WHERE nspname = 'converge'), {})",
            quote_literal(&format!(
                "ALTER DEFAULT PRIVILEGES FOR ROLE %s IN SCHEMA converge \
                 GRANT {privileges} ON TABLES TO %s"
            )),
            quote_literal(&who)
        ));
    }
    Ok(sql)
}

/// `name` as a double-quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn quote_ident_if_needed(name: &str) -> String {
    if name.starts_with('_') {
        quote_ident(name)
    } else {
        name.to_owned()
    }
}

/// A `DO` statement running `body` (quoted as a literal, so no name can end it).
fn do_block(body: &str) -> String {
    format!("DO {};\n", quote_literal(&format!("BEGIN {body}; END")))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
        }
        let err = "admin".parse::<Role>().unwrap_err().to_string();
        assert!(
            err.contains("owner, app, worker, operator, viewer"),
            "{err}"
        );
    }

    #[test]
    fn a_hostile_role_name_is_quoted() {
        let sql = grant_sql(Role::Viewer, "x\"; DROP TABLE t; --").unwrap();
        assert!(sql.contains("TO \"x\"\"; DROP TABLE t; --\";"), "{sql}");
        for bad in [
            "x\nGRANT pg_write_server_files TO mallory; --",
            "PUBLIC",
            "pg_monitor",
            "",
        ] {
            assert!(grant_sql(Role::Worker, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_the_worker_and_operator_write_and_nobody_deletes_audit() {
        for role in Role::ALL {
            let audit = table_privileges(role, "audit");
            assert!(!audit.contains(&"DELETE") && !audit.contains(&"UPDATE"));
        }
        for table in TABLES {
            assert_eq!(table_privileges(Role::Viewer, table), READ);
        }
    }
}
