//! Reading a PostgreSQL URL that may name several hosts, libpq's way:
//! `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write`.
//! sqlx takes one host per URL, so each host becomes a URL of its own
//! (everything else kept) that sqlx parses.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use super::PgConnectError;

/// Which server of the list a connection must reach, from the URL's
/// `target_session_attrs`. converge writes, so only the writable kinds are
/// accepted (with one host, also `any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetSession {
    /// Any server (`any`): no check; one host only.
    Any,
    /// A server that accepts writes (`read-write`): not in recovery and
    /// `transaction_read_only` off. The default with several hosts.
    ReadWrite,
    /// A server not in recovery (`primary`), whatever its read-only default.
    Primary,
}

impl TargetSession {
    /// The value as `target_session_attrs` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSession::Any => "any",
            TargetSession::ReadWrite => "read-write",
            TargetSession::Primary => "primary",
        }
    }
}

/// One host of the list: its options and how to name it in logs and errors.
#[derive(Clone)]
pub(crate) struct Host {
    /// `host:port` (no credentials).
    pub(crate) label: String,
    pub(crate) options: PgConnectOptions,
}

/// The hosts of a URL, in the order given, and what each connection must reach.
/// `Debug` shows the hosts and the target, never the options (they hold the password).
#[derive(Clone)]
pub struct PgHosts {
    pub(crate) hosts: Vec<Host>,
    pub(crate) target: TargetSession,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

impl std::fmt::Debug for PgHosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHosts")
            .field("hosts", &self.hosts)
            .field("target", &self.target)
            .finish()
    }
}

impl PgHosts {
    /// Reads `url`; errors name the part that is wrong (credentials masked).
    pub fn parse(url: &str) -> Result<PgHosts, PgConnectError> {
        let invalid = |message: String| PgConnectError::InvalidUrl {
            url: redact(url),
            message,
        };
        let (scheme, rest) = match url.split_once("://") {
            Some((s, rest)) if s == "postgres" || s == "postgresql" => (s, rest),
            _ => {
                return Err(invalid(
                    "it must start with postgres:// or postgresql://".to_owned(),
                ))
            }
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let mut target = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "target_session_attrs" => target = Some(value.to_owned()),
                "host" | "hostaddr" | "port" if value.contains(',') || value.contains("%2C") => {
                    return Err(invalid(format!(
                        "several hosts in the {key}= parameter are not read; \
                         list them in the address instead: postgres://user@h1:5432,h2:5432/db"
                    )))
                }
                _ => kept.push(pair),
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let names: Vec<&str> = host_list.split(',').collect();
        if names.len() > 1 && names.iter().any(|h| h.is_empty()) {
            return Err(invalid(format!(
                "the host list {host_list:?} has an empty entry; separate hosts by single commas"
            )));
        }
        let several = names.len() > 1;
        let target = match target.as_deref() {
            None if several => TargetSession::ReadWrite,
            None => TargetSession::Any,
            Some("any") if !several => TargetSession::Any,
            Some("read-write") => TargetSession::ReadWrite,
            Some("primary") => TargetSession::Primary,
            Some("any") => {
                return Err(invalid(
                    "target_session_attrs=any with several hosts would take whichever answers \
                     first, a standby included, and converge writes: use read-write or primary \
                     (or leave it out: read-write)"
                        .to_owned(),
                ))
            }
            Some(other @ ("read-only" | "standby" | "prefer-standby")) => {
                return Err(invalid(format!(
                    "target_session_attrs={other} asks for a standby, and converge writes: \
                     use read-write or primary"
                )))
            }
            Some(other) => {
                return Err(invalid(format!(
                    "target_session_attrs={other:?} is not a value PostgreSQL knows; \
                     use read-write or primary"
                )))
            }
        };
        let mut hosts = Vec::with_capacity(names.len());
        for name in names {
            let single = format!("{scheme}://{userinfo}{name}{path}{query}");
            let options = PgConnectOptions::from_str(&single).map_err(|e| {
                invalid(if several {
                    format!("host {name:?}: {e}")
                } else {
                    e.to_string()
                })
            })?;
            let label = format!("{}:{}", options.get_host(), options.get_port());
            hosts.push(Host { label, options });
        }
        Ok(PgHosts { hosts, target })
    }

    /// How many hosts the URL names.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the URL names no host (never: an empty host is the default one).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// What a connection must reach.
    pub fn target(&self) -> TargetSession {
        self.target
    }

    /// The hosts as `host:port`, in the URL's order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|h| h.label.as_str())
    }

    /// The connection options of host `index` (in the URL's order).
    pub fn options(&self, index: usize) -> Option<&PgConnectOptions> {
        self.hosts.get(index).map(|h| &h.options)
    }
}

/// `url` with its password replaced by `***`, for logs and errors: the
/// user info's (up to the last `@` before the query) and a `password=`
/// parameter's. Text that is not a URL is not echoed.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return "<not a URL>".to_owned();
    };
    let query_start = url[scheme_end..]
        .find(['?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let mut out = match url[scheme_end..query_start].rfind('@') {
        Some(at) => match url[scheme_end..scheme_end + at].find(':') {
            Some(colon) => format!(
                "{}:***{}",
                &url[..scheme_end + colon],
                &url[scheme_end + at..query_start]
            ),
            None => url[..query_start].to_owned(),
        },
        None => url[..query_start].to_owned(),
    };
    let query = &url[query_start..];
    if let Some(params) = query.strip_prefix('?') {
        let masked: Vec<String> = params
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&masked.join("&"));
    } else {
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(url: &str) -> Vec<String> {
        PgHosts::parse(url)
            .unwrap()
            .labels()
            .map(str::to_owned)
            .collect()
    }

    fn refusal(url: &str) -> String {
        PgHosts::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn one_host_is_sqlx_s_url() {
        let hosts = PgHosts::parse("postgres://u:p@db.example:6432/app?sslmode=disable").unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts.target(), TargetSession::Any);
        let options = hosts.options(0).unwrap();
        assert_eq!(options.get_host(), "db.example");
        assert_eq!(options.get_port(), 6432);
        assert_eq!(options.get_database(), Some("app"));
        assert_eq!(options.get_username(), "u");
    }

    #[test]
    fn several_hosts_keep_the_rest_of_the_url_and_default_to_read_write() {
        let url = "postgresql://app:s3cret@10.0.0.1:5432,10.0.0.2,[::1]:5433/orders?application_name=w&sslmode=prefer";
        assert_eq!(
            labels(url),
            ["10.0.0.1:5432", "10.0.0.2:5432", "[::1]:5433"]
        );
        let hosts = PgHosts::parse(url).unwrap();
        assert_eq!(hosts.target(), TargetSession::ReadWrite);
        for i in 0..3 {
            let o = hosts.options(i).unwrap();
            assert_eq!(o.get_database(), Some("orders"));
            assert_eq!(o.get_username(), "app");
            assert_eq!(o.get_application_name(), Some("w"));
        }
    }

    #[test]
    fn target_session_attrs_is_read_and_not_passed_on() {
        let hosts =
            PgHosts::parse("postgres://a:1,b:2/db?target_session_attrs=primary&sslmode=disable")
                .unwrap();
        assert_eq!(hosts.target(), TargetSession::Primary);
        assert_eq!(
            PgHosts::parse("postgres://a/db?target_session_attrs=read-write")
                .unwrap()
                .target(),
            TargetSession::ReadWrite
        );
    }

    #[test]
    fn what_converge_cannot_use_is_refused_naming_why() {
        assert!(refusal("postgres://a,b/db?target_session_attrs=standby").contains("standby"));
        assert!(refusal("postgres://a,b/db?target_session_attrs=any").contains("read-write"));
        assert!(refusal("postgres://a/db?target_session_attrs=writable").contains("writable"));
        assert!(refusal("postgres://a,,b/db").contains("empty entry"));
        assert!(refusal("postgres://a/db?host=b,c").contains("list them in the address"));
        assert!(refusal("mysql://a/db").contains("postgres://"));
        assert!(refusal("postgres://u:pw@a:1,b:x/db").contains("\"b:x\""));
        // The password never shows.
        assert!(!refusal("postgres://u:hunter2@a:1,b:x/db").contains("hunter2"));
    }

    #[test]
    fn redaction_masks_the_password_only() {
        assert_eq!(
            redact("postgres://u:p@ss@h1,h2/db?x=1"),
            "postgres://u:***@h1,h2/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db?a=b@c"), "postgres://h/db?a=b@c");
        assert_eq!(redact("postgres://u:ab/cd@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u@h/db?password=s3&x=1"),
            "postgres://u@h/db?password=***&x=1"
        );
        assert_eq!(redact("host=a password=x"), "<not a URL>");
    }
}
