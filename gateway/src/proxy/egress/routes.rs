//! Where a connection or request goes: which listener it came in on
//! ([`Route`]), how an import's traffic is carried ([`Mode`]), the owner's
//! endpoints and the SNI to reach them, the routes derived once per VIP
//! entry (pool handles, the `:authority` memo, the latency histogram), and
//! the Host and `:authority` rules. Pure lookups over the published VIP
//! table: nothing here dials, binds or counts.

use std::any::Any;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use elsinore_federation_api::{Endpoint, Instance, Protocol};
use http::uri::Authority;
use http::{Request, header};

use super::{Egress, lock};
use crate::dns::vip::VipEntry;
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::pool::{PoolHandle, PoolKey};

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy)]
pub(super) enum Route {
    /// A service VIP and port: the address is the route.
    Vip(SocketAddrV4),
    /// A port of the shared address: TCP by port, HTTP by Host.
    Port(u16),
    /// The catch-all listener: HTTP routed by Host.
    CatchAll,
}

/// How a service's traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Terminated as HTTP and multiplexed over pooled HTTP/2.
    Http,
    /// Spliced over one mTLS connection per client connection.
    Stream,
}

fn mode_of(protocol: Protocol) -> Mode {
    if protocol.is_http() {
        Mode::Http
    } else {
        Mode::Stream
    }
}

/// The service's mode is its first instance's (the VIP port is taken from
/// the instances in the same order).
pub(super) fn service_mode(entry: &VipEntry) -> Mode {
    entry
        .import
        .service
        .instances
        .first()
        .map_or(Mode::Stream, |i| mode_of(i.protocol))
}

/// Every (instance, endpoint) pair of the service's instances in `mode`.
pub(super) fn targets(entry: &VipEntry, mode: Mode) -> Vec<(&Instance, &Endpoint)> {
    let svc = &entry.import.service;
    svc.instances
        .iter()
        .filter(|i| mode_of(i.protocol) == mode)
        .flat_map(|i| svc.endpoints_for(i).into_iter().map(move |e| (i, e)))
        .collect()
}

/// The SNI the owner's ingress routes on: the instance's `SNI` metadata,
/// else the FQDN the owner gave the service.
pub(super) fn sni_for<'a>(instance: &'a Instance, entry: &'a VipEntry) -> &'a str {
    instance
        .sni()
        .filter(|s| !s.is_empty())
        .unwrap_or(&entry.import.original_fqdn)
}

/// What egress derives once per VIP entry (see [`Egress::routes`]).
pub(super) struct Routes {
    /// The HTTP targets in round-robin order.
    pub(super) http: Vec<HttpTarget>,
    /// The `:authority` for the Host apps last sent to this import.
    pub(super) authority: AuthorityMemo,
    /// This import's request latency histogram.
    pub(super) latency: Arc<crate::metrics::Histogram>,
}

/// The last Host an app sent to one import and the `:authority` it became
/// ([`upstream_authority`]). Apps send the same Host request after request;
/// working it out again (lowercasing, an address parse, formatting and
/// parsing the result) was per-request work.
#[derive(Default)]
pub(super) struct AuthorityMemo(Mutex<Option<(Box<str>, Authority)>>);

impl AuthorityMemo {
    pub(super) fn get(
        &self,
        sent: Option<&str>,
        entry: &VipEntry,
    ) -> Result<Authority, ProxyError> {
        let key = sent.unwrap_or("");
        if let Some((last, authority)) = &*lock(&self.0)
            && **last == *key
        {
            return Ok(authority.clone());
        }
        let text = upstream_authority(sent, entry);
        let authority = Authority::try_from(text.as_str()).map_err(|e| {
            ProxyError::downstream(
                ErrorKind::Protocol,
                format!("cannot forward a request for {text:?}: {e}"),
            )
        })?;
        *lock(&self.0) = Some((key.into(), authority.clone()));
        Ok(authority)
    }
}

/// One endpoint of an HTTP service, with its pool looked up (whose key
/// carries the SNI).
pub(super) struct HttpTarget {
    pub(super) endpoint: Endpoint,
    pub(super) pool: PoolHandle,
}

impl Egress {
    pub(super) fn lookup_vip(&self, addr: SocketAddrV4) -> Option<Arc<VipEntry>> {
        self.table
            .load()
            .lookup_vip(*addr.ip())
            .filter(|e| e.port == addr.port())
            .cloned()
    }

    /// The routes of `entry`, derived on its first request and kept with
    /// it: a request then allocates no pool key and takes no map lock.
    pub(super) fn routes(&self, entry: &VipEntry) -> Arc<Routes> {
        let derived = entry.derived.get_or_init(|| {
            let routes: Arc<dyn Any + Send + Sync> = Arc::new(self.derive_routes(entry));
            routes
        });
        match Arc::clone(derived).downcast::<Routes>() {
            Ok(routes) => routes,
            // Only egress writes `derived`; were it ever something else,
            // deriving again is correct, just slower.
            Err(_) => Arc::new(self.derive_routes(entry)),
        }
    }

    fn derive_routes(&self, entry: &VipEntry) -> Routes {
        let http = targets(entry, Mode::Http)
            .into_iter()
            .map(|(instance, endpoint)| {
                let key = PoolKey {
                    endpoint: format!("{}:{}", endpoint.address, endpoint.port),
                    sni: sni_for(instance, entry).to_owned(),
                    peer: entry.import.peer.clone(),
                    sans: entry.import.service.sans.clone(),
                };
                HttpTarget {
                    endpoint: endpoint.clone(),
                    pool: self.pool.handle(key),
                }
            })
            .collect();
        Routes {
            http,
            authority: AuthorityMemo::default(),
            latency: self
                .ctx
                .shared
                .latency
                .egress
                .handle(&entry.import.peer, &entry.fqdn),
        }
    }
}

pub(super) fn no_endpoints(entry: &VipEntry) -> ProxyError {
    ProxyError::upstream(
        ErrorKind::NoRoute,
        format!(
            "{} of peer {} has no endpoint to reach",
            entry.fqdn, entry.import.peer
        ),
    )
    .with_retry_safe(false)
}

/// The authority the app addressed: the request target's (HTTP/2, or an
/// absolute-form HTTP/1.1 target) or the Host header.
pub(super) fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .filter(|h| !h.is_empty())
}

/// Splits an authority into host and the `:port` suffix (possibly empty).
pub(super) fn split_host(authority: &str) -> (&str, &str) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some(end) = rest.find(']')
    {
        return (&rest[..end], &rest[end + 1..]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, &authority[host.len()..])
        }
        _ => (authority, ""),
    }
}

/// The `:authority` sent to the owner. Any name that designates this
/// import here — a VIP or `localhost` (the app dialed an address), no Host
/// at all, the name we registered it under (possibly a local alias), or
/// `<instance>.<that name>` — becomes the owner's own FQDN, which an
/// Elsinore ingress matches against the SNI (421 otherwise). Any other name
/// is the app's choice and is passed on. The port is kept as the app sent it.
pub(super) fn upstream_authority(sent: Option<&str>, entry: &VipEntry) -> String {
    let original = &entry.import.original_fqdn;
    let Some(sent) = sent else {
        return original.clone();
    };
    let (host, port) = split_host(sent);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let instance_form = host
        .strip_suffix(entry.fqdn.as_str())
        .and_then(|p| p.strip_suffix('.'))
        .is_some_and(|instance| !instance.is_empty() && !instance.contains('.'));
    if host.parse::<IpAddr>().is_ok() || host == "localhost" || host == entry.fqdn || instance_form
    {
        return format!("{original}{port}");
    }
    sent.to_owned()
}
