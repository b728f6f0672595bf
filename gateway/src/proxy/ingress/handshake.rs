//! The ingress's gate: per accepted TCP connection, the mTLS handshake
//! with our gateway identity, the peer named by the trust domain of its
//! verified SPIFFE ID (which must be one of that peer's allowed
//! identities), the route chosen by SNI and the export's consent to
//! that peer; then the connection is handed to the HTTP or the stream
//! stage by the export's protocol. Every refusal is counted, logged with
//! its reason and closed with a close_notify before any application data
//! moves. It must not read or write application data itself, nor tell a
//! refused peer which exports exist.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{HttpConn, serve_http};
use super::routes::{RouteCache, normalize_host};
use super::stats::{IngressStats, Refusal, bump};
use super::stream::forward_opaque;
use crate::config::ProxyTuning;
use crate::proxy::ProxyContext;
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::tls;

/// How long we wait for a refused peer to take our close_notify.
pub(super) const REFUSAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// ALPN protocols ingress offers. Opaque exports ignore what was negotiated.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The ingress server config of one generation of TLS material.
pub(super) struct IngressTls {
    generation: u64,
    config: Arc<rustls::ServerConfig>,
}

/// The ingress server config for the credentials published now: a new
/// config (so new session caches: no ticket issued under the old material
/// resumes under the new) for every rotation.
pub(super) fn ingress_tls(ctx: &ProxyContext) -> Result<IngressTls, ProxyError> {
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
pub(super) struct Inner {
    pub(super) ctx: ProxyContext,
    pub(super) tls: ArcSwap<IngressTls>,
    pub(super) routes: RouteCache,
    pub(super) stats: Arc<IngressStats>,
}

impl Inner {
    pub(super) fn tuning(&self) -> &ProxyTuning {
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

/// One accepted connection, from the TLS handshake to the end of its
/// forwarding. Long on purpose: it is the gate's checks in the order they
/// must run (handshake, identity, peer, SNI, route, the export's consent),
/// each ending in its own counted refusal, then the dispatch by protocol;
/// read top to bottom, the order is the security argument. The stream
/// moves through it once, and the boxing of the steps that hold it is
/// sized for this one future.
pub(super) async fn handle(tcp: TcpStream, inner: &Arc<Inner>) {
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
    // Any workload of the peer's mesh holds a certificate of its trust
    // domain; only the peer's listed identities (by default its gateway)
    // may reach our exports on its behalf.
    if !peer.config.allows(&peer_id) {
        let detail = format!(
            "peer identity {peer_id} may not speak for peer {peer_name} (not in peers[].identities)"
        );
        return refuse(inner, Refusal::IdentityNotAllowed, &detail, Some(tls)).await;
    }

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
