//! The data plane. [`ingress`] faces peers: it terminates mTLS, identifies
//! the peer by its SPIFFE ID, routes by SNI to an exported service the peer
//! may reach, and forwards to the service's backends. [`egress`] faces local
//! apps: it listens on one VIP per imported service (or on one shared
//! address, once per port), opens (or reuses) an mTLS connection to the
//! owner's ingress, and carries the traffic across.
//! Routing state is read from immutable snapshots (`watch`), never locked
//! per request.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ProxyTuning;
use crate::state::Shared;

pub(crate) mod activity;
pub(crate) mod backend;
pub(crate) mod budget;
pub mod egress;
pub mod ingress;
pub(crate) mod pool;
// The data plane's error type lives with the transport that raises most
// of them; the rest of the gateway (catalog, DNS, federation) names it
// here.
pub use elsinore_transport::error;
pub use elsinore_transport::tls;

/// The header in which ingress hands the verified peer identity (SPIFFE ID)
/// to the backend. Any copy a peer sends is stripped first.
pub const PEER_IDENTITY_HEADER: &str = "x-elsinore-peer-identity";

/// Identity headers a peer must never be able to set for our backends:
/// stripped from every request arriving through ingress.
pub const STRIPPED_IDENTITY_HEADERS: &[&str] = &[
    PEER_IDENTITY_HEADER,
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-s-dn",
    "x-ssl-client-verify",
    "l5d-client-id",
    "x-envoy-peer-metadata",
    "x-envoy-peer-metadata-id",
];

/// Whether `headers` hold a field named in `names` (lower-case). One pass
/// over a request's few fields: most hold none of the hop-by-hop or
/// identity headers, and this is cheaper than a map lookup per name.
pub(crate) fn has_any(headers: &http::HeaderMap, names: &[&str]) -> bool {
    headers.keys().any(|n| names.contains(&n.as_str()))
}

/// Removes every field named in [`STRIPPED_IDENTITY_HEADERS`] from a
/// header section or a trailer section.
pub(crate) fn strip_identity_headers(headers: &mut http::HeaderMap) {
    if has_any(headers, STRIPPED_IDENTITY_HEADERS) {
        for name in STRIPPED_IDENTITY_HEADERS {
            headers.remove(*name);
        }
    }
}

/// A request body whose trailer section loses the identity headers
/// ([`strip_identity_headers`]): a backend that merges trailers into the
/// request's fields (as many frameworks do) must not find a peer's copy
/// there. Ingress wraps every peer's body in it, HTTP/1.1 chunked and
/// HTTP/2 alike.
pub(crate) struct IdentityTrailersStripped<B>(pub(crate) B);

impl<B> http_body::Body for IdentityTrailersStripped<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| match frame.into_trailers() {
                    Ok(mut trailers) => {
                        strip_identity_headers(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// Refuses (400) a request whose target authority (absolute-form target,
/// HTTP/2 `:authority`) or `Host` carries userinfo (`user@host`). RFC 9110
/// §4.2.4 forbids it in http(s) URIs and §7.2 leaves no room for it in
/// Host. Authority parsing takes the host after the `@` while the field is
/// forwarded whole, so such a request could pass a Host or SNI check under
/// one name and reach the backend with another.
pub(crate) fn refuse_userinfo(
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(), error::ProxyError> {
    let in_target = uri.authority().filter(|a| a.as_str().contains('@'));
    let in_host = headers
        .get_all(http::header::HOST)
        .iter()
        .find(|v| v.as_bytes().contains(&b'@'));
    let bad = match (in_target, in_host) {
        (Some(a), _) => format!("request target authority {:?}", a.as_str()),
        (None, Some(h)) => format!("host {:?}", String::from_utf8_lossy(h.as_bytes())),
        (None, None) => return Ok(()),
    };
    Err(error::ProxyError::downstream(
        error::ErrorKind::Protocol,
        format!("{bad} carries userinfo, which is not allowed"),
    ))
}

/// What both proxies need from the running gateway.
#[derive(Clone)]
pub struct ProxyContext {
    pub shared: Arc<Shared>,
    /// Our identity and the peers' bundles, as published now: loaded once
    /// per new connection (never per request), so a rotation reaches the
    /// next handshake while open connections keep what they started with.
    pub credentials: Arc<crate::credentials::Credentials>,
    pub tuning: ProxyTuning,
    /// Drain begins: stop accepting, GOAWAY, close idle keep-alives; what
    /// is in flight carries on.
    pub shutdown: CancellationToken,
    /// `drain.timeout` after `shutdown`: cut whatever is still open.
    pub abort: CancellationToken,
    /// How long connections get to finish after `shutdown`.
    pub drain_timeout: Duration,
}

/// Counts the connections of a listener that are still being served, so a
/// drain can wait until none is left.
#[derive(Debug, Default)]
pub(crate) struct Tracker(Arc<TrackerInner>);

#[derive(Debug, Default)]
struct TrackerInner {
    open: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by one connection's task; dropping it (however the task ends)
/// counts the connection as finished.
pub(crate) struct Open(Arc<TrackerInner>);

impl Tracker {
    pub(crate) fn enter(&self) -> Open {
        self.0
            .open
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Open(Arc::clone(&self.0))
    }

    pub(crate) fn count(&self) -> usize {
        self.0.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}
