//! Who may reach the dashboard and who may act: the `Host` check on loopback,
//! the access token, the CSRF token and origin check on every action, and
//! the headers that keep pages out of frames and scripts out of pages.

use axum::extract::{Query, Request, State};
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

/// The host a loopback dashboard answers to: `localhost`, `127.x` or `[::1]`.
fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    name == "localhost" || name == "[::1]" || name.starts_with("127.")
}

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

/// Every request: the `Host` check (loopback), the access token (when one
/// is set; `/login` sets it as a cookie), and on a POST the origin check;
/// then the security headers on the answer.
pub(crate) async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if state.loopback {
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
    }
    if let Some(token) = &state.token {
        let login = request.uri().path() == "/login";
        let ok = presented_token(headers).is_some_and(|t| same(&t, token));
        if !ok && !login {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs its access token: open /login?token=TOKEN once \
                 (it sets a cookie), or send Authorization: Bearer TOKEN",
            );
        }
    }
    if request.method() == Method::POST {
        if let Err(why) = same_origin(headers) {
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
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A POST must come from the dashboard's own pages: a browser names the
/// origin of a cross-site form (`Origin`, `Sec-Fetch-Site`).
fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if get("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site") {
        return Err("refused: an action posted from another site".into());
    }
    if let (Some(origin), Some(host)) = (get("origin"), get("host")) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if origin != "null" && origin_host != host {
            return Err(format!(
                "refused: an action posted from origin {origin}, not this dashboard ({host})"
            ));
        }
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

/// `?token=` of `/login`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Login {
    token: Option<String>,
}

/// `/login?token=T`: sets the token as an HTTP-only, same-site cookie.
pub(crate) async fn login(State(state): State<Shared>, Query(q): Query<Login>) -> Response {
    let Some(expected) = &state.token else {
        return Redirect::to("/").into_response();
    };
    match q.token {
        Some(t) if same(&t, expected) => {
            let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        _ => refuse(StatusCode::UNAUTHORIZED, "wrong or missing ?token="),
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
        assert!(same_origin(&h).is_ok());
        h.insert("origin", HeaderValue::from_static("http://localhost:8089"));
        assert!(same_origin(&h).is_ok());
        h.insert("origin", HeaderValue::from_static("https://evil.example"));
        assert!(same_origin(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
