//! Safe by default on a developer's machine: no web page the user visits can
//! drive the API (cross-origin requests are refused unless listed), DNS
//! rebinding is refused on a loopback bind, and an optional token guards
//! every route but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::ApiError;
use crate::config::Settings;

pub struct Security {
    loopback_only: bool,
    cors_origins: Vec<String>,
    token: Option<String>,
}

impl Security {
    pub fn from_settings(settings: &Settings) -> Security {
        Security {
            loopback_only: settings.host.is_loopback(),
            cors_origins: settings.cors_origins.iter().map(|o| o.trim_end_matches('/').to_string()).collect(),
            token: settings.token.clone(),
        }
    }

    /// Answers preflights and adds CORS headers for the listed origins only.
    pub fn cors_layer(&self) -> CorsLayer {
        let origins: Vec<HeaderValue> = self.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT])
    }
}

pub async fn guard(State(security): State<Arc<Security>>, req: Request, next: Next) -> Response {
    if security.loopback_only
        && let Some(host) = req.headers().get(header::HOST)
        && !is_loopback_host(host.to_str().unwrap_or(""))
    {
        return ApiError::Forbidden(format!(
            "host `{}` is refused: this server is bound to loopback and answers only `localhost` or a loopback address",
            host.to_str().unwrap_or("?")
        ))
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !security.cors_origins.iter().any(|o| o == origin) {
            return ApiError::Forbidden(format!(
                "cross-origin request from `{origin}` refused; start the server with --cors-origin {origin} to allow it"
            ))
            .into_response();
        }
    }
    let preflight = req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if let Some(token) = &security.token
        && req.uri().path() != "/health"
        && !preflight
    {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(sent.as_bytes(), token.as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in ["localhost", "localhost:2323", "127.0.0.1:1", "127.1.2.3", "[::1]:2323", "LOCALHOST"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["evil.test", "evil.test:2323", "10.0.0.1", "localhost.evil.test", "[::2]:1", ""] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
