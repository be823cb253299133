//! The `http` capability: outbound requests to granted origins, with the
//! stored credential inserted by the host and scrubbed from what comes back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;
use wasmtime::component::Resource;

use super::bindings::wit_http::{Credential, Host, HostBody, HttpError, Request, Response};
use super::policy::{Origin, OriginPattern};
use super::state::PluginState;

/// Upper bound on the wait for response headers, whatever the plugin asks.
const MAX_HEADER_WAIT: Duration = Duration::from_secs(300);
/// Headers a plugin may not set: credentials go through `credential`.
const FORBIDDEN_HEADERS: [&str; 5] = ["authorization", "proxy-authorization", "cookie", "host", "x-api-key"];

/// A provider key. Its `Debug` never shows it, so it cannot reach a log line
/// by accident.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(key: String) -> Secret {
        Secret(key)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// What one call may reach, and with which credential.
pub struct HttpAccess {
    pub clients: Arc<Clients>,
    pub allowed: Vec<OriginPattern>,
    pub credential: Option<Secret>,
    /// The one origin the credential goes to (the stored base URL's, or
    /// the vendor's); `None`: it goes nowhere.
    pub credential_origin: Option<Origin>,
    /// The one header it travels in (lowercase; `authorization` is bearer).
    pub credential_header: String,
    /// A tenant's request (multi-tenant mode, the tenant's own base URL):
    /// internal addresses are refused, but for these hosts the operator
    /// names in `[tenants] allowed_origins`. `None`: not restricted.
    pub internal_hosts: Option<Arc<Vec<String>>>,
}

/// Addresses a tenant's requests may not reach unless the operator names
/// the host: loopback, private, link-local (cloud metadata at
/// 169.254.169.254), shared (CGNAT), unique-local, unspecified, broadcast
/// and multicast; an IPv4-mapped IPv6 address as its IPv4 one.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Resolves names for tenants' requests, keeping no internal address of a
/// name the operator did not list: the check is on what the connection
/// will use, so DNS cannot turn an allowed name into an internal address.
struct PublicResolver {
    explicit: Arc<Vec<String>>,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let explicit = self.explicit.iter().any(|h| h.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let kept = public_addrs(&host, 0, explicit).await?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses of `host` a tenant's request may use: all of them when
/// the operator names the host (`explicit`), else those that are not
/// internal; none is an error.
pub async fn public_addrs(host: &str, port: u16, explicit: bool) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve `{host}`: {e}"))?.collect();
    let kept: Vec<SocketAddr> = found.into_iter().filter(|a| explicit || !is_internal(a.ip())).collect();
    if kept.is_empty() {
        return Err(format!("`{host}` resolves only to internal addresses, which a tenant's requests may not reach"));
    }
    Ok(kept)
}

/// Responses one connection carries at once. HTTP/2 multiplexes a
/// plugin's requests to an origin over one connection (the vendors offer
/// it through ALPN), but a server caps the streams it takes on one
/// connection (`SETTINGS_MAX_CONCURRENT_STREAMS`), and hyper's pool queues
/// a request past that cap instead of opening another connection: a busy
/// host would then wait for other runs' answers to end. RFC 9113
/// recommends that servers allow at least 100, so at 100 a request waits
/// only on a server that caps lower.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// Plugins' outbound HTTP clients: one, and one more each time all hold
/// [`STREAMS_PER_CONNECTION`] responses, so an origin that speaks HTTP/2
/// gets at most a hundred concurrent answers on a connection (counted over
/// all origins: a client full of one origin's answers sends the next
/// origin's on the next client). An HTTP/1.1 origin gets a connection per
/// request, as from one client. Clients are kept once made; an idle one
/// holds no connection past reqwest's idle timeout.
pub struct Clients {
    build: Box<dyn Fn() -> reqwest::Client + Send + Sync>,
    slots: std::sync::Mutex<Vec<Arc<Slot>>>,
}

struct Slot {
    client: reqwest::Client,
    open: std::sync::atomic::AtomicUsize,
}

/// One response in flight on a [`Clients`] slot, released when dropped.
pub struct Lease(Arc<Slot>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clients {
    fn new(build: impl Fn() -> reqwest::Client + Send + Sync + 'static) -> Clients {
        Clients { build: Box::new(build), slots: std::sync::Mutex::new(Vec::new()) }
    }

    /// The client for one more request, and its place until the response
    /// ends. The first slot with room is taken, so the later ones fall
    /// idle when the load drops and their connections close (reqwest's
    /// idle timeout).
    pub fn lease(&self) -> (reqwest::Client, Lease) {
        use std::sync::atomic::Ordering;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match slots.iter().find(|s| s.open.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION) {
            Some(slot) => slot.clone(),
            None => {
                let slot = Arc::new(Slot { client: (self.build)(), open: Default::default() });
                slots.push(slot.clone());
                slot
            }
        };
        slot.open.fetch_add(1, Ordering::Relaxed);
        (slot.client.clone(), Lease(slot))
    }
}

/// The clients for tenants' requests: as [`clients`], with names resolved
/// by [`PublicResolver`].
pub fn public_clients(explicit: Arc<Vec<String>>, roots: Vec<reqwest::Certificate>) -> Clients {
    Clients::new(move || {
        builder(&roots).dns_resolver(Arc::new(PublicResolver { explicit: explicit.clone() })).build().expect("build the HTTP client")
    })
}

/// The HTTP clients shared by all plugins, trusting `roots` besides the
/// built-in ones (`[http] ca_file`).
pub fn clients(roots: Vec<reqwest::Certificate>) -> Clients {
    Clients::new(move || builder(&roots).build().expect("build the HTTP client"))
}

/// Follows no redirect: a credential must never travel to a host the
/// plugin did not name. HTTPS offers HTTP/2 and HTTP/1.1 (ALPN). An
/// HTTP/2 connection is pinged while it carries nothing new: one that died
/// without a word (a NAT that forgot it) would otherwise hold every answer
/// on it until the header timeout, or for good once headers had come.
pub fn builder(roots: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    roots.iter().fold(
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true),
        |b, root| b.add_root_certificate(root.clone()),
    )
}

/// A response body being streamed to the guest.
pub struct HttpBody {
    /// The response until its end, with its place on a connection.
    response: Option<(reqwest::Response, Lease)>,
    scrubber: Scrubber,
    pending: Vec<u8>,
}

impl Host for PluginState {
    async fn send(&mut self, req: Request) -> wasmtime::Result<Result<Response, HttpError>> {
        let Some(access) = &self.http else {
            return Ok(Err(HttpError::Denied(format!("plugin `{}` is not granted http", self.plugin))));
        };
        Ok(match access.send(&self.plugin, req).await {
            Ok(Sent { status, headers, body }) => Ok(Response { status, headers, body: self.table.push(body)? }),
            Err(err) => Err(err),
        })
    }
}

/// A response whose headers have arrived.
pub struct Sent {
    pub status: u16,
    /// Scrubbed of the credential.
    pub headers: Vec<(String, String)>,
    pub body: HttpBody,
}

impl HttpAccess {
    /// Sends `plugin`'s request: to a granted origin only, with the
    /// credential where the request asks for it and the manifest allows.
    /// Used for the plugin's own `http.send` and for the model calls the
    /// host sends for it (`provider-stream`), so both pass the same checks.
    pub async fn send(&self, plugin: &str, req: Request) -> Result<Sent, HttpError> {
        let url = match url::Url::parse(&req.url) {
            Ok(url) => url,
            Err(err) => return Err(HttpError::InvalidRequest(format!("bad URL `{}`: {err}", req.url))),
        };
        let origin = match Origin::of(&url) {
            Ok(origin) => origin,
            Err(err) => return Err(HttpError::InvalidRequest(err)),
        };
        if !self.allowed.iter().any(|p| p.matches(&origin)) {
            tracing::warn!(plugin = %plugin, %origin, "refused a request to an origin that is not granted");
            return Err(HttpError::Denied(format!("origin {origin} is not granted to plugin `{plugin}`")));
        }
        // An address in the URL is not resolved, so it is checked here.
        if let Some(explicit) = &self.internal_hosts {
            let literal = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            };
            if let Some(ip) = literal
                && is_internal(ip)
                && !explicit.iter().any(|h| h.eq_ignore_ascii_case(&origin.host))
            {
                tracing::warn!(plugin = %plugin, %origin, "refused a tenant's request to an internal address");
                return Err(HttpError::Denied(format!("{origin} is an internal address, which a tenant's requests may not reach")));
            }
        }
        let method = match reqwest::Method::from_bytes(req.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Err(HttpError::InvalidRequest(format!("bad method `{}`", req.method))),
        };
        let credential_header = match &req.credential {
            Credential::Header(name) => Some(name.to_ascii_lowercase()),
            _ => None,
        };
        let (client, lease) = self.clients.lease();
        let mut builder = client.request(method, url);
        for (name, value) in &req.headers {
            let lower = name.to_ascii_lowercase();
            if FORBIDDEN_HEADERS.contains(&lower.as_str()) || Some(&lower) == credential_header.as_ref() {
                return Err(HttpError::InvalidRequest(format!(
                    "header `{name}` may not be set by a plugin; ask for the credential with `credential`"
                )));
            }
            builder = builder.header(name, value);
        }
        // The key goes only to the origin it was stored for, in the header
        // the manifest declares: a plugin granted several origins cannot
        // send it to another, nor put it where a server would echo it.
        if !matches!(req.credential, Credential::None) && self.credential.is_some() {
            if self.credential_origin.as_ref() != Some(&origin) {
                let to = self.credential_origin.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "no origin".into());
                tracing::warn!(plugin = %plugin, %origin, "refused to send the provider key to another origin");
                return Err(HttpError::Denied(format!("the key of plugin `{plugin}` goes only to {to}, not to {origin}")));
            }
            let header = match &req.credential {
                Credential::Bearer => "authorization".to_string(),
                Credential::Header(name) => name.to_ascii_lowercase(),
                Credential::None => String::new(),
            };
            if header != self.credential_header {
                return Err(HttpError::Denied(format!(
                    "the key of plugin `{plugin}` travels only in `{}` (its manifest's key_header), not in `{header}`",
                    self.credential_header
                )));
            }
        }
        let with_credential = !matches!(req.credential, Credential::None);
        match (&req.credential, &self.credential) {
            (Credential::None, _) => {}
            (_, None) => return Err(HttpError::MissingCredential),
            (Credential::Header(name), Some(key)) => {
                // Sensitive: HTTP/2 then never puts it in the connection's
                // header table, which the connection's other streams share
                // (`bearer_auth` marks its header the same way).
                let mut value = match reqwest::header::HeaderValue::from_str(key.expose()) {
                    Ok(value) => value,
                    Err(_) => return Err(HttpError::InvalidRequest("the stored key is not a valid header value".into())),
                };
                value.set_sensitive(true);
                builder = builder.header(name, value);
            }
            (Credential::Bearer, Some(key)) => builder = builder.bearer_auth(key.expose()),
        }
        let wait = req.timeout_ms.map(|ms| Duration::from_millis(ms.into())).unwrap_or(MAX_HEADER_WAIT);
        // Sent from a task of its own, not polled on the guest's fiber:
        // connecting polls deep futures, and every stack page they touch
        // stays resident for as long as the instance keeps its fiber, which
        // a provider's stream does until its answer ends. Dropped with the
        // call (a cancelled run), the task is aborted.
        let sending = AbortOnDropHandle::new(tokio::spawn(tokio::time::timeout(
            wait.min(MAX_HEADER_WAIT),
            builder.body(req.body).send(),
        )));
        let response = match sending.await {
            Err(err) => return Err(HttpError::Connection(format!("the request was lost: {err}"))),
            Ok(Err(_)) => return Err(HttpError::Timeout),
            Ok(Ok(Err(err))) => return Err(HttpError::Connection(crate::error_chain(&err))),
            Ok(Ok(Ok(response))) => response,
        };
        // The scrubber sees plain bytes only: a compressed answer to a
        // request that carried the key could hide the key from it.
        if with_credential
            && let Some(encoding) = response.headers().get(reqwest::header::CONTENT_ENCODING)
            && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(HttpError::Connection(format!(
                "a response with Content-Encoding `{}` to a request that carried the key is refused",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
        let scrubber = Scrubber::new(self.credential.as_ref());
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes());
                (name.as_str().to_string(), scrubber.scrub_whole(&value))
            })
            .collect();
        let status = response.status().as_u16();
        let body = HttpBody { response: Some((response, lease)), scrubber, pending: Vec::new() };
        Ok(Sent { status, headers, body })
    }
}

impl HttpBody {
    /// The next bytes, at most `max` (`None`: the body ended), scrubbed of
    /// the credential.
    pub async fn read(&mut self, max: usize) -> Result<Option<Vec<u8>>, HttpError> {
        let max = max.max(1);
        loop {
            if !self.pending.is_empty() {
                let rest = self.pending.split_off(max.min(self.pending.len()));
                return Ok(Some(std::mem::replace(&mut self.pending, rest)));
            }
            let Some((response, _)) = self.response.as_mut() else {
                return Ok(None);
            };
            match response.chunk().await {
                Ok(Some(chunk)) => self.pending = self.scrubber.push(&chunk),
                Ok(None) => {
                    self.response = None;
                    self.pending = self.scrubber.finish();
                }
                Err(err) => {
                    self.response = None;
                    return Err(HttpError::Connection(format!("the response body broke off: {}", crate::error_chain(&err))));
                }
            }
        }
    }

    /// The bytes that have already arrived (at most `max`), without
    /// waiting: a step that found bytes waiting takes them all at once.
    pub fn read_ready(&mut self, max: usize) -> Result<Option<Vec<u8>>, HttpError> {
        use futures::FutureExt;
        self.read(max).now_or_never().unwrap_or(Ok(Some(Vec::new())))
    }
}

impl HostBody for PluginState {
    async fn read(&mut self, body: Resource<HttpBody>, max_bytes: u32) -> wasmtime::Result<Result<Option<Vec<u8>>, HttpError>> {
        Ok(self.table.get_mut(&body)?.read(max_bytes as usize).await)
    }

    async fn drop(&mut self, body: Resource<HttpBody>) -> wasmtime::Result<()> {
        self.table.delete(body)?;
        Ok(())
    }
}

/// Replaces the credential wherever it appears in a byte stream, even when
/// it is split across chunks: the last `len - 1` bytes are held back until
/// the next chunk shows whether they start the key.
pub struct Scrubber {
    needle: Vec<u8>,
    carry: Vec<u8>,
}

const REDACTED: &[u8] = b"[redacted]";

impl Scrubber {
    pub fn new(secret: Option<&Secret>) -> Scrubber {
        Scrubber { needle: secret.map(|s| s.expose().as_bytes().to_vec()).unwrap_or_default(), carry: Vec::new() }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.needle.is_empty() {
            return chunk.to_vec();
        }
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            if data[i..].starts_with(&self.needle) {
                out.extend_from_slice(REDACTED);
                i += self.needle.len();
            } else if data.len() - i < self.needle.len() && self.needle.starts_with(&data[i..]) {
                // Could be the start of the key: wait for more.
                self.carry = data[i..].to_vec();
                return out;
            } else {
                out.push(data[i]);
                i += 1;
            }
        }
        out
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }

    pub fn scrub_whole(&self, text: &str) -> String {
        if self.needle.is_empty() {
            return text.to_string();
        }
        text.replace(std::str::from_utf8(&self.needle).unwrap_or(""), "[redacted]")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_client_takes_a_hundred_responses_before_another_is_made() {
        let built = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = built.clone();
        let clients = Clients::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            reqwest::Client::new()
        });
        let built = || built.load(std::sync::atomic::Ordering::SeqCst);
        let mut leases: Vec<Lease> = (0..STREAMS_PER_CONNECTION).map(|_| clients.lease().1).collect();
        assert_eq!(built(), 1);
        leases.push(clients.lease().1);
        assert_eq!(built(), 2, "the 101st response gets a client of its own");
        assert!(Arc::ptr_eq(&leases[STREAMS_PER_CONNECTION].0, &clients.lease().1.0), "the second has room");
        // A response of the first client ends: the next request goes back
        // to it, so the later clients fall idle as the load drops.
        leases.swap_remove(0);
        let next = clients.lease().1;
        assert!(Arc::ptr_eq(&next.0, &leases[1].0), "back on the first client");
        assert_eq!(built(), 2);
        drop(leases);
        drop(next);
        let slots = clients.slots.lock().unwrap();
        assert!(slots.iter().all(|s| s.open.load(std::sync::atomic::Ordering::SeqCst) == 0), "every lease given back");
    }

    #[test]
    fn internal_addresses() {
        for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
            "255.255.255.255", "::1", "::", "fc00::1", "fd12::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    /// A name that resolves to loopback is refused unless listed: what the
    /// connection would use is checked, not the name.
    #[tokio::test]
    async fn names_resolving_inside_are_refused_unless_listed() {
        use reqwest::dns::Resolve;
        let refusing = PublicResolver { explicit: Arc::new(Vec::new()) };
        let err = refusing.resolve("localhost".parse().unwrap()).await.err().expect("refused");
        assert!(err.to_string().contains("internal"), "{err}");
        let listed = PublicResolver { explicit: Arc::new(vec!["LOCALHOST".into()]) };
        let addrs: Vec<SocketAddr> = listed.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    use super::*;

    #[test]
    fn scrubber_removes_a_key_split_across_chunks() {
        let secret = Secret::new("sk-SECRET".into());
        for split in 0..20 {
            let text = b"before sk-SECRET middle sk-SEC after sk-SECRET";
            let mut s = Scrubber::new(Some(&secret));
            let mut out = s.push(&text[..split.min(text.len())]);
            out.extend(s.push(&text[split.min(text.len())..]));
            out.extend(s.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "before [redacted] middle sk-SEC after [redacted]",
                "split at {split}"
            );
        }
    }
}
