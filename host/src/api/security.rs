//! Safe by default on a developer's machine: no web page the user visits can
//! drive the API (cross-origin requests are refused unless listed), DNS
//! rebinding is refused on a loopback bind, and an optional token guards
//! every route but `/health`.

use axum::extract::Request;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use axum::http::uri::Authority;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::ApiError;
use crate::config::Settings;
use crate::tenancy::{Caller, Refused, Tenancy, constant_time_eq};

pub struct Security {
    loopback_only: bool,
    /// `--cors-origin '*'`: every origin is allowed.
    any_origin: bool,
    cors_origins: Vec<String>,
    token: Option<String>,
    /// Multi-tenant mode: the admin token and tenant keys.
    tenancy: Option<Tenancy>,
}

/// Routes only the admin token may use in multi-tenant mode (a tenant key
/// gets 403): tenants, server-wide metrics, the plugins directory reload.
/// Requests that answer with a long-lived event stream (`max_streams`):
/// a message stream, a run's events, and an MCP client's GET stream (its
/// POSTs answer one request each and end).
fn is_stream(method: &axum::http::Method, path: &str) -> bool {
    path.starts_with("/sessions/")
        && (path.ends_with("/message/stream")
            || path.ends_with("/events")
            || (method == axum::http::Method::GET && path.ends_with("/mcp")))
}

fn admin_only(path: &str) -> bool {
    path == "/tenants" || path.starts_with("/tenants/") || path == "/metrics" || path == "/plugins/reload"
}

impl Security {
    pub fn new(settings: &Settings, tenancy: Option<Tenancy>) -> Security {
        Security {
            loopback_only: settings.host.is_loopback(),
            any_origin: settings.cors_origins.iter().any(|o| o == "*"),
            cors_origins: settings.cors_origins.iter().map(|o| o.trim_end_matches('/').to_string()).collect(),
            token: settings.token.clone(),
            tenancy,
        }
    }

    /// Answers preflights and adds CORS headers for the listed origins only
    /// (any origin for `*`).
    pub fn cors_layer(&self) -> CorsLayer {
        let allow = if self.any_origin {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(self.cors_origins.iter().filter_map(|o| o.parse::<HeaderValue>().ok()))
        };
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT])
    }
}

/// Refuses what the server must not answer (another host name on a loopback
/// bind, an unlisted origin, a missing or wrong token, a tenant over its
/// quota); else answers with `next`.
pub async fn guard(security: &Security, mut req: Request, next: Next) -> Response {
    if security.loopback_only
        && let Err(refused) = check_loopback_target(&req)
    {
        return ApiError::Forbidden(format!(
            "{refused}: this server is bound to loopback and answers only `localhost` or a loopback address"
        ))
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN)
        && !security.any_origin
        && !same_origin(&req)
    {
        let origin = origin.to_str().unwrap_or("");
        if !security.cors_origins.iter().any(|o| o == origin) {
            return ApiError::Forbidden(format!(
                "cross-origin request from `{origin}` refused; start the server with --cors-origin {origin} to allow it"
            ))
            .into_response();
        }
    }
    let preflight = req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if req.uri().path() == "/health" || preflight || super::console::is_public(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let sent = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    if let Some(tenancy) = &security.tenancy {
        let caller = match tenancy.resolve(&sent).await {
            Ok(caller) => caller,
            Err(Refused::Unauthorized) => return ApiError::Unauthorized.into_response(),
            Err(Refused::Store(err)) => return ApiError::from(err).into_response(),
        };
        if let Caller::Tenant(tenant) = &caller {
            if admin_only(req.uri().path()) {
                return ApiError::Forbidden("this route needs the admin token; a tenant key cannot use it".into()).into_response();
            }
            let quotas = match tenancy.quotas(tenant).await {
                Ok(q) => q,
                Err(err) => return ApiError::from(err).into_response(),
            };
            let slot = if is_stream(req.method(), req.uri().path()) {
                tenancy.open_stream(tenant, quotas.max_streams).map(Some)
            } else {
                Ok(None)
            };
            let slot = match tenancy.count_request(tenant, quotas.requests_per_minute).and(slot) {
                Ok(slot) => slot,
                Err(exceeded) => {
                    let mut response = ApiError::Quota(exceeded).into_response();
                    response.extensions_mut().insert(caller);
                    return response;
                }
            };
            req.extensions_mut().insert(caller.clone());
            let mut response = next.run(req).await;
            response.extensions_mut().insert(caller);
            // The stream counts until its body is dropped (the client left,
            // or it ended).
            return match slot {
                Some(slot) => response.map(|body| {
                    axum::body::Body::from_stream(futures::StreamExt::map(body.into_data_stream(), move |chunk| {
                        let _open = &slot;
                        chunk
                    }))
                }),
                None => response,
            };
        }
        req.extensions_mut().insert(caller.clone());
        let mut response = next.run(req).await;
        // For the request's log line, which is written outside this guard.
        response.extensions_mut().insert(caller);
        return response;
    }
    if let Some(token) = &security.token
        && !constant_time_eq(sent.as_bytes(), token.as_bytes())
    {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// A request from a page this server served (the console): its `Origin`
/// names the host it was sent to. Browsers send `Origin` on same-origin
/// POSTs and module scripts too; a page elsewhere cannot claim this one's.
fn same_origin(req: &Request) -> bool {
    let (Some(origin), Some(host)) = (req.headers().get(header::ORIGIN), req.headers().get(header::HOST)) else {
        return false;
    };
    let (Ok(origin), Ok(host)) = (origin.to_str(), host.to_str()) else {
        return false;
    };
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    !host.is_empty() && authority.is_some_and(|a| a.eq_ignore_ascii_case(host))
}

/// Every name the request gives for its target must be loopback: the one
/// `Host` header and, in an absolute-form request target
/// (`GET http://name/path`), the URI's authority, which takes precedence
/// over `Host`.
fn check_loopback_target(req: &Request) -> Result<(), String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err("a request with more than one `Host` header is refused".into());
        }
        let host = host.to_str().unwrap_or("");
        if !is_loopback_host(host) {
            return Err(format!("host `{}` is refused", host.escape_debug()));
        }
    }
    if let Some(authority) = req.uri().authority()
        && !is_loopback_host(authority.as_str())
    {
        return Err(format!("request target `{}` is refused", authority.as_str().escape_debug()));
    }
    Ok(())
}

/// `localhost`, a loopback IPv4 address, or `[::1]`, each with an optional
/// port (1 to 5 digits, at most 65535); case-insensitive; nothing else
/// (no user info, no trailing characters, no trailing dot).
fn is_loopback_host(host: &str) -> bool {
    // The URI grammar first (no spaces, no stray characters), then ours.
    let Ok(authority) = host.parse::<Authority>() else {
        return false;
    };
    let authority = authority.as_str();
    if authority.contains('@') {
        return false;
    }
    let (name, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        match ip.parse::<Ipv6Addr>() {
            Ok(ip) if IpAddr::V6(ip).to_canonical().is_loopback() => {}
            _ => return false,
        }
        (None, port)
    } else {
        match authority.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(authority), None),
        }
    };
    if let Some(port) = port
        && !(matches!(port.len(), 1..=5) && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u32>().is_ok_and(|p| p <= 65535))
    {
        return false;
    }
    match name {
        None => true,
        Some(name) => name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:2323",
            "LOCALHOST",
            "LocalHost:80",
            "127.0.0.1",
            "127.0.0.1:2323",
            "127.0.0.1:1",
            "127.1.2.3",
            "127.255.255.255:65535",
            "[::1]",
            "[::1]:2323",
            "[0:0:0:0:0:0:0:1]:2323",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.test",
            "evil.test:2323",
            "10.0.0.1",
            "localhost.evil.test",
            "[::2]:1",
            // Trailing characters, user info, a port that is not one.
            "[::1]evil.com",
            "[::1]:2323evil.com",
            "[::1]:",
            "[::1",
            "::1",
            "127.0.0.1:80@evil.com",
            "localhost@evil.com",
            "user@localhost",
            "localhost:abc",
            "localhost:",
            "localhost:65536",
            "localhost:123456",
            "localhost:+80",
            "localhost:-1",
            "localhost:80:80",
            "localhost.",
            "localhost evil.com",
            "localhost/evil",
            "localhost\tevil",
            "127.0.0.1.evil.com",
            "127.0.0.01",
            "127.1",
            "0x7f.0.0.1",
            "[127.0.0.1]",
            "[::1%25lo]",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    fn request(target: &str, hosts: &[&str]) -> Request {
        let mut builder = Request::builder().uri(target);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    fn from(origin: &str, host: &str) -> Request {
        Request::builder().uri("/agents").header(header::HOST, host).header(header::ORIGIN, origin).body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn same_origin_is_the_host_the_request_went_to() {
        assert!(same_origin(&from("http://127.0.0.1:2323", "127.0.0.1:2323")));
        assert!(same_origin(&from("http://localhost:2323", "LOCALHOST:2323")));
        assert!(!same_origin(&from("http://127.0.0.1:2324", "127.0.0.1:2323")));
        assert!(!same_origin(&from("http://evil.test", "127.0.0.1:2323")));
        assert!(!same_origin(&from("null", "127.0.0.1:2323")));
        assert!(!same_origin(&from("http://127.0.0.1:2323/", "127.0.0.1:2323")));
        assert!(!same_origin(&from("http://", "")));
    }

    #[test]
    fn request_targets() {
        assert!(check_loopback_target(&request("/agents", &["localhost:2323"])).is_ok());
        assert!(check_loopback_target(&request("/agents", &[])).is_ok());
        assert!(check_loopback_target(&request("http://localhost:2323/agents", &["localhost:2323"])).is_ok());
        assert!(check_loopback_target(&request("/agents", &["localhost", "localhost"])).is_err());
        assert!(check_loopback_target(&request("/agents", &["localhost", "evil.com"])).is_err());
        assert!(check_loopback_target(&request("http://evil.com/agents", &["localhost"])).is_err());
        assert!(check_loopback_target(&request("http://evil.com/agents", &[])).is_err());
        assert!(check_loopback_target(&request("/agents", &["evil.com"])).is_err());
    }
}
