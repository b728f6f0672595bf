//! The ingress listener: where peer gateways deliver traffic for the services
//! we export. Per connection it terminates mTLS with our gateway identity,
//! names the peer by the trust domain of its verified SPIFFE ID, routes by
//! SNI (the export's FQDN; there is no default route) and checks that the
//! export lists that peer. A connection failing any of these is closed
//! without a byte of application data, counted by reason in
//! [`IngressStats`] and logged with the reason; the peer learns nothing about
//! which exports exist.
//!
//! Authorized connections are forwarded by the export's protocol. Opaque
//! protocols (TCP, TLS, mTLS, HTTPS, Mongo) are spliced to a backend. HTTP,
//! HTTP/2 and gRPC are served as HTTP (HTTP/1.1 or HTTP/2, whatever the peer
//! speaks) and each request is forwarded through a pooled client per export:
//! HTTP/1.1 to HTTP backends by our own [`elsinore_transport::h1::client`] (the request's
//! task writes it and reads the response, no hand-off), HTTP/2 with prior
//! knowledge (h2c) to HTTP2 and gRPC backends by hyper's client. Requests
//! whose Host / `:authority` names another service than the SNI get 421,
//! so a peer can never use an export it may reach to address one it may
//! not; a Host / `:authority` with userinfo (`user@host`) gets 400.
//! Identity headers a peer sends, in the header section or in trailers,
//! are stripped and replaced by [`PEER_IDENTITY_HEADER`] carrying the
//! verified SPIFFE ID. Responses go out in HTTP/1.1 (or HTTP/2), whatever
//! version the backend answered in.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use elsinore_federation_api::Protocol;
use elsinore_transport::h2::body::RecvBody;
use elsinore_transport::h2::server as h2server;
use elsinore_transport::splice::splice;
use futures_util::FutureExt;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{Instrument, field};

use super::activity::{Activity, ActivityIo};
use super::backend::Backends;
use super::error::{ErrorKind, ProxyError, is_grpc};
use super::tls::{self, TlsStream};
use super::{
    IdentityTrailersStripped, PEER_IDENTITY_HEADER, ProxyContext, refuse_userinfo,
    strip_identity_headers,
};
use crate::catalog::ExportCatalog;
use crate::catalog::exports::ExportedService;
use crate::config::{HostPort, ProxyTuning};
use elsinore_transport::h1::client::{self as h1client, H1Client, ResponseBody};

/// A peer's mTLS connection, boxed (see `handle`).
type PeerStream = Box<TlsStream>;

/// How long we wait for a refused peer to take our close_notify.
const REFUSAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// ALPN protocols ingress offers. Opaque exports ignore what was negotiated.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why a connection was closed before any application data moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `maxConnections` reached.
    Overloaded,
    /// TLS failed: no or bad client certificate, protocol error.
    HandshakeFailed,
    HandshakeTimeout,
    /// The certificate verified but carries no usable SPIFFE ID.
    NoPeerIdentity,
    /// The SPIFFE ID's trust domain is not a configured peer.
    UnknownPeer,
    /// The client sent no SNI.
    NoSni,
    /// No export has the SNI as its FQDN.
    UnknownSni,
    /// The export does not list the peer.
    Unauthorized,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Overloaded,
        Refusal::HandshakeFailed,
        Refusal::HandshakeTimeout,
        Refusal::NoPeerIdentity,
        Refusal::UnknownPeer,
        Refusal::NoSni,
        Refusal::UnknownSni,
        Refusal::Unauthorized,
    ];

    /// A bounded metric / log label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NoPeerIdentity => "no_peer_identity",
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::NoSni => "no_sni",
            Refusal::UnknownSni => "unknown_sni",
            Refusal::Unauthorized => "unauthorized",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one ingress listener. Created by the caller of [`serve`] so
/// the admin server can read them; all relaxed atomics.
#[derive(Debug, Default)]
pub struct IngressStats {
    /// TCP connections accepted (before the connection cap and TLS).
    pub accepted: AtomicU64,
    /// Connections that passed every check and were forwarded.
    pub authorized: AtomicU64,
    /// Connections currently open (gauge).
    pub active: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Opaque connections spliced to a backend.
    pub spliced: AtomicU64,
    /// HTTP requests received on authorized connections.
    pub http_requests: AtomicU64,
    /// Requests answered 421 because Host / :authority did not match the SNI.
    pub misdirected: AtomicU64,
    /// Connections or requests that failed upstream (no backend, timeout, reset).
    pub upstream_errors: AtomicU64,
    /// Bytes spliced peer → backend and backend → peer (opaque exports only).
    pub bytes_to_backend: AtomicU64,
    pub bytes_from_backend: AtomicU64,
}

impl IngressStats {
    pub fn new() -> Arc<IngressStats> {
        Arc::new(IngressStats::default())
    }

    /// Connections refused for `reason` so far.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Every refusal reason with its count, for /metrics.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|r| (r.label(), self.refused(*r)))
    }

    fn refuse(&self, reason: Refusal) {
        bump(&self.refused[reason.index()]);
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Serves ingress on `listener` until `ctx.shutdown` is cancelled, then
/// stops accepting, lets open connections finish for a short drain period
/// (HTTP connections are shut down gracefully, splices are cut) and
/// returns. Fails at once only if the TLS server config cannot be built
/// (no peer trust bundles, unusable identity).
pub async fn serve(
    listener: TcpListener,
    ctx: ProxyContext,
    stats: Arc<IngressStats>,
) -> Result<(), ProxyError> {
    let tls = ingress_tls(&ctx)?;
    let inner = Arc::new(Inner {
        tls: ArcSwap::from_pointee(tls),
        routes: RouteCache::new(ctx.tuning.clone()),
        stats,
        ctx,
    });
    let shutdown = inner.ctx.shutdown.clone();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "ingress listening");
    }

    use elsinore_transport::accept;
    let connections = accept::Connections::new(inner.ctx.tuning.max_connections);
    let hooks = accept::Hooks::default()
        .on_accepted({
            let inner = Arc::clone(&inner);
            move |_| bump(&inner.stats.accepted)
        })
        .on_refused({
            let inner = Arc::clone(&inner);
            move |remote| {
                inner.stats.refuse(Refusal::Overloaded);
                tracing::warn!(
                    client.addr = %remote,
                    limit = inner.ctx.tuning.max_connections,
                    reason = Refusal::Overloaded.label(),
                    "ingress connection refused: connection limit reached"
                );
            }
        });
    // The tasks are kept so that what is still open at the drain deadline
    // can be cut.
    let mut conns = JoinSet::new();
    let settings = accept::Settings::new("ingress");
    accept::serve(
        listener,
        settings,
        connections.clone(),
        shutdown,
        hooks,
        |tcp, remote, permit| {
            // Reap finished connection tasks so the set stays small.
            while conns.try_join_next().is_some() {}
            let span = tracing::info_span!(
                "ingress",
                client.addr = %remote,
                peer = field::Empty,
                sni = field::Empty
            );
            let inner = Arc::clone(&inner);
            conns.spawn(
                async move {
                    bump(&inner.stats.active);
                    handle(tcp, &inner).await;
                    inner.stats.active.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                }
                .instrument(span),
            );
        },
    )
    .await;

    let open = connections.open();
    if open > 0 {
        tracing::info!(open, "ingress draining connections");
    }
    let ctx = &inner.ctx;
    let deadline = tokio::time::Instant::now() + ctx.drain_timeout;
    let drained = tokio::select! {
        drained = connections.drained(deadline) => drained,
        () = ctx.abort.cancelled() => false,
    };
    if !drained {
        tracing::warn!(
            open = connections.open(),
            "ingress drain timed out; closing remaining connections"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// The ingress server config of one generation of TLS material.
struct IngressTls {
    generation: u64,
    config: Arc<rustls::ServerConfig>,
}

/// The ingress server config for the credentials published now: a new
/// config (so new session caches: no ticket issued under the old material
/// resumes under the new) for every rotation.
fn ingress_tls(ctx: &ProxyContext) -> Result<IngressTls, ProxyError> {
    let material = ctx.credentials.current();
    let bundles: Vec<_> = material.bundles.values().cloned().collect();
    let tls = elsinore_certs::server_config(&material.identity, &bundles, ALPN).map_err(|e| {
        ProxyError::internal(
            ErrorKind::HandshakeFailed,
            format!("building the ingress tls config: {e}"),
        )
    })?;
    let mut tls = (*tls).clone();
    if !ctx.tuning.tls_resumption {
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(IngressTls {
        generation: material.generation,
        config: tls::server_config(tls),
    })
}

/// What every connection task of one listener shares.
struct Inner {
    ctx: ProxyContext,
    tls: ArcSwap<IngressTls>,
    routes: RouteCache,
    stats: Arc<IngressStats>,
}

impl Inner {
    fn tuning(&self) -> &ProxyTuning {
        &self.ctx.tuning
    }

    /// The server config for a new connection: the cached one unless the
    /// credentials rotated since it was built.
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
        let cached = self.tls.load();
        if cached.generation == self.ctx.credentials.generation() {
            return Ok(Arc::clone(&cached.config));
        }
        let fresh = ingress_tls(&self.ctx)?;
        let config = Arc::clone(&fresh.config);
        self.tls.store(Arc::new(fresh));
        Ok(config)
    }
}

/// Logs and counts a refusal, then closes the connection with a TLS
/// close_notify (bounded, so a peer that does not read cannot hold us).
async fn refuse<S: AsyncWrite + Unpin>(
    inner: &Inner,
    reason: Refusal,
    detail: &str,
    stream: Option<S>,
) {
    inner.stats.refuse(reason);
    tracing::warn!(
        reason = reason.label(),
        "ingress connection refused: {detail}"
    );
    if let Some(mut s) = stream {
        let _ = tokio::time::timeout(REFUSAL_CLOSE_TIMEOUT, s.shutdown()).await;
    }
}

async fn handle(tcp: TcpStream, inner: &Arc<Inner>) {
    let _ = tcp.set_nodelay(true);
    let none = None::<TcpStream>;
    let config = match inner.server_config() {
        Ok(config) => config,
        Err(e) => {
            let detail = format!("no tls config: {e}");
            return refuse(inner, Refusal::HandshakeFailed, &detail, none).await;
        }
    };
    let started = std::time::Instant::now();
    let (tls, accepted) = match tokio::time::timeout(
        inner.tuning().handshake_timeout,
        Box::pin(tls::accept(config, tcp)),
    )
    .await
    {
        // Boxed once: the stream moves through several futures, and each
        // by-value move would otherwise reserve its own slot in the task.
        Ok(Ok((tls, accepted))) => {
            let latency = &inner.ctx.shared.latency;
            latency.handshake_ingress.observe(started.elapsed());
            (Box::new(tls), accepted)
        }
        Ok(Err(e)) => {
            return refuse(
                inner,
                Refusal::HandshakeFailed,
                &format!("tls handshake failed: {e}"),
                none,
            )
            .await;
        }
        Err(_) => {
            let detail = format!(
                "tls handshake not completed within {:?}",
                inner.tuning().handshake_timeout
            );
            return refuse(inner, Refusal::HandshakeTimeout, &detail, none).await;
        }
    };
    let span = tracing::Span::current();

    // Who is calling: the trust domain of the verified SPIFFE ID names the
    // peer. The TLS layer accepts an unknown trust domain signed by one of
    // our bundles' CAs, so this check is what refuses it.
    let tls::Accepted {
        peer_certificates,
        server_name,
        resumed,
    } = accepted;
    let peer_id = elsinore_certs::peer_spiffe_id(peer_certificates.as_deref()).and_then(|id| {
        // A resumed session skips chain verification: the identity its
        // ticket carries must not outlive the certificate it came from. (A
        // full handshake's verifier checked the validity already.)
        match peer_certificates.as_deref() {
            Some([leaf, ..]) if resumed => {
                elsinore_certs::check_not_expired(leaf, std::time::SystemTime::now()).map(|()| id)
            }
            _ => Ok(id),
        }
    });
    // The chain is only for this check; a held connection's task should
    // not keep it (rustls keeps its own copy for resumption).
    drop(peer_certificates);
    let peer_id = match peer_id {
        Ok(id) => id,
        Err(e) => {
            let detail = format!("no usable peer identity: {e}");
            return refuse(inner, Refusal::NoPeerIdentity, &detail, Some(tls)).await;
        }
    };
    let Some(peer) = inner.ctx.shared.peer_for(peer_id.trust_domain()) else {
        let detail = format!(
            "peer identity {peer_id} is in trust domain {}, which is no configured peer",
            peer_id.trust_domain()
        );
        return refuse(inner, Refusal::UnknownPeer, &detail, Some(tls)).await;
    };
    let peer_name = peer.config.name.clone();
    span.record("peer", peer_name.as_str());

    let Some(sni) = server_name.as_deref().map(normalize_host) else {
        let detail = format!("peer {peer_name} ({peer_id}) sent no sni");
        return refuse(inner, Refusal::NoSni, &detail, Some(tls)).await;
    };
    span.record("sni", sni.as_str());

    let catalog = Arc::clone(&inner.ctx.shared.exports.borrow());
    let routes = inner.routes.routes(catalog);
    let Some(route) = routes.by_sni.get(&sni) else {
        let detail = format!("no export has the fqdn {sni}");
        return refuse(inner, Refusal::UnknownSni, &detail, Some(tls)).await;
    };
    if !route.export.is_visible_to(&peer_name) {
        let detail = format!(
            "export {} is not exported to peer {peer_name}",
            route.export.service.name
        );
        return refuse(inner, Refusal::Unauthorized, &detail, Some(tls)).await;
    }
    bump(&inner.stats.authorized);
    let upstream = Arc::clone(&route.upstream);
    let export_name = route.export.service.name.clone();
    drop(routes);

    tracing::debug!(peer.id = %peer_id, protocol = ?upstream.protocol, "ingress connection authorized");
    match &upstream.http {
        None => forward_opaque(tls, &upstream, inner).await,
        Some(client) => {
            let Ok(peer_header) = HeaderValue::from_str(&peer_id.to_string()) else {
                // SPIFFE IDs are validated ASCII; this cannot happen.
                tracing::error!(peer.id = %peer_id, "peer identity is not a valid header value");
                return;
            };
            let latency = &inner.ctx.shared.latency.ingress;
            let latency = latency.handle(&peer_name, &export_name);
            let conn = Arc::new(HttpConn {
                sni,
                latency,
                peer_header,
                client: client.clone(),
                request_timeout: inner.tuning().request_timeout,
                stats: Arc::clone(&inner.stats),
            });
            // Boxed: hyper's connection state should not size the task of
            // every TCP connection too.
            Box::pin(serve_http(tls, conn, inner)).await;
        }
    }
}

/// Lower-case, trailing dot stripped: how SNI, Host and FQDNs are compared.
fn normalize_host(h: &str) -> String {
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}

async fn forward_opaque(tls: PeerStream, upstream: &Upstream, inner: &Inner) {
    let tuning = inner.tuning();
    // Boxed, as the handshake above: a held connection's task keeps only
    // the splice's state, not that of every step before it.
    let (backend, addr) = match Box::pin(upstream.backends.connect(tuning.connect_timeout)).await {
        Ok(pair) => pair,
        Err(e) => {
            bump(&inner.stats.upstream_errors);
            tracing::warn!(error = %e, label = e.label(), "ingress splice: no backend");
            let mut tls = tls;
            let _ = tokio::time::timeout(REFUSAL_CLOSE_TIMEOUT, tls.shutdown()).await;
            return;
        }
    };
    bump(&inner.stats.spliced);
    tracing::debug!(backend = %addr, "splicing");
    tokio::select! {
        res = splice(tls, backend, tuning.idle_timeout) => match res.map_err(ProxyError::from) {
            Ok((up, down)) => {
                inner.stats.bytes_to_backend.fetch_add(up, Ordering::Relaxed);
                inner.stats.bytes_from_backend.fetch_add(down, Ordering::Relaxed);
                tracing::debug!(backend = %addr, bytes.up = up, bytes.down = down, "splice finished");
            }
            Err(e) => {
                if e.side == super::error::Side::Upstream {
                    bump(&inner.stats.upstream_errors);
                }
                tracing::info!(backend = %addr, error = %e, label = e.label(), "splice ended");
            }
        },
        // A stream in flight outlives the start of a drain, not its end.
        _ = inner.ctx.abort.cancelled() => {
            tracing::debug!(backend = %addr, "splice cut: drain timed out");
        }
    }
}

// ---------------------------------------------------------------------------
// Routing snapshot
// ---------------------------------------------------------------------------

/// The routing table derived from one export catalog: exports by normalized
/// FQDN, each with its backends and (for HTTP protocols) its pooled client.
struct Routes {
    catalog: Arc<ExportCatalog>,
    by_sni: HashMap<String, Route>,
}

struct Route {
    export: ExportedService,
    upstream: Arc<Upstream>,
}

/// Caches [`Routes`] for the current catalog. Connections read it without
/// a lock; it is rebuilt (under a mutex, so once) only when the catalog
/// `Arc` changes, reusing the upstreams — and thus their connection pools
/// and dead marks — of exports whose backends and protocol did not change.
struct RouteCache {
    current: ArcSwap<Routes>,
    rebuild: Mutex<()>,
    tuning: ProxyTuning,
}

impl RouteCache {
    fn new(tuning: ProxyTuning) -> Self {
        RouteCache {
            current: ArcSwap::from_pointee(Routes {
                catalog: Arc::new(ExportCatalog::default()),
                by_sni: HashMap::new(),
            }),
            rebuild: Mutex::new(()),
            tuning,
        }
    }

    fn routes(&self, catalog: Arc<ExportCatalog>) -> Arc<Routes> {
        let cur = self.current.load_full();
        if Arc::ptr_eq(&cur.catalog, &catalog) {
            return cur;
        }
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load_full();
        if Arc::ptr_eq(&cur.catalog, &catalog) {
            return cur;
        }
        let old: HashMap<&str, &Arc<Upstream>> = cur
            .by_sni
            .values()
            .map(|r| (r.export.service.name.as_str(), &r.upstream))
            .collect();
        let by_sni = catalog
            .iter()
            .map(|(name, export)| {
                let upstream = match old.get(name.as_str()) {
                    Some(u) if u.serves(export) => Arc::clone(u),
                    _ => Arc::new(Upstream::new(export, &self.tuning)),
                };
                let route = Route {
                    export: export.clone(),
                    upstream,
                };
                (normalize_host(&export.service.fqdn), route)
            })
            .collect();
        let routes = Arc::new(Routes { catalog, by_sni });
        self.current.store(Arc::clone(&routes));
        routes
    }
}

type ProxyBody = Either<Either<ResponseBody, Incoming>, Full<Bytes>>;
/// A request body from a peer: hyper's (HTTP/1.1 peers) or an HTTP/2
/// stream's.
type PeerBody = Either<Incoming, RecvBody>;
type HttpClient = Client<BackendConnector, IdentityTrailersStripped<PeerBody>>;

/// The client of an HTTP export: our own HTTP/1.1 client (the request's
/// task does the exchange), or hyper's for h2c backends.
#[derive(Clone)]
enum HttpBackend {
    H1(H1Client),
    H2(Arc<HttpClient>),
}

/// Where one export's traffic goes.
struct Upstream {
    protocol: Protocol,
    backend_list: Vec<HostPort>,
    backends: Arc<Backends>,
    /// Pooled client for HTTP protocols; `None` = splice.
    http: Option<HttpBackend>,
}

impl Upstream {
    fn new(export: &ExportedService, tuning: &ProxyTuning) -> Self {
        let backends = Arc::new(Backends::new(&export.backends));
        let http = match export.protocol {
            Protocol::Http => Some(HttpBackend::H1(H1Client::new(
                Arc::clone(&backends) as Arc<dyn h1client::Connect>,
                h1client::Settings {
                    connect_timeout: tuning.connect_timeout,
                    idle_timeout: tuning.idle_timeout,
                    max_connections: crate::config::defaults::MAX_BACKEND_CONNECTIONS,
                },
            ))),
            // gRPC and HTTP/2 backends speak h2c: prior knowledge, no upgrade.
            Protocol::Http2 | Protocol::Grpc => {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(tuning.idle_timeout)
                    .http2_only(true);
                let connector = BackendConnector {
                    backends: Arc::clone(&backends),
                    connect_timeout: tuning.connect_timeout,
                };
                Some(HttpBackend::H2(Arc::new(builder.build(connector))))
            }
            Protocol::Https | Protocol::Mongo | Protocol::Tcp | Protocol::Tls | Protocol::Mtls => {
                None
            }
        };
        Upstream {
            protocol: export.protocol,
            backend_list: export.backends.clone(),
            backends,
            http,
        }
    }

    fn serves(&self, export: &ExportedService) -> bool {
        self.protocol == export.protocol && self.backend_list == export.backends
    }
}

/// The hyper client connector of an h2c export: round robin over its backends
/// with dead ones skipped. The URI the client asks for is only the pool key.
#[derive(Clone)]
struct BackendConnector {
    backends: Arc<Backends>,
    connect_timeout: Duration,
}

impl tower::Service<Uri> for BackendConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let backends = Arc::clone(&self.backends);
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let (stream, _) = backends.connect(timeout).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// What every request of one authorized HTTP connection needs.
struct HttpConn {
    sni: String,
    peer_header: HeaderValue,
    client: HttpBackend,
    request_timeout: Duration,
    stats: Arc<IngressStats>,
    /// The (peer, export) request latency histogram, looked up once per
    /// connection.
    latency: Arc<crate::metrics::Histogram>,
}

async fn serve_http(tls: PeerStream, conn: Arc<HttpConn>, inner: &Inner) {
    let tuning = inner.tuning();
    let activity = Arc::new(Activity::new());
    let h2 = tls.alpn_protocol() == Some(b"h2");
    let io = ActivityIo {
        inner: tls,
        activity: Arc::clone(&activity),
    };
    let idle = tuning.idle_timeout;
    if h2 {
        // What peer gateways speak: HTTP/2, served in this task.
        let stop = async {
            let reason = activity.idle_or_shutdown(idle, &inner.ctx.shutdown).await;
            tracing::debug!(reason, "closing ingress http connection gracefully");
        };
        let settings = h2server::Settings {
            max_concurrent_streams: tuning.http2_max_concurrent_streams,
            drain_timeout: inner.ctx.drain_timeout,
            handshake_timeout: tuning.handshake_timeout,
        };
        let conn = &*conn;
        let served = h2server::serve(io, settings, stop, |req| {
            proxy_request(req.map(Either::Right), conn)
        })
        .await;
        match served {
            Ok(h2server::Ended::Closed) => {}
            Ok(h2server::Ended::PrefaceTimedOut) => tracing::debug!(
                handshake_timeout = ?tuning.handshake_timeout,
                "ingress http connection sent no HTTP/2 preface in time; closed"
            ),
            Ok(h2server::Ended::DrainTimedOut) => {
                tracing::debug!(
                    drain_timeout = ?inner.ctx.drain_timeout,
                    "ingress http connection still busy after the drain timeout; closed"
                );
            }
            Err(e) => tracing::debug!(error = %e, "ingress http connection ended with an error"),
        }
        return;
    }
    // Without ALPN h2: HTTP/1.1, or HTTP/2 with prior knowledge.
    let io = TokioIo::new(io);
    let h2 = Arc::clone(&conn);
    let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requested_in = Arc::clone(&requested);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        requested_in.store(true, Ordering::Relaxed);
        let conn = Arc::clone(&h2);
        async move { Ok::<_, Infallible>(proxy_request(req.map(Either::Left), &conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(tuning.request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(tuning.http2_max_concurrent_streams);
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut idle_check = pin!(activity.idle(idle));
    // hyper's header read timeout starts only once the protocol is known
    // (the first bytes read), so the first request is also due here:
    // `requestTimeout` from the connection's start, as on egress. Otherwise
    // a peer that sends nothing, or a prefix of the h2 preface byte by
    // byte, holds a connection for the idle timeout and more.
    let mut first_request = pin!(tokio::time::sleep(tuning.request_timeout));
    let mut awaiting_first = true;
    let mut draining = false;
    loop {
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "ingress http connection ended with an error");
                }
                return;
            }
            _ = first_request.as_mut(), if awaiting_first && !draining => {
                awaiting_first = false;
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!(
                        "no request within {:?} of the ingress http connection's start; closing",
                        tuning.request_timeout
                    );
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = inner.ctx.shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_check.as_mut(), if !draining => {
                tracing::debug!("ingress http connection idle for {idle:?}; closing");
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn proxy_request(req: Request<PeerBody>, conn: &HttpConn) -> Response<ProxyBody> {
    bump(&conn.stats.http_requests);
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    // Boxed: the exchange's state (2 KiB and more) stays put on the heap
    // while the stream's future is moved into its place in the connection
    // (or into hyper's task).
    let resp = match Box::pin(forward(req, conn)).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.kind {
                ErrorKind::MisdirectedRequest => bump(&conn.stats.misdirected),
                _ if e.side == super::error::Side::Upstream => bump(&conn.stats.upstream_errors),
                _ => {}
            }
            tracing::warn!(error = %e, label = e.label(), status = e.status().as_u16(), "ingress request failed");
            error_response(&e, grpc)
        }
    };
    conn.latency.observe(started.elapsed());
    resp
}

async fn forward(
    req: Request<PeerBody>,
    conn: &HttpConn,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // Trailers are fields too: a peer's identity headers go from them as
    // from the header section.
    let body = IdentityTrailersStripped(body);

    // The request must address the service the SNI routed (and authorized)
    // the connection to. Both the URI authority (HTTP/2 :authority, HTTP/1
    // absolute-form) and the Host header count when present; neither may
    // carry userinfo, which the host comparison would look past.
    refuse_userinfo(&parts.uri, &parts.headers)?;
    let uri_authority = parts.uri.authority().cloned();
    if let Some(a) = &uri_authority {
        check_authority(a.host(), &conn.sni)?;
    }
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host_header = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(ProxyError::downstream(
            ErrorKind::MisdirectedRequest,
            "more than one host header",
        ));
    }
    if let Some(h) = &host_header {
        let authority = h
            .to_str()
            .ok()
            .and_then(|s| s.parse::<Authority>().ok())
            .ok_or_else(|| {
                ProxyError::downstream(
                    ErrorKind::MisdirectedRequest,
                    format!("unparsable host header {h:?}"),
                )
            })?;
        check_authority(authority.host(), &conn.sni)?;
    }

    strip_hop_by_hop(&mut parts.headers);
    strip_identity_headers(&mut parts.headers);
    parts
        .headers
        .insert(PEER_IDENTITY_HEADER, conn.peer_header.clone());

    let client = match &conn.client {
        HttpBackend::H1(client) => {
            // Origin-form on the wire; Host is the peer's, or the SNI.
            if host_header.is_none() {
                let authority = uri_authority.unwrap_or_else(|| sni_authority(&conn.sni));
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
            parts.version = Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            let response = within(conn.request_timeout, client.send(request)).await?;
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // An intermediary answers in its own version (RFC 9110 §6.2),
            // whatever the backend's: hyper then frames the body for the
            // peer's version (chunked when an HTTP/1.0 backend's body is
            // delimited by its close) and keeps the peer's connection
            // open. It still answers an HTTP/1.0 peer in HTTP/1.0.
            parts.version = Version::HTTP_11;
            return Ok(Response::from_parts(
                parts,
                Either::Left(Either::Left(body)),
            ));
        }
        HttpBackend::H2(client) => client,
    };

    // hyper's client wants an absolute URI (its pool key, and :authority).
    let authority = match (&uri_authority, &host_header) {
        (Some(a), _) => a.clone(),
        (None, Some(h)) => h
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| sni_authority(&conn.sni)),
        (None, None) => sni_authority(&conn.sni),
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| {
            ProxyError::downstream(ErrorKind::Protocol, format!("bad request uri: {e}"))
        })?;
    // :authority carries it; a Host header alongside is redundant.
    parts.headers.remove(HOST);
    parts.version = Version::HTTP_2;

    let request = Request::from_parts(parts, body);
    let response = within(conn.request_timeout, async {
        client.request(request).await.map_err(|e| client_error(&e))
    })
    .await?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        Either::Left(Either::Right(body)),
    ))
}

/// `exchange` bounded by the request timeout: no response head within it
/// is a 504. A combinator, not an `async fn`: an `async fn` would keep the
/// exchange both as its argument and inside the timeout, doubling the
/// state of every request.
fn within<T>(
    limit: Duration,
    exchange: impl Future<Output = Result<T, ProxyError>>,
) -> impl Future<Output = Result<T, ProxyError>> {
    tokio::time::timeout(limit, exchange).map(move |r| match r {
        Ok(r) => r,
        Err(_) => Err(ProxyError::upstream(
            ErrorKind::RequestTimeout,
            format!("no response headers within {limit:?}"),
        )),
    })
}

fn sni_authority(sni: &str) -> Authority {
    sni.parse()
        .unwrap_or_else(|_| Authority::from_static("invalid.invalid"))
}

fn check_authority(host: &str, sni: &str) -> Result<(), ProxyError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case(sni) {
        Ok(())
    } else {
        Err(ProxyError::downstream(
            ErrorKind::MisdirectedRequest,
            format!("request for host {host} on a connection for {sni}"),
        ))
    }
}

/// Removes the headers that describe one hop, not the message: those named
/// in `Connection`, the hop-by-hop set, and `TE` except `trailers` (which
/// gRPC needs end to end). A `Connection` token never drops the identity
/// header we add ourselves.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    elsinore_transport::http::strip_hop_by_hop(
        headers,
        &elsinore_transport::http::Strip {
            proxy_auth: false,
            te: elsinore_transport::http::Te::Trailers,
            keep: &[PEER_IDENTITY_HEADER],
        },
    );
}

/// Finds our own error in the client error's causes (connect failures carry
/// the [`ProxyError`] from [`Backends::connect`]); anything else is an
/// upstream failure of the exchange.
fn client_error(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut cause: Option<&(dyn StdError + 'static)> = e.source();
    let mut detail = String::new();
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<ProxyError>() {
            return p.clone();
        }
        if !detail.is_empty() {
            detail.push_str(": ");
        }
        detail.push_str(&c.to_string());
        cause = c.source();
    }
    if detail.is_empty() {
        detail = e.to_string();
    }
    if e.is_connect() {
        ProxyError::upstream(ErrorKind::ConnectFailed, detail)
    } else {
        ProxyError::upstream(
            ErrorKind::Io,
            format!("exchange with backend failed: {detail}"),
        )
    }
}

/// [`ProxyError::response`] with the ingress's body type.
fn error_response(e: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    e.response(grpc).map(Either::Right)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::header::CONTENT_TYPE;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
    use http::StatusCode;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::body::Frame;
    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::catalog::exports::tests::config;
    use crate::config::Export;
    use crate::state::new_shared;
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};

    const FORGED: &str = "spiffe://mesh-b.example/ns/prod/sa/admin";

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    fn identity(ca: &Ca, id: &SpiffeId) -> Identity {
        let issued = ca.issue(id, &[], &[]).unwrap();
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    fn bundle(ca: &Ca, domain: &str) -> TrustBundle {
        TrustBundle::from_pem(td(domain), ca.cert_pem().as_bytes()).unwrap()
    }

    fn export(name: &str, protocol: Protocol, backends: &[SocketAddr], peers: &[&str]) -> Export {
        Export {
            name: name.to_owned(),
            fqdn: format!("{name}.mesh-a.global"),
            protocol,
            port: 80,
            backends: backends
                .iter()
                .map(|a| HostPort {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
                .collect(),
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn tuning() -> ProxyTuning {
        ProxyTuning {
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            ..ProxyTuning::default()
        }
    }

    fn catalog(exports: Vec<Export>) -> ExportCatalog {
        let mut cfg = config();
        cfg.exports = exports;
        ExportCatalog::from_config(&cfg, &SpiffeId::gateway(td("mesh-a.example")))
    }

    /// An ingress of mesh-a on loopback, with peers mesh-b and mesh-c.
    struct Gateway {
        addr: SocketAddr,
        shared: Arc<crate::state::Shared>,
        stats: Arc<IngressStats>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ProxyError>>,
        a_bundle: TrustBundle,
        b_ca: Ca,
        c_ca: Ca,
    }

    async fn start(exports: Vec<Export>, tuning: ProxyTuning) -> Gateway {
        let a_td = td("mesh-a.example");
        let a_ca = Ca::new(&a_td).unwrap();
        let b_ca = Ca::new(&td("mesh-b.example")).unwrap();
        let c_ca = Ca::new(&td("mesh-c.example")).unwrap();
        let gateway_id = SpiffeId::gateway(a_td);
        let shared = new_shared("mesh-a".to_owned(), catalog(exports), &config().peers);
        let bundles = HashMap::from([
            ("mesh-b".to_owned(), bundle(&b_ca, "mesh-b.example")),
            ("mesh-c".to_owned(), bundle(&c_ca, "mesh-c.example")),
        ]);
        let shutdown = CancellationToken::new();
        let ctx_shared = Arc::clone(&shared);
        let credentials =
            crate::credentials::Credentials::fixed(identity(&a_ca, &gateway_id), bundles).unwrap();
        let ctx = ProxyContext {
            shared,
            credentials: Arc::new(credentials),
            tuning,
            shutdown: shutdown.clone(),
            abort: CancellationToken::new(),
            drain_timeout: Duration::from_secs(5),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = IngressStats::new();
        let task = tokio::spawn(serve(listener, ctx, Arc::clone(&stats)));
        Gateway {
            addr,
            shared: Arc::clone(&ctx_shared),
            stats,
            shutdown,
            task,
            a_bundle: bundle(&a_ca, "mesh-a.example"),
            b_ca,
            c_ca,
        }
    }

    impl Gateway {
        /// Connects as `id` (certificate signed by `ca`) with `sni`.
        async fn connect_as(
            &self,
            ca: &Ca,
            id: &str,
            sni: &str,
            alpn: &[&[u8]],
        ) -> tokio_rustls::client::TlsStream<TcpStream> {
            let id: SpiffeId = id.parse().unwrap();
            let cfg = elsinore_certs::client_config(&identity(ca, &id), &self.a_bundle, None, alpn)
                .unwrap();
            let tcp = TcpStream::connect(self.addr).await.unwrap();
            tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
                .await
                .unwrap()
        }

        /// Connects as mesh-b's gateway.
        async fn connect_b(
            &self,
            sni: &str,
            alpn: &[&[u8]],
        ) -> tokio_rustls::client::TlsStream<TcpStream> {
            self.connect_as(
                &self.b_ca,
                "spiffe://mesh-b.example/ns/elsinore/sa/gateway",
                sni,
                alpn,
            )
            .await
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// A TCP echo backend counting its connections.
    async fn echo_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        (addr, count)
    }

    async fn dead_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// What an HTTP backend saw, returned in response headers.
    fn seen(req: &Request<Incoming>) -> Response<String> {
        let join = |name: &str| {
            req.headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        Response::builder()
            .header("x-seen-peer", join(PEER_IDENTITY_HEADER))
            .header("x-seen-xfcc", join("x-forwarded-client-cert"))
            .header("x-seen-host", join("host"))
            .header("x-seen-conn-token", join("x-drop-me"))
            .header(
                "x-seen-authority",
                req.uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            )
            .header("x-seen-version", format!("{:?}", req.version()))
            .body(format!("path={}", req.uri()))
            .unwrap()
    }

    /// An HTTP/1.1 backend answering with what it saw; counts requests.
    async fn http1_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        c.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(seen(&req).map(|s| Full::new(Bytes::from(s)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, count)
    }

    /// An h2c backend whose responses stream a body and end with trailers.
    async fn h2c_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let head = seen(&req);
                        // Echo the request body back, then trailers.
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        trailers.insert("x-trailer", HeaderValue::from_static("kept"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"echo:"))),
                            Ok(Frame::data(body)),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let (parts, _) = head.into_parts();
                        Ok::<_, Infallible>(Response::from_parts(
                            parts,
                            StreamBody::new(futures_util::stream::iter(frames)),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// An HTTP/1.1 sender over a fresh connection as mesh-b.
    async fn h1_client(
        gw: &Gateway,
        sni: &str,
    ) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let tls = gw.connect_b(sni, &[b"http/1.1"]).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn body_text(resp: Response<Incoming>) -> String {
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    /// Asserts the connection carries no data: EOF (close_notify) or an
    /// error, whatever we write.
    async fn assert_closed(mut tls: tokio_rustls::client::TlsStream<TcpStream>) {
        let _ = tls.write_all(b"hello").await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .expect("the connection must be closed, not left open");
        assert!(matches!(read, Ok(0) | Err(_)), "got data: {read:?}");
    }

    #[tokio::test]
    async fn tcp_export_is_spliced_to_a_backend_skipping_a_dead_one() {
        let _limit = crate::test_support::limit();
        let (echo, count) = echo_backend().await;
        let dead = dead_addr().await;
        let gw = start(
            vec![export("db", Protocol::Tcp, &[dead, echo], &["mesh-b"])],
            tuning(),
        )
        .await;
        for i in 0..3 {
            // SNI is matched case-insensitively, trailing dot ignored.
            let sni = if i == 1 {
                "DB.Mesh-A.Global."
            } else {
                "db.mesh-a.global"
            };
            let mut tls = gw.connect_b(sni, &[]).await;
            tls.write_all(b"ping over the mesh").await.unwrap();
            // Half-close: the echo still comes back.
            tls.shutdown().await.unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping over the mesh");
        }
        assert_eq!(count.load(Ordering::SeqCst), 3);
        assert_eq!(get(&gw.stats.authorized), 3);
        assert_eq!(get(&gw.stats.spliced), 3);
        gw.stop().await;
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn refusals_close_the_connection_and_are_counted() {
        let _limit = crate::test_support::limit();
        let (echo, count) = echo_backend().await;
        let gw = start(
            vec![
                export("db", Protocol::Tcp, &[echo], &["mesh-b"]),
                export("secret", Protocol::Tcp, &[echo], &["mesh-c"]),
            ],
            tuning(),
        )
        .await;

        // Export not given to mesh-b, whatever SNI it sends.
        assert_closed(gw.connect_b("secret.mesh-a.global", &[]).await).await;
        assert_eq!(gw.stats.refused(Refusal::Unauthorized), 1);

        // No export with that FQDN (no default route).
        assert_closed(gw.connect_b("nothing.mesh-a.global", &[]).await).await;
        assert_eq!(gw.stats.refused(Refusal::UnknownSni), 1);

        // A trust domain that is no peer, signed by a CA we trust for
        // mesh-b: the handshake completes, the connection is refused.
        let stranger = gw
            .connect_as(
                &gw.b_ca,
                "spiffe://mesh-x.example/ns/elsinore/sa/gateway",
                "db.mesh-a.global",
                &[],
            )
            .await;
        assert_closed(stranger).await;
        assert_eq!(gw.stats.refused(Refusal::UnknownPeer), 1);

        // No SNI: an IP address as server name sends none.
        let tls = gw.connect_b("127.0.0.1", &[]).await;
        assert_closed(tls).await;
        assert_eq!(gw.stats.refused(Refusal::NoSni), 1);

        // mesh-c reaches its own export, through the same listener.
        let mut tls = gw
            .connect_as(
                &gw.c_ca,
                "spiffe://mesh-c.example/ns/elsinore/sa/gateway",
                "secret.mesh-a.global",
                &[],
            )
            .await;
        tls.write_all(b"c").await.unwrap();
        let mut one = [0u8; 1];
        tls.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"c");

        // Only mesh-c's connection reached the backend.
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(get(&gw.stats.authorized), 1);
        gw.stop().await;
    }

    #[tokio::test]
    async fn a_client_without_a_trusted_certificate_fails_the_handshake() {
        let _limit = crate::test_support::limit();
        let (echo, _) = echo_backend().await;
        let gw = start(
            vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
            tuning(),
        )
        .await;
        let rogue = Ca::new(&td("mesh-b.example")).unwrap();
        let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
            .parse()
            .unwrap();
        let cfg =
            elsinore_certs::client_config(&identity(&rogue, &id), &gw.a_bundle, None, &[]).unwrap();
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let res = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
            .await;
        // TLS 1.3: the client may finish before the server's alert arrives.
        if let Ok(tls) = res {
            assert_closed(tls).await;
        }
        for _ in 0..50 {
            if gw.stats.refused(Refusal::HandshakeFailed) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(gw.stats.refused(Refusal::HandshakeFailed), 1);
        gw.stop().await;
    }

    #[tokio::test]
    async fn a_resumed_session_does_not_outlive_the_peer_certificate() {
        let _limit = crate::test_support::limit();
        let (echo, count) = echo_backend().await;
        let gw = start(
            vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
            tuning(),
        )
        .await;
        let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
            .parse()
            .unwrap();
        let issued = gw
            .b_ca
            .issue_valid_for(&id, Duration::from_secs(2))
            .unwrap();
        let short =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        // One client config, so one session cache across both connections.
        let cfg = elsinore_certs::client_config(&short, &gw.a_bundle, None, &[]).unwrap();
        let dial = || async {
            let tcp = TcpStream::connect(gw.addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
                .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
                .await
                .unwrap()
        };
        // While valid: a full handshake, traffic (which also delivers the
        // session ticket).
        let mut first = dial().await;
        first.write_all(b"1").await.unwrap();
        let mut one = [0u8; 1];
        first.read_exact(&mut one).await.unwrap();
        drop(first);

        // Once the certificate expired, the client resumes (it does not
        // check), and ingress refuses the identity the ticket carries.
        let not_after = elsinore_certs::not_after(&short.cert_chain()[0]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::SystemTime::now() <= not_after + Duration::from_millis(1100) {
            assert!(
                std::time::Instant::now() < deadline,
                "certificate never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let second = dial().await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert_closed(second).await;
        assert_eq!(gw.stats.refused(Refusal::NoPeerIdentity), 1);
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "only the first reached the backend"
        );
        gw.stop().await;
    }

    #[tokio::test]
    async fn connection_cap_closes_new_connections() {
        let _limit = crate::test_support::limit();
        let (echo, _) = echo_backend().await;
        let gw = start(
            vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
            ProxyTuning {
                max_connections: 1,
                ..tuning()
            },
        )
        .await;
        let mut first = gw.connect_b("db.mesh-a.global", &[]).await;
        first.write_all(b"1").await.unwrap();
        let mut one = [0u8; 1];
        first.read_exact(&mut one).await.unwrap();

        let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
            .parse()
            .unwrap();
        let cfg = elsinore_certs::client_config(&identity(&gw.b_ca, &id), &gw.a_bundle, None, &[])
            .unwrap();
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let second = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
            .await;
        assert!(
            second.is_err(),
            "over the cap the connection is closed before tls"
        );
        assert_eq!(gw.stats.refused(Refusal::Overloaded), 1);
        gw.stop().await;
    }

    #[tokio::test]
    async fn http_export_forwards_with_the_verified_identity() {
        let _limit = crate::test_support::limit();
        let (backend, count) = http1_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
        for _ in 0..2 {
            let req = Request::builder()
                .uri("/reviews/1?x=y")
                .header(HOST, "reviews.mesh-a.global:15443")
                .header(PEER_IDENTITY_HEADER, FORGED)
                .header("x-forwarded-client-cert", "By=forged")
                .header(CONNECTION, "x-drop-me")
                .header("x-drop-me", "1")
                .body(Empty::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let h = resp.headers();
            assert_eq!(
                h["x-seen-peer"],
                "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
            );
            assert_eq!(h["x-seen-xfcc"], "");
            assert_eq!(h["x-seen-conn-token"], "");
            assert_eq!(h["x-seen-host"], "reviews.mesh-a.global:15443");
            assert_eq!(h["x-seen-version"], "HTTP/1.1");
            // Origin-form on the wire to the HTTP/1 backend.
            assert_eq!(body_text(resp).await, "path=/reviews/1?x=y");
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(get(&gw.stats.http_requests), 2);
        gw.stop().await;
    }

    /// An HTTP/1.1 backend echoing the request body after what it saw of
    /// the framing; counts accepted connections.
    async fn http1_echo_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&accepts);
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let framing = if req.headers().contains_key(TRANSFER_ENCODING) {
                            "chunked"
                        } else {
                            "length"
                        };
                        let host = req.headers()[HOST].to_str().unwrap().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{framing} {host} {}", String::from_utf8_lossy(&body));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepts)
    }

    #[tokio::test]
    async fn http_export_streams_bodies_over_one_pooled_backend_connection() {
        let _limit = crate::test_support::limit();
        let (backend, accepts) = http1_echo_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;

        // HTTP/1.1 peer, body of known length.
        let tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/r")
            .header(HOST, "reviews.mesh-a.global")
            .body(Full::new(Bytes::from_static(b"five stars")))
            .unwrap();
        let resp = h1.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_text(resp).await,
            "length reviews.mesh-a.global five stars"
        );

        // HTTP/2 peer, streamed body of unknown length, no Host header:
        // the backend gets it chunked, with Host from :authority.
        let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"two "))),
            Ok(Frame::data(Bytes::from_static(b"parts"))),
        ];
        let req = Request::post("https://reviews.mesh-a.global/r")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_text(resp).await,
            "chunked reviews.mesh-a.global two parts"
        );

        // Both peers' requests went over the one backend connection.
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        gw.stop().await;
    }

    /// An HTTP/2 peer's request trailers reach an HTTP export's backend
    /// without the identity fields stripped from headers.
    #[tokio::test]
    async fn identity_fields_in_h2_request_trailers_do_not_reach_the_backend() {
        let _limit = crate::test_support::limit();
        // Answers with the trailer fields it received.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let collected = req.into_body().collect().await.unwrap();
                        let mut seen: Vec<String> = collected
                            .trailers()
                            .map(|t| t.iter().map(|(k, v)| format!("{k}={v:?}")).collect())
                            .unwrap_or_default();
                        seen.sort();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen.join(",")))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut trailers = HeaderMap::new();
        for name in crate::proxy::STRIPPED_IDENTITY_HEADERS {
            trailers.insert(*name, HeaderValue::from_static(FORGED));
        }
        trailers.insert("x-kept", HeaderValue::from_static("yes"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body"))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = Request::post("https://reviews.mesh-a.global/r")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "x-kept=\"yes\"");
        gw.stop().await;
    }

    #[tokio::test]
    async fn host_naming_another_service_is_misdirected() {
        let _limit = crate::test_support::limit();
        let (backend, count) = http1_backend().await;
        let gw = start(
            vec![
                export("reviews", Protocol::Http, &[backend], &["mesh-b"]),
                export("admin", Protocol::Http, &[backend], &["mesh-c"]),
            ],
            tuning(),
        )
        .await;
        let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
        let req = Request::builder()
            .uri("/")
            .header(HOST, "admin.mesh-a.global")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
        assert!(
            body_text(resp)
                .await
                .starts_with("downstream misdirected request")
        );

        // Absolute-form URI naming another service: same answer.
        let req = Request::builder()
            .uri("http://admin.mesh-a.global/")
            .header(HOST, "reviews.mesh-a.global")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);

        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert_eq!(get(&gw.stats.misdirected), 2);
        gw.stop().await;
    }

    #[tokio::test]
    async fn upstream_failures_map_to_502_and_504() {
        let _limit = crate::test_support::limit();
        let dead = dead_addr().await;
        // Accepts and reads, never answers.
        let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang_addr = hang.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = hang.accept().await.unwrap();
                held.push(s);
            }
        });
        let gw = start(
            vec![
                export("down", Protocol::Http, &[dead], &["mesh-b"]),
                export("slow", Protocol::Http, &[hang_addr], &["mesh-b"]),
            ],
            ProxyTuning {
                request_timeout: Duration::from_millis(300),
                ..tuning()
            },
        )
        .await;

        let mut sender = h1_client(&gw, "down.mesh-a.global").await;
        let req = Request::builder()
            .uri("/")
            .header(HOST, "down.mesh-a.global")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()["x-elsinore-error"], "connect_failed");
        let text = body_text(resp).await;
        assert!(text.starts_with("upstream connect failed"), "{text}");
        assert!(text.contains(&dead.to_string()), "{text}");

        let mut sender = h1_client(&gw, "slow.mesh-a.global").await;
        let req = Request::builder()
            .uri("/")
            .header(HOST, "slow.mesh-a.global")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            body_text(resp)
                .await
                .starts_with("upstream request timed out")
        );
        assert_eq!(get(&gw.stats.upstream_errors), 2);
        gw.stop().await;
    }

    #[tokio::test]
    async fn grpc_export_goes_over_h2c_with_trailers() {
        let _limit = crate::test_support::limit();
        let backend = h2c_backend().await;
        let gw = start(
            vec![export("ratings", Protocol::Grpc, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let tls = gw.connect_b("ratings.mesh-a.global", &[b"h2"]).await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        for i in 0..3 {
            let req = Request::builder()
                .method("POST")
                .uri("https://ratings.mesh-a.global/ratings.v1.Ratings/Get")
                .header(CONTENT_TYPE, "application/grpc")
                .header(TE, "trailers")
                .header(PEER_IDENTITY_HEADER, FORGED)
                .body(Full::new(Bytes::from(format!("req{i}"))))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let h = resp.headers().clone();
            assert_eq!(
                h["x-seen-peer"],
                "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
            );
            assert_eq!(h["x-seen-version"], "HTTP/2.0");
            assert_eq!(h["x-seen-authority"], "ratings.mesh-a.global");
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected
                .trailers()
                .cloned()
                .expect("trailers pass through");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-trailer"], "kept");
            assert_eq!(collected.to_bytes(), format!("echo:req{i}"));
        }

        // A gRPC request for another service gets a gRPC status, not HTML.
        let req = Request::builder()
            .method("POST")
            .uri("https://other.mesh-a.global/x.Y/Z")
            .header(CONTENT_TYPE, "application/grpc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "14");
        gw.stop().await;
    }

    #[tokio::test]
    async fn catalog_changes_reroute_new_connections() {
        let _limit = crate::test_support::limit();
        let (echo, _) = echo_backend().await;
        let gw = start(
            vec![export("db", Protocol::Tcp, &[echo], &["mesh-c"])],
            tuning(),
        )
        .await;
        assert_closed(gw.connect_b("db.mesh-a.global", &[]).await).await;
        assert_eq!(gw.stats.refused(Refusal::Unauthorized), 1);

        // A config reload publishes a new catalog: db is now for mesh-b.
        gw.shared.exports.send_replace(Arc::new(catalog(vec![export(
            "db",
            Protocol::Tcp,
            &[echo],
            &["mesh-b"],
        )])));
        let mut tls = gw.connect_b("db.mesh-a.global", &[]).await;
        tls.write_all(b"now").await.unwrap();
        let mut got = [0u8; 3];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"now");
        gw.stop().await;
    }

    /// Reads from `tls` into `buf` until `done(buf)` holds, the peer
    /// closes, or 10 s pass (a failure naming what was read).
    async fn read_until<S: tokio::io::AsyncRead + Unpin>(
        tls: &mut S,
        buf: &mut Vec<u8>,
        done: impl Fn(&str) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(&String::from_utf8_lossy(buf)) {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
                Err(_) => panic!("timed out; got {:?}", String::from_utf8_lossy(buf)),
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Before hyper knows the protocol it has no header timer: the first
    /// request is due `requestTimeout` after the connection opened, far
    /// sooner than the idle timeout, whether the peer sends nothing or
    /// the start of an h2 preface.
    #[tokio::test]
    async fn a_peer_that_sends_no_request_is_closed_after_the_request_timeout() {
        let _limit = crate::test_support::limit();
        let (backend, _) = http1_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            ProxyTuning {
                request_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(3600),
                ..tuning()
            },
        )
        .await;
        for (alpn, sent) in [
            (&[&b"http/1.1"[..]][..], &b""[..]),
            (&[][..], &b""[..]),
            (&[&b"http/1.1"[..]][..], &b"PRI * HTTP/2.0\r\n"[..]),
        ] {
            let mut tls = gw.connect_b("reviews.mesh-a.global", alpn).await;
            tls.write_all(sent).await.unwrap();
            tls.flush().await.unwrap();
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("still open after sending {sent:?}"));
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        // A request in time is served.
        let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
        let req = Request::get("/").header(HOST, "reviews.mesh-a.global");
        let resp = sender.send_request(req.body(Empty::new()).unwrap()).await;
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
        gw.stop().await;
    }

    /// Userinfo in Host, in an absolute-form target or in `:authority`:
    /// 400, nothing forwarded (the SNI check alone would look past it).
    #[tokio::test]
    async fn userinfo_in_host_or_authority_is_refused() {
        let _limit = crate::test_support::limit();
        let (backend, count) = http1_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
        for (uri, host) in [
            ("/", "user@reviews.mesh-a.global"),
            ("/", "user:pw@reviews.mesh-a.global:15443"),
            (
                "http://user@reviews.mesh-a.global/",
                "reviews.mesh-a.global",
            ),
        ] {
            let req = Request::get(uri).header(HOST, host).body(Empty::new());
            let resp = sender.send_request(req.unwrap()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri} {host}");
            assert!(body_text(resp).await.contains("userinfo"));
        }
        let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://user@reviews.mesh-a.global/r").body(Empty::<Bytes>::new());
        let resp = h2.send_request(req.unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        // Without userinfo, the same requests go through.
        let req = Request::get("https://reviews.mesh-a.global/r").body(Empty::<Bytes>::new());
        let resp = h2.send_request(req.unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let req = Request::get("/").header(HOST, "reviews.mesh-a.global");
        let resp = sender.send_request(req.body(Empty::new()).unwrap()).await;
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        gw.stop().await;
    }

    /// An HTTP/1.1 backend answering with the request body and the trailers
    /// it received, one `name=value` line each.
    async fn trailer_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let collected = req.into_body().collect().await.unwrap();
                        let mut text = String::new();
                        for (name, value) in collected.trailers().into_iter().flatten() {
                            text.push_str(&format!("{name}={}\n", value.to_str().unwrap()));
                        }
                        let body = collected.to_bytes();
                        text.push_str(&format!("body={}", String::from_utf8_lossy(&body)));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// Identity headers are stripped from trailers as from the header
    /// section, for HTTP/1.1 (chunked) and HTTP/2 peers; other trailers
    /// pass.
    #[tokio::test]
    async fn identity_headers_in_trailers_do_not_reach_the_backend() {
        let _limit = crate::test_support::limit();
        let backend = trailer_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
        tls.write_all(
            format!(
                "POST /t HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                 5\r\nhello\r\n0\r\n{PEER_IDENTITY_HEADER}: {FORGED}\r\n\
                 X-Forwarded-Client-Cert: By=forged\r\nx-kept: yes\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        read_until(&mut tls, &mut got, |_| false).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("x-kept=yes\n"), "{got}");
        assert!(got.contains("body=hello"), "{got}");
        assert!(!got.contains("forged"), "{got}");
        assert!(!got.contains(PEER_IDENTITY_HEADER), "{got}");

        let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut trailers = HeaderMap::new();
        trailers.insert(PEER_IDENTITY_HEADER, HeaderValue::from_static(FORGED));
        trailers.insert("l5d-client-id", HeaderValue::from_static("forged"));
        trailers.insert("x-kept", HeaderValue::from_static("yes"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = Request::post("https://reviews.mesh-a.global/t")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = body_text(resp).await;
        assert_eq!(text, "x-kept=yes\nbody=hello");
        gw.stop().await;
    }

    /// An HTTP/1.0 backend (answers in HTTP/1.0 and closes; `/len` with a
    /// Content-Length, anything else delimited by the close), as Python's
    /// `http.server` does.
    async fn http10_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    read_until(&mut s, &mut head, |h| h.contains("\r\n\r\n")).await;
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let body = format!("from 1.0 {path}");
                    let length = if path == "/len" {
                        format!("Content-Length: {}\r\n", body.len())
                    } else {
                        String::new()
                    };
                    let resp =
                        format!("HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\n{length}\r\n{body}");
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    /// RFC 9110 §6.2: the ingress answers an HTTP/1.1 peer in HTTP/1.1
    /// whatever the backend's version, and the peer's connection stays
    /// open: a body the backend delimited by closing goes out chunked.
    #[tokio::test]
    async fn an_http10_backend_is_answered_in_http11_on_a_kept_connection() {
        let _limit = crate::test_support::limit();
        let backend = http10_backend().await;
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
        // Close-delimited from the backend, then with a length, on one
        // connection.
        tls.write_all(b"GET /close HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        read_until(&mut tls, &mut got, |s| s.ends_with("\r\n0\r\n\r\n")).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(text.contains("from 1.0 /close"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");

        tls.write_all(b"GET /len HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        read_until(&mut tls, &mut got, |s| s.ends_with("from 1.0 /len")).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 13\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nfrom 1.0 /len"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");

        // An HTTP/1.0 peer gets HTTP/1.0 (hyper's choice), body to the close.
        let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
        tls.write_all(b"GET /close HTTP/1.0\r\nHost: reviews.mesh-a.global\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        read_until(&mut tls, &mut got, |_| false).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nfrom 1.0 /close"), "{text}");
        gw.stop().await;
    }

    /// Kills the child process when dropped (the test's backend).
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// What a new user tries first: Python's `http.server` (HTTP/1.0,
    /// `Content-Length` bodies) behind an HTTP export. The peer gets HTTP/1.1
    /// answers on one kept connection.
    #[tokio::test]
    async fn python_http_server_behind_an_export_answers_in_http11() {
        use std::io::BufRead;
        let _limit = crate::test_support::limit();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), "hello from python\n").unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs (CI installs it)");
        let stdout = child.stdout.take().unwrap();
        let child = Child(child);
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line
        })
        .await
        .unwrap();
        let port: u16 = line
            .split(" port ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        let backend: SocketAddr = ([127, 0, 0, 1], port).into();
        let gw = start(
            vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
            tuning(),
        )
        .await;
        let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
        for _ in 0..2 {
            tls.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            read_until(&mut tls, &mut got, |s| s.ends_with("hello from python\n")).await;
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.contains("content-length: 18\r\n"), "{text}");
            assert!(!text.contains("connection: close"), "{text}");
        }
        gw.stop().await;
        drop(child);
    }

    #[tokio::test]
    async fn the_request_timeout_does_not_copy_the_exchange() {
        let _limit = crate::test_support::limit();
        // Every request's exchange lives in one heap block that is allocated
        // and filled per request; an `async fn` timeout wrapper once kept the
        // backend exchange twice (8 KiB per request in release builds).
        let exchange = async {
            let state = [7u8; 4096];
            tokio::task::yield_now().await;
            Ok::<_, ProxyError>(state[100])
        };
        let alone = std::mem::size_of_val(&exchange);
        let wrapped = within(Duration::from_secs(1), exchange);
        let size = std::mem::size_of_val(&wrapped);
        assert!(
            size < alone + 512,
            "the exchange is {alone} bytes, with its timeout {size}"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[TE], "trailers");
        assert_eq!(h["x-kept"], "1");

        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
