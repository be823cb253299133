//! The web console: a page at `/` and its assets under `/console/`, built
//! into the binary (no build step beyond `cargo build`). The assets hold no
//! data, so they are served without the token; every call the page makes
//! goes to the API with the token (or tenant key) the person signs in with.
//!
//! Not part of `/openapi.json`: these routes are a client of the API, not
//! the API.

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{ApiError, AppState};

/// Everything the page may do: its own scripts, styles and API, nothing
/// inline, nothing from elsewhere, never framed. Trusted Types make any
/// `innerHTML`-like assignment throw, so untrusted text can only ever
/// reach the page as text nodes.
pub const CSP: &str = "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; \
                       object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'; \
                       require-trusted-types-for 'script'; trusted-types 'none'";

/// `(name under /console/, content type, bytes)`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../../console/api.js")),
    ("sse.js", "text/javascript; charset=utf-8", include_bytes!("../../console/sse.js")),
    ("markdown.js", "text/javascript; charset=utf-8", include_bytes!("../../console/markdown.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../../console/dom.js")),
    ("chat.js", "text/javascript; charset=utf-8", include_bytes!("../../console/chat.js")),
    ("console.css", "text/css; charset=utf-8", include_bytes!("../../console/console.css")),
    ("icon.svg", "image/svg+xml", include_bytes!("../../console/icon.svg")),
];

const INDEX: &[u8] = include_bytes!("../../console/index.html");

pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/console/{*file}", get(asset))
}

/// Whether a request is for the console's static files, which the token
/// does not guard (the Host and Origin checks still apply).
pub fn is_public(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::GET || method == axum::http::Method::HEAD)
        && (path == "/" || path.strip_prefix("/console/").is_some_and(|file| ASSETS.iter().any(|(name, _, _)| *name == file)))
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => page(content_type, bytes),
        None => ApiError::NoRoute { method: "GET".into(), path: format!("/console/{file}") }.into_response(),
    }
}

fn page(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    // A new binary may bring new assets: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn only_the_console_files_are_public() {
        assert!(is_public(&Method::GET, "/"));
        assert!(is_public(&Method::HEAD, "/console/app.js"));
        assert!(!is_public(&Method::POST, "/"));
        assert!(!is_public(&Method::GET, "/console/nope.js"));
        assert!(!is_public(&Method::GET, "/console/"));
        assert!(!is_public(&Method::GET, "/agents"));
        assert!(!is_public(&Method::GET, "/console/../agents"));
    }
}
