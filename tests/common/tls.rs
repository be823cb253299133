//! The scripted server of `fake.rs` behind TLS, as the vendors' endpoints
//! are: HTTP/2 or HTTP/1.1 as the client picks by ALPN, with a certificate
//! for 127.0.0.1 from a CA of its own, which the server under test trusts
//! only through `[http] ca_file`. Unlike `fake.rs` it is a real HTTP stack
//! (hyper): what it checks is the connection, not the bytes of a body.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

use super::fake::{Chunk, Recorded, Reply, Responder};

pub struct TlsFake {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The CA that signed the server's certificate, PEM.
    pub ca_pem: String,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// Each request, with the HTTP version it came in.
    pub requests: Arc<Mutex<Vec<(hyper::Version, Recorded)>>>,
    /// The most answers that were being sent at once.
    pub most_open: Arc<AtomicUsize>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl TlsFake {
    /// A server whose replies are computed from each request by `respond`.
    pub async fn responding(respond: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> TlsFake {
        Self::start_with(Some(Arc::new(respond))).await
    }

    /// A server that answers each request with the next reply [`push`]ed
    /// (`fake.rs`'s script).
    pub async fn scripted() -> TlsFake {
        Self::start_with(None).await
    }

    pub fn push(&self, reply: Reply) {
        self.script.lock().unwrap().push_back(reply);
    }

    async fn start_with(respond: Option<Responder>) -> TlsFake {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "hangar test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key_der)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let (count, seen, queue) = (connections.clone(), requests.clone(), script.clone());
        let most_open = Arc::new(AtomicUsize::new(0));
        let open = Open { now: Arc::new(AtomicUsize::new(0)), most: most_open.clone() };
        let respond: Responder = respond.unwrap_or_else(|| {
            Arc::new(move |_| queue.lock().unwrap().pop_front().unwrap_or_else(Reply::script_exhausted))
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let (acceptor, seen, respond, open) = (acceptor.clone(), seen.clone(), respond.clone(), open.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service =
                        hyper::service::service_fn(move |req| answer(req, seen.clone(), respond.clone(), open.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsFake { url, ca_pem: ca.pem(), connections, requests, most_open, script }
    }

    pub fn requests(&self) -> Vec<(hyper::Version, Recorded)> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers being sent now, and the most at once.
#[derive(Clone)]
struct Open {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::convert::Infallible>>>;

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<(hyper::Version, Recorded)>>>,
    respond: Responder,
    open: Open,
) -> Result<hyper::Response<Body>, hyper::Error> {
    let version = req.version();
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers =
        req.headers().iter().map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let recorded = Recorded { method, path, headers, body };
    let reply = respond(&recorded);
    seen.lock().unwrap().push((version, recorded));
    // Each chunk goes out as its own DATA frame (or HTTP/1.1 chunk) at
    // once; `Wait` and `Sleep` hold the rest back as in `fake.rs`.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let now = open.now.fetch_add(1, Ordering::SeqCst) + 1;
    open.most.fetch_max(now, Ordering::SeqCst);
    tokio::spawn(async move {
        let _sent = Sent(open.now);
        for chunk in reply.chunks {
            match chunk {
                Chunk::Data(data) => {
                    if tx.send(Ok(Frame::data(Bytes::from(data)))).await.is_err() {
                        return;
                    }
                }
                Chunk::Wait(gate) => gate.notified().await,
                Chunk::Sleep(d) => tokio::time::sleep(d).await,
            }
        }
    });
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    Ok(response.body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))).unwrap())
}

/// Counts an answer as sent once its chunks are all out (or the client left).
struct Sent(Arc<AtomicUsize>);

impl Drop for Sent {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
