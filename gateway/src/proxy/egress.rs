//! The egress side of the data plane: what local apps connect to. In VIP
//! mode every imported service gets a listener on its VIP and port; in
//! shared mode every distinct port gets one listener on the shared bind
//! address, routing HTTP by Host and TCP by port. Either way the listeners
//! are kept in step with the published table (bound when an import appears,
//! closed when it is withdrawn), within a budget of descriptors
//! ([`super::budget`]), with failed binds retried with backoff per address;
//! plus an optional catch-all HTTP listener that routes by Host.
//! A connection is mapped to its import, and traffic goes to one of the
//! owner's ingress endpoints over mTLS, presenting our identity, with the
//! instance's SNI, verifying that the owner's certificate chains to that
//! peer's bundle and carries one of the service's `sans`.
//!
//! Raw TCP (and TLS, MONGO, HTTPS, which we do not terminate) gets one mTLS
//! connection per client connection, spliced. HTTP, HTTP2 and gRPC are
//! served to the app as HTTP (1.1 or h2c) and each request is forwarded over
//! a pooled HTTP/2 connection ([`super::pool`]), so many requests share a few
//! TLS connections between the gateways.
//!
//! The stages live in `egress/`: `listener` (binding and accepting),
//! `routes` (where a connection or request goes), `dial` (mTLS to the
//! owner), `stream` (TCP splice), `http` (HTTP forwarding) and `stats`.
//! This file holds only what they share: [`run`], the `Egress` state and
//! the pool sizes it is built with; a stage's code does not belong here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use elsinore_transport::h1::server::BoxError;
use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use tokio::net::TcpListener;

use super::ProxyContext;
use super::pool::{H2Pool, PoolLimits};
use dial::TlsKey;

mod dial;
mod http;
mod listener;
mod routes;
mod stats;
mod stream;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use stats::{EgressStats, EgressStatsSnapshot, Unbound};

/// The body of every response egress gives to a local app.
type RespBody = BoxBody<Bytes, BoxError>;

use crate::config::defaults::{
    EGRESS_MAX_CONNS_PER_KEY as MAX_CONNS_PER_KEY, EGRESS_STREAMS_PER_CONN as STREAMS_PER_CONN,
};

/// Runs the egress until `ctx.shutdown`: keeps one listener per entry of
/// the VIP table (VIP mode) or per distinct port (shared mode), within the
/// listener budget, and serves `catch_all` (HTTP routed by Host) if given.
///
/// The listener budget is computed and published in `stats` when `run` is
/// called, before the returned future is first polled, so `/metrics` shows
/// it from the moment the gateway has started.
pub fn run(
    ctx: ProxyContext,
    catch_all: Option<TcpListener>,
    stats: Arc<EgressStats>,
) -> impl std::future::Future<Output = ()> {
    let budget = super::budget::listener_budget(ctx.tuning.vip_listener_budget);
    tracing::info!(budget = budget.listeners, source = %budget.source, "egress import listener budget");
    stats.listener_budget.store(
        u64::try_from(budget.listeners).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    listener::serve_imports(ctx, catch_all, stats, budget)
}

/// The state every stage shares, one per `run`: the stages add their
/// methods to it in their own files.
struct Egress {
    ctx: ProxyContext,
    stats: Arc<EgressStats>,
    /// The latest route table with egress's per-entry state, read
    /// lock-free per connection and per request.
    view: ArcSwap<routes::View>,
    /// Client configs built from one generation of TLS material: emptied
    /// when the credentials rotate, so the next dial presents (and
    /// verifies with) the new material, with a new session cache.
    tls: Mutex<(u64, HashMap<TlsKey, Arc<rustls::ClientConfig>>)>,
    pool: H2Pool,
    /// Connections served now (drain waits for them).
    open: super::Tracker,
    /// Round-robin position over a service's endpoints.
    next: AtomicUsize,
}

impl Egress {
    fn new(ctx: ProxyContext, stats: Arc<EgressStats>) -> Egress {
        let pool = H2Pool::new(PoolLimits {
            max_per_key: MAX_CONNS_PER_KEY,
            streams_per_conn: STREAMS_PER_CONN,
            idle_timeout: ctx.tuning.idle_timeout,
        });
        let view = ArcSwap::from_pointee(routes::View::new(ctx.shared.vips.borrow().clone()));
        Egress {
            view,
            ctx,
            stats,
            tls: Mutex::new((0, HashMap::new())),
            pool,
            open: super::Tracker::default(),
            next: AtomicUsize::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The cache is consistent after any panic (one insert or clear at a time).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
