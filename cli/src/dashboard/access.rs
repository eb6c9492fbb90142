//! Who may reach the dashboard and who may act: the `Host` check on loopback,
//! the access token, the CSRF token and origin check on every action, and
//! the headers that keep pages out of frames and scripts out of pages.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::{Power, Shared};

const COOKIE: &str = "converge_dashboard";

/// 32 random bytes, hex.
pub(crate) fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.to_owned(),
    )
        .into_response()
}

/// The host a loopback dashboard answers to: `localhost`, a loopback IPv4
/// address (`127.0.0.1`) or `[::1]`, with or without a port. Anything else
/// (`127.0.0.1.evil.example` included) is a name DNS could point anywhere.
fn loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || is_port(tail) => {
                return v6
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|a| a.is_loopback())
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// `:8089`
fn is_port(tail: &str) -> bool {
    tail.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Headers a reverse proxy adds: a loopback dashboard without a token behind
/// one would serve the proxy's network without asking anyone.
const PROXY_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
];

fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Every request: without a token, the loopback checks (a loopback `Host`,
/// no proxy in between); with one, the token (`/login` sets it as a
/// cookie); on a POST the origin check; then the security headers.
pub(crate) async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if state.loopback && state.token.is_none() {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !loopback_host(host) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "this dashboard listens on loopback and answers only to localhost",
            );
        }
        if let Some(proxied) = PROXY_HEADERS.iter().find(|h| headers.contains_key(**h)) {
            return refuse(
                StatusCode::FORBIDDEN,
                &format!(
                    "refused: a request through a proxy ({proxied}) to a dashboard without an \
                     access token; behind a proxy, start it with --access-token"
                ),
            );
        }
    }
    if let Some(token) = &state.token {
        let path = request.uri().path();
        let open = path == "/login" || path == "/assets/style.css";
        let ok = presented_token(headers).is_some_and(|t| same(&t, token));
        if !ok && !open {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs its access token: log in at /login (it sets a \
                 cookie), or send Authorization: Bearer TOKEN",
            );
        }
    }
    if request.method() == Method::POST {
        if let Err(why) = same_origin(headers, state.token.is_some()) {
            return refuse(StatusCode::FORBIDDEN, &why);
        }
    }
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // `same-origin`: a browser then names this origin on the forms it posts
        // (under `no-referrer` it sends `Origin: null`), and no other site learns
        // the dashboard's URLs.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A POST must come from the dashboard's own pages: a browser names the
/// origin of a cross-site form (`Origin`, `Sec-Fetch-Site`). Behind a proxy
/// (trusted only when a token is required) the page's host may be the one
/// the proxy forwarded (`X-Forwarded-Host`).
fn same_origin(headers: &HeaderMap, behind_proxy: bool) -> Result<(), String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if get("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site") {
        return Err("refused: an action posted from another site".into());
    }
    let Some(origin) = get("origin") else {
        return Ok(()); // not a browser's cross-origin form; the CSRF token decides
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    let hosts = [
        get("host"),
        behind_proxy.then(|| get("x-forwarded-host")).flatten(),
    ];
    if origin == "null" || !hosts.iter().flatten().any(|h| *h == origin_host) {
        return Err(format!(
            "refused: an action posted from origin {origin}, not this dashboard ({})",
            get("host").unwrap_or("?")
        ));
    }
    Ok(())
}

/// Checks the dashboard's power to act and the action's CSRF token: the
/// refusal to answer with when either fails.
pub(crate) fn refusal(state: &Shared, csrf: Option<&str>) -> Option<Response> {
    // The role first: a viewer is refused whatever it sends.
    if state.power == Power::Viewer {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "refused: this dashboard is read-only ({}); nothing was done",
                state.read_only_because.as_deref().unwrap_or("viewer")
            ),
        ));
    }
    if !csrf.is_some_and(|c| same(c, &state.csrf)) {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "refused: the action carries no valid CSRF token (reload the page and submit its \
             form again); nothing was done",
        ));
    }
    None
}

/// The login form's field.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Login {
    token: Option<String>,
}

/// `GET /login`: a form asking for the token (a token in a URL stays in
/// the browser's history and the proxies' logs).
pub(crate) async fn login_form(State(state): State<Shared>) -> Response {
    if state.token.is_none() {
        return Redirect::to("/").into_response();
    }
    super::pages::bare(
        "Log in",
        maud::html! {
            form method="post" action="/login" {
                label { "Access token " input type="password" name="token" autofocus; }
                " " button type="submit" id="login" { "Log in" }
            }
        },
    )
}

/// `POST /login`: the token, checked, set as an HTTP-only, same-site cookie
/// (`Secure` when a TLS proxy says it forwarded HTTPS).
pub(crate) async fn login(
    State(state): State<Shared>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<Login>,
) -> Response {
    let Some(expected) = &state.token else {
        return Redirect::to("/").into_response();
    };
    match form.token {
        Some(t) if same(&t, expected) => {
            let secure = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| p.eq_ignore_ascii_case("https"));
            let cookie = format!(
                "{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/{}",
                if secure { "; Secure" } else { "" }
            );
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        _ => refuse(StatusCode::UNAUTHORIZED, "wrong or missing access token"),
    }
}

/// The embedded stylesheet.
pub(crate) async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../assets/dashboard.css"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in ["localhost:8089", "127.0.0.1:1", "[::1]:80", "localhost"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8089",
            "127.0.0.1.evil.example",
            "10.0.0.1:80",
            "",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("localhost:8089"));
        assert!(same_origin(&h, false).is_ok());
        h.insert("origin", HeaderValue::from_static("http://localhost:8089"));
        assert!(same_origin(&h, false).is_ok());
        h.insert("origin", HeaderValue::from_static("https://evil.example"));
        assert!(same_origin(&h, false).is_err());
        h.insert("origin", HeaderValue::from_static("null"));
        assert!(same_origin(&h, false).is_err());
        // Behind a TLS proxy: the public host, forwarded.
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:8089"));
        h.insert("origin", HeaderValue::from_static("https://ops.example"));
        h.insert("x-forwarded-host", HeaderValue::from_static("ops.example"));
        assert!(same_origin(&h, true).is_ok());
        assert!(
            same_origin(&h, false).is_err(),
            "forwarded hosts count only with a token"
        );
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h, false).is_err());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
