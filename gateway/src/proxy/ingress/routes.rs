//! Where ingress traffic goes: the routing table built from the export
//! catalog (exports by normalized FQDN), each route's upstream (its
//! backends and, for HTTP protocols, its pooled client), and the rules by
//! which a request's Host / `:authority` must name the SNI's service. The
//! table is an immutable snapshot rebuilt only when the catalog changes;
//! nothing here touches a peer's connection, and nothing locks per request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use elsinore_federation_api::Protocol;
use elsinore_transport::h1::client::{self as h1client, H1Client};
use http::Uri;
use http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::PeerBody;
use crate::catalog::ExportCatalog;
use crate::catalog::exports::ExportedService;
use crate::config::{HostPort, ProxyTuning};
use crate::proxy::IdentityTrailersStripped;
use crate::proxy::backend::Backends;
use crate::proxy::error::{ErrorKind, ProxyError};

/// The routing table derived from one export catalog: exports by normalized
/// FQDN, each with its backends and (for HTTP protocols) its pooled client.
pub(super) struct Routes {
    catalog: Arc<ExportCatalog>,
    pub(super) by_sni: HashMap<String, Route>,
}

pub(super) struct Route {
    pub(super) export: ExportedService,
    pub(super) upstream: Arc<Upstream>,
}

/// Caches [`Routes`] for the current catalog. Connections read it without
/// a lock; it is rebuilt (under a mutex, so once) only when the catalog
/// `Arc` changes, reusing the upstreams — and thus their connection pools
/// and dead marks — of exports whose backends and protocol did not change.
pub(super) struct RouteCache {
    current: ArcSwap<Routes>,
    rebuild: Mutex<()>,
    tuning: ProxyTuning,
}

impl RouteCache {
    pub(super) fn new(tuning: ProxyTuning) -> Self {
        RouteCache {
            current: ArcSwap::from_pointee(Routes {
                catalog: Arc::new(ExportCatalog::default()),
                by_sni: HashMap::new(),
            }),
            rebuild: Mutex::new(()),
            tuning,
        }
    }

    pub(super) fn routes(&self, catalog: Arc<ExportCatalog>) -> Arc<Routes> {
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

pub(super) type HttpClient = Client<BackendConnector, IdentityTrailersStripped<PeerBody>>;

/// The client of an HTTP export: our own HTTP/1.1 client (the request's
/// task does the exchange), or hyper's for h2c backends.
#[derive(Clone)]
pub(super) enum HttpBackend {
    H1(H1Client),
    H2(Arc<HttpClient>),
}

/// Where one export's traffic goes.
pub(super) struct Upstream {
    pub(super) protocol: Protocol,
    backend_list: Vec<HostPort>,
    pub(super) backends: Arc<Backends>,
    /// Pooled client for HTTP protocols; `None` = splice.
    pub(super) http: Option<HttpBackend>,
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
pub(super) struct BackendConnector {
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

pub(super) fn sni_authority(sni: &str) -> Authority {
    sni.parse()
        .unwrap_or_else(|_| Authority::from_static("invalid.invalid"))
}

pub(super) fn check_authority(host: &str, sni: &str) -> Result<(), ProxyError> {
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

/// Lower-case, trailing dot stripped: how SNI, Host and FQDNs are compared.
pub(super) fn normalize_host(h: &str) -> String {
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}
