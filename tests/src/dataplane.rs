//! Data-plane pieces of the harness: local backends that exported services
//! point at (TCP echo, HTTP/1.1, HTTP/2 cleartext, gRPC health), the
//! clients a local app would use against a gateway's egress (HTTP/1.1 and
//! h2c over plain TCP), mTLS dials to an ingress with a chosen SNI, and DNS
//! queries over real UDP to a gateway's responder. Every backend records
//! what reached it, so tests can assert both on what the app got back and
//! on what the backend saw (or that nothing reached it at all).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elsinore_certs::{Identity, Issued};
use elsinore_gateway::proxy::PEER_IDENTITY_HEADER;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;

use crate::MeshFixture;

/// Bound on one client exchange (connect, request, whole response).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one HTTP or gRPC request looked like when it reached a backend.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub version: Version,
    /// The `Host` header, else the URI's authority (HTTP/2 `:authority`).
    pub host: Option<String>,
    /// The value of [`PEER_IDENTITY_HEADER`], if present (each copy).
    pub peer_identity: Vec<String>,
    pub headers: HeaderMap,
}

/// A backend listening on `127.0.0.1:<random port>`; stops (with all its
/// connections) when dropped.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Shared recording state of one backend.
#[derive(Clone)]
struct Recorder {
    name: Arc<str>,
    hits: Arc<AtomicU64>,
    /// Bytes read from clients (TCP echo).
    received: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl Recorder {
    fn record<B>(&self, req: &Request<B>) -> SeenRequest {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let seen = SeenRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            version: req.version(),
            host,
            peer_identity: req
                .headers()
                .get_all(PEER_IDENTITY_HEADER)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect(),
            headers: req.headers().clone(),
        };
        self.seen.lock().expect("seen lock").push(seen.clone());
        self.hits.fetch_add(1, Ordering::SeqCst);
        seen
    }
}

impl Backend {
    /// `host:port` for an export's `backends`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Connections (TCP echo) or requests (HTTP, gRPC) that reached it.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Bytes that reached it from clients, over all connections (TCP
    /// echo): unlike [`Backend::hits`], a probe that connects and closes
    /// adds nothing.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Every HTTP / gRPC request that reached it, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("seen lock").clone()
    }

    async fn bind(name: &str) -> (TcpListener, SocketAddr, Recorder) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("backend {name}: bind 127.0.0.1:0: {e}"));
        let addr = listener.local_addr().expect("backend address");
        let recorder = Recorder {
            name: Arc::from(name),
            hits: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        (listener, addr, recorder)
    }

    fn assemble(addr: SocketAddr, recorder: Recorder, task: JoinHandle<()>) -> Backend {
        Backend {
            name: recorder.name.to_string(),
            addr,
            hits: recorder.hits,
            received: recorder.received,
            seen: recorder.seen,
            task,
        }
    }

    /// Reads until the client's half-close, then sends every byte back and
    /// closes: an answer arrives only if the client's end of writing
    /// crossed every hop while the way back stayed open. `hits` counts
    /// connections.
    pub async fn tcp_echo(name: &str) -> Backend {
        let (listener, addr, recorder) = Self::bind(name).await;
        let hits = recorder.hits.clone();
        let received = recorder.received.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
                let received = received.clone();
                conns.spawn(async move {
                    let mut data = Vec::new();
                    let mut chunk = [0u8; 16 * 1024];
                    loop {
                        match tcp.read(&mut chunk).await {
                            Ok(0) => break,
                            Ok(n) => {
                                received.fetch_add(n as u64, Ordering::SeqCst);
                                data.extend_from_slice(&chunk[..n]);
                            }
                            Err(_) => return,
                        }
                    }
                    if tcp.write_all(&data).await.is_ok() {
                        let _ = tcp.shutdown().await;
                    }
                });
            }
        });
        Self::assemble(addr, recorder, task)
    }

    /// An HTTP/1.1-only server answering every request with the JSON of
    /// [`http_answer`].
    pub async fn http1(name: &str) -> Backend {
        let (listener, addr, recorder) = Self::bind(name).await;
        let rec = recorder.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let rec = rec.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| answer(rec.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self::assemble(addr, recorder, task)
    }

    /// An HTTP/2-only server with prior knowledge (h2c), answering like
    /// [`Backend::http1`].
    pub async fn h2c(name: &str) -> Backend {
        let (listener, addr, recorder) = Self::bind(name).await;
        let rec = recorder.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let rec = rec.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| answer(rec.clone(), req));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self::assemble(addr, recorder, task)
    }

    /// A gRPC server (h2c) serving `grpc.health.v1.Health` from
    /// tonic-health, with each name of `serving` reported SERVING (any
    /// other name gets NOT_FOUND). Every call is recorded.
    pub async fn grpc_health(name: &str, serving: &[&str]) -> Backend {
        let (listener, addr, recorder) = Self::bind(name).await;
        let (reporter, health) = tonic_health::server::health_reporter();
        for service in serving {
            reporter
                .set_service_status(*service, tonic_health::ServingStatus::Serving)
                .await;
        }
        let rec = recorder.clone();
        let recorded = tonic::service::interceptor::InterceptedService::new(
            health,
            move |req: tonic::Request<()>| {
                let mut probe = Request::new(());
                *probe.headers_mut() = req.metadata().clone().into_headers();
                *probe.version_mut() = Version::HTTP_2;
                rec.record(&probe);
                Ok(req)
            },
        );
        let (conn_tx, conn_rx) = mpsc::channel::<std::io::Result<TcpStream>>(16);
        let task = tokio::spawn(async move {
            let serve = tonic::transport::Server::builder()
                .add_service(recorded)
                .serve_with_incoming(ReceiverStream::new(conn_rx));
            let accept = async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    if conn_tx.send(Ok(tcp)).await.is_err() {
                        break;
                    }
                }
            };
            // Keep the reporter alive as long as the server.
            let _reporter = reporter;
            tokio::select! {
                _ = serve => {}
                _ = accept => {}
            }
        });
        Self::assemble(addr, recorder, task)
    }
}

/// The answer of the HTTP backends: status 200, header `x-backend: <name>`,
/// and a JSON body `{backend, identity, host, version, method, path, body}`
/// where `identity` is the [`PEER_IDENTITY_HEADER`] value (null if absent),
/// `host` what [`SeenRequest::host`] says, and `body` the request body.
async fn answer(
    rec: Recorder,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let seen = rec.record(&req);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let reply = json!({
        "backend": &*rec.name,
        "identity": seen.peer_identity.first(),
        "identities": seen.peer_identity,
        "host": seen.host,
        "version": format!("{:?}", seen.version),
        "method": seen.method,
        "path": seen.path,
        "body": String::from_utf8_lossy(&body),
    });
    let mut response = Response::new(Full::new(Bytes::from(reply.to_string())));
    response.headers_mut().insert(
        "x-backend",
        http::HeaderValue::from_str(&rec.name).unwrap_or(http::HeaderValue::from_static("?")),
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// A whole HTTP response as an app received it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (what the harness backends answer); panics with
    /// the status and body otherwise.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body from a backend, got {} {:?}: {e}",
                self.status,
                self.text()
            )
        })
    }

    /// Reads the whole of `response`.
    pub async fn read(response: Response<Incoming>) -> Result<HttpReply, String> {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("read the response body: {e}"))?
            .to_bytes();
        Ok(HttpReply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// A request for [`http1_send`]: `authority` becomes the
/// `Host` header (HTTP/1.1) or `:authority` (HTTP/2, where the URI is
/// absolute); `None` sends none (HTTP/1.1 only).
pub fn http_request(
    method: Method,
    authority: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method);
    builder = match authority {
        Some(a) => builder
            .uri(format!("http://{a}{path}"))
            .header(http::header::HOST, a),
        None => builder.uri(path),
    };
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(Full::new(body.into()))
        .expect("a well-formed request")
}

/// `GET path` with `Host: authority`.
pub fn get(authority: &str, path: &str) -> Request<Full<Bytes>> {
    http_request(Method::GET, Some(authority), path, &[], Bytes::new())
}

/// An HTTP/1.1 client connection (plain TCP) to `addr`.
pub async fn http1_connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let dial = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    };
    tokio::time::timeout(CLIENT_TIMEOUT, dial)
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
}

/// An HTTP/2 prior-knowledge (h2c) client connection to `addr`.
pub async fn h2c_connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let dial = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("h2c handshake with {addr}: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    };
    tokio::time::timeout(CLIENT_TIMEOUT, dial)
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
}

/// Sends `req` on an open HTTP/1.1 connection and reads the whole reply.
/// The request target goes out in origin form (`/path?query`), as apps
/// send it; the authority travels in the `Host` header.
pub async fn http1_exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    mut req: Request<Full<Bytes>>,
) -> Result<HttpReply, String> {
    if let Some(target) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = http::Uri::from(target);
    }
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send request: {e}"))?;
        HttpReply::read(response).await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| "HTTP/1.1 exchange timed out".to_owned())?
}

/// Sends `req` on an open h2c connection and reads the whole reply.
pub async fn h2c_exchange(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<HttpReply, String> {
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send request: {e}"))?;
        HttpReply::read(response).await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| "HTTP/2 exchange timed out".to_owned())?
}

/// One HTTP/1.1 request on a fresh connection to `addr`.
pub async fn http1_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<HttpReply, String> {
    let mut sender = http1_connect(addr).await?;
    http1_exchange(&mut sender, req).await
}

/// A client config presenting `issued` (any trust domain, any CA) and
/// verifying the server as a SPIFFE workload of `server`'s trust domain
/// chained to its CA, offering `alpn`.
pub fn peer_client_config(
    issued: &Issued,
    server: &MeshFixture,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let identity = Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
        .expect("parse the client identity");
    elsinore_certs::client_config(&identity, &server.bundle(), None, alpn)
        .expect("build the mTLS client config")
}

/// TCP connect plus TLS handshake to `addr` with SNI `sni` (a DNS name).
pub async fn tls_connect_sni(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let dial = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, dial)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS dial timed out"))?
}

/// One DNS query over UDP to `server` (a gateway's responder), retried
/// up to three times on silence (UDP may drop), each within 2 s.
pub async fn dns_query(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind a UDP client socket");
    socket
        .connect(server)
        .await
        .expect("connect the UDP socket");
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(name).unwrap_or_else(|e| panic!("DNS name {name:?}: {e}")),
        rtype,
    ));
    let packet = query.to_vec().expect("encode the DNS query");
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        socket.send(&packet).await.expect("send the DNS query");
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await
        {
            let reply = Message::from_vec(&buf[..n])
                .unwrap_or_else(|e| panic!("undecodable DNS answer for {name}: {e}"));
            assert_eq!(
                reply.metadata.id, query.metadata.id,
                "DNS answer for another query"
            );
            return reply;
        }
    }
    panic!("no DNS answer from {server} for {name} {rtype}")
}

/// Resolves `name` to its A record through `server`: `Ok(ip)`, or the
/// response code when there is no A record (`NoError` = NODATA).
pub async fn dns_resolve(server: SocketAddr, name: &str) -> Result<Ipv4Addr, ResponseCode> {
    let reply = dns_query(server, name, RecordType::A).await;
    reply
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .ok_or(reply.metadata.response_code)
}

/// One HTTP/2 request over an already established stream (e.g. TLS to an
/// ingress with a chosen SNI); the connection is dropped after.
pub async fn h2_send_over<T>(io: T, req: Request<Full<Bytes>>) -> Result<HttpReply, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(conn);
        h2c_exchange(&mut sender, req).await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| "HTTP/2 exchange timed out".to_owned())?
}

/// One HTTP/1.1 request over an already established stream.
pub async fn http1_send_over<T>(io: T, req: Request<Full<Bytes>>) -> Result<HttpReply, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        http1_exchange(&mut sender, req).await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| "HTTP/1.1 exchange timed out".to_owned())?
}

/// GET `path` on an admin listener over a fresh connection that asks to be
/// closed: (status, body). Panics, naming the path, if there is no answer
/// within [`crate::WAIT`].
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = match tokio::time::timeout(crate::WAIT, exchange).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => panic!("GET {path} on the admin listener {addr}: {e}"),
        Err(_) => panic!("GET {path} on the admin listener {addr}: no answer"),
    };
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
