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
//! are stripped and replaced by
//! [`PEER_IDENTITY_HEADER`](super::PEER_IDENTITY_HEADER) carrying the
//! verified SPIFFE ID. Responses go out in HTTP/1.1 (or HTTP/2), whatever
//! version the backend answered in.
//!
//! The stages each have a room: `handshake` (TLS, identity, refusals,
//! dispatch), `routes` (the SNI table and upstreams), `http` and
//! `stream` (forwarding), `stats` (counters). This file holds only the
//! listener (it accepts, spawns a task per connection and drains) and the
//! types every stage shares; it must not route, check or forward itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use elsinore_transport::h2::body::RecvBody;
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{Instrument, field};

use super::ProxyContext;
use super::error::ProxyError;
use super::tls::TlsStream;
use handshake::{Inner, handle, ingress_tls};
use routes::RouteCache;
use stats::bump;

mod handshake;
mod http;
mod routes;
mod stats;
mod stream;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use stats::{IngressStats, Refusal};

/// A peer's mTLS connection, boxed (see `handshake::handle`).
type PeerStream = Box<TlsStream>;

/// A request body from a peer: hyper's (HTTP/1.1 peers) or an HTTP/2
/// stream's.
type PeerBody = Either<Incoming, RecvBody>;

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
