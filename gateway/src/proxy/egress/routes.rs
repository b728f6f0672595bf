//! Where a connection or request goes: which listener it came in on
//! ([`Route`]), the catalog's route table as egress holds it ([`View`])
//! with what egress keeps per entry (pool handles, the `:authority` memo,
//! the latency histogram), and the Host and `:authority` rules. The mode,
//! endpoints, SNI and pool keys come computed with the table
//! ([`crate::catalog::routes`]). Lookups only: nothing here dials, binds or
//! counts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, OnceLock};

use elsinore_federation_api::Endpoint;
use http::uri::Authority;
use http::{Request, header};

use super::{Egress, lock};
use crate::catalog::routes::{Mode, VipEntry, VipTable};
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::pool::PoolHandle;

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

/// The route table egress serves from, with what egress keeps per entry
/// ([`Routes`]): made on an entry's first request, and carried over to the
/// next table as long as the catalog shares the entry (it does while the
/// import, address and port are unchanged). Read lock-free per connection
/// and per request; replaced whole by the listener task.
pub(super) struct View {
    pub(super) table: Arc<VipTable>,
    /// By the entry's address (`Arc::as_ptr`): the table holds every entry
    /// named here, so an address cannot be reused while this view lives.
    /// Routes made on the old view after this one was built are not
    /// carried: they are made again here on first use (the pool shares
    /// connections by key, so only the memo starts over).
    state: HashMap<usize, OnceLock<Arc<Routes>>>,
}

fn slot_of(entry: &Arc<VipEntry>) -> usize {
    Arc::as_ptr(entry) as usize
}

impl View {
    pub(super) fn new(table: Arc<VipTable>) -> View {
        View::next(table, None)
    }

    /// The view of `table`, keeping `previous`'s state of shared entries.
    pub(super) fn next(table: Arc<VipTable>, previous: Option<&View>) -> View {
        let state = table
            .iter()
            .map(|entry| {
                let slot = slot_of(entry);
                let cell = previous
                    .and_then(|p| p.state.get(&slot))
                    .and_then(|c| c.get())
                    .map_or_else(OnceLock::new, |routes| OnceLock::from(Arc::clone(routes)));
                (slot, cell)
            })
            .collect();
        View { table, state }
    }

    pub(super) fn lookup_vip(&self, addr: SocketAddrV4) -> Option<Arc<VipEntry>> {
        self.table
            .lookup_vip(*addr.ip())
            .filter(|e| e.port == addr.port())
            .cloned()
    }

    /// The per-entry state cell, if `entry` is one of this view's.
    fn cell(&self, entry: &Arc<VipEntry>) -> Option<&OnceLock<Arc<Routes>>> {
        self.state.get(&slot_of(entry))
    }
}

/// What egress keeps per route-table entry (see [`Egress::routes`]).
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
    /// The routes of `entry` in `view`, made on its first request and kept
    /// with the view: a request then allocates no pool key and takes no map
    /// lock. An entry the view does not hold (the table changed between
    /// the lookup and here) gets routes of its own, correct but not kept.
    pub(super) fn routes(&self, view: &View, entry: &Arc<VipEntry>) -> Arc<Routes> {
        match view.cell(entry) {
            Some(cell) => Arc::clone(cell.get_or_init(|| Arc::new(self.make_routes(entry)))),
            None => Arc::new(self.make_routes(entry)),
        }
    }

    fn make_routes(&self, entry: &VipEntry) -> Routes {
        let http = match entry.mode {
            Mode::Http => entry
                .upstreams
                .iter()
                .map(|upstream| HttpTarget {
                    endpoint: upstream.endpoint.clone(),
                    pool: self.pool.handle(upstream.key.clone()),
                })
                .collect(),
            Mode::Stream => Vec::new(),
        };
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
