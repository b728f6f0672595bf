//! The import listeners: one per imported VIP and port (VIP mode) or per
//! distinct port of the shared address (shared mode), kept in step with the
//! published VIP table within the descriptor budget, with failed binds
//! retried with backoff per address; the accept loops; and the hand-off of
//! each accepted connection to the stream or HTTP stage by the import's
//! mode. It must not read or answer a byte of a connection: what a
//! connection carries is the stages' business.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::routes::{self, Route};
use super::stats::{EgressStats, Unbound};
use super::{Egress, lock};
use crate::catalog::routes::{Mode, PortRoute, VipTable};
use crate::config::EgressMode;
use crate::proxy::ProxyContext;
use crate::proxy::budget::Budget;
use crate::proxy::error::ErrorKind;

use crate::config::defaults::{
    EGRESS_BIND_RETRY as BIND_RETRY, EGRESS_BIND_RETRY_MAX as BIND_RETRY_MAX,
};

pub(super) async fn serve_imports(
    ctx: ProxyContext,
    catch_all: Option<TcpListener>,
    stats: Arc<EgressStats>,
    budget: Budget,
) {
    let egress = Arc::new(Egress::new(ctx.clone(), stats));
    let catch_all = catch_all.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "egress catch-all HTTP listener serving");
        }
        Listener::spawn(&egress, listener, Route::CatchAll, &ctx.shutdown)
    });
    let mut vips = ctx.shared.vips.subscribe();
    let mut binder = Binder {
        budget: budget.listeners,
        listeners: HashMap::new(),
        retries: HashMap::new(),
        over_budget: 0,
    };
    loop {
        let table = vips.borrow_and_update().clone();
        let view = routes::View::next(table.clone(), Some(&egress.view.load()));
        egress.view.store(Arc::new(view));
        let next_retry = egress.reconcile(&table, &mut binder).await;
        let retry = async {
            match next_retry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            changed = vips.changed() => if changed.is_err() { break },
            // A port another process held may have been freed.
            _ = retry => {}
        }
    }
    for (_, listener) in binder.listeners.drain() {
        listener.stop().await;
    }
    if let Some(listener) = catch_all {
        listener.stop().await;
    }
    // Requests and streams in flight get `drain.timeout` to finish.
    let open = egress.open.count();
    if open > 0 {
        tracing::info!(open, "egress draining connections");
    }
    let drained = tokio::select! {
        () = egress.open.idle() => true,
        () = ctx.abort.cancelled() => false,
        () = tokio::time::sleep(ctx.drain_timeout) => false,
    };
    if !drained {
        tracing::warn!(
            open = egress.open.count(),
            "egress drain timed out; closing remaining connections"
        );
    }
}

/// The import listeners and what is known of those that failed to bind.
struct Binder {
    budget: usize,
    listeners: HashMap<SocketAddr, Listener>,
    /// Addresses whose bind failed: when to try again, and why.
    retries: HashMap<SocketAddr, BindRetry>,
    /// Wanted listeners beyond the budget at the last reconcile (logged on change).
    over_budget: usize,
}

struct BindRetry {
    failures: u32,
    at: tokio::time::Instant,
    error: String,
}

/// The delay after `failures` consecutive failed binds of one address.
pub(super) fn bind_backoff(failures: u32) -> Duration {
    BIND_RETRY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BIND_RETRY_MAX)
}

/// One running accept loop.
struct Listener {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Listener {
    fn spawn(
        egress: &Arc<Egress>,
        listener: TcpListener,
        route: Route,
        shutdown: &CancellationToken,
    ) -> Listener {
        let cancel = shutdown.child_token();
        let task = tokio::spawn(egress.clone().accept_loop(listener, route, cancel.clone()));
        Listener { cancel, task }
    }

    /// Stops accepting and waits until the socket is closed, so a connect
    /// right after is refused. Connections already accepted carry on.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

impl Egress {
    /// The listeners `table` asks for, in priority order (the budget is
    /// spent in this order): VIP mode, each import with a port by FQDN;
    /// shared mode, each port ascending.
    fn wanted(&self, table: &VipTable) -> Vec<(SocketAddr, Route, String)> {
        match &self.ctx.tuning.mode {
            EgressMode::Vip => table
                .iter()
                .filter(|e| e.port != 0)
                .map(|e| {
                    let addr = SocketAddrV4::new(e.vip, e.port);
                    (SocketAddr::V4(addr), Route::Vip(addr), e.fqdn.clone())
                })
                .collect(),
            EgressMode::Shared { bind, .. } => table
                .ports()
                .into_iter()
                .map(|port| {
                    (
                        SocketAddr::new(*bind, port),
                        Route::Port(port),
                        format!("port {port}"),
                    )
                })
                .collect(),
        }
    }

    /// Brings the listeners in line with `table`, within the budget.
    /// Returns when a failed bind is next due for a retry, if any.
    ///
    /// Long (about 100 lines) because it is one pass that must stay in
    /// order: close what is no longer wanted, bind what is due, then
    /// publish the unbound list from the same view of the table.
    async fn reconcile(
        self: &Arc<Self>,
        table: &VipTable,
        b: &mut Binder,
    ) -> Option<tokio::time::Instant> {
        let mut wanted = self.wanted(table);
        let beyond = wanted.split_off(wanted.len().min(b.budget));
        let keys: HashSet<SocketAddr> = wanted.iter().map(|(a, _, _)| *a).collect();
        let gone: Vec<SocketAddr> = b
            .listeners
            .keys()
            .filter(|a| !keys.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(listener) = b.listeners.remove(&addr) {
                listener.stop().await;
                tracing::info!(%addr, "egress import listener closed: no longer wanted");
            }
        }
        b.retries.retain(|a, _| keys.contains(a));
        let now = tokio::time::Instant::now();
        for (addr, route, what) in &wanted {
            if b.listeners.contains_key(addr) {
                continue;
            }
            if b.retries.get(addr).is_some_and(|r| r.at > now) {
                continue;
            }
            match bind_import_listener(*addr) {
                Ok(l) => {
                    b.retries.remove(addr);
                    tracing::info!(%addr, import = %what, "egress import listener bound");
                    b.listeners
                        .insert(*addr, Listener::spawn(self, l, *route, &self.ctx.shutdown));
                }
                Err(error) => {
                    EgressStats::bump(&self.stats.bind_failures);
                    let failures = b.retries.get(addr).map_or(0, |r| r.failures) + 1;
                    let delay = bind_backoff(failures);
                    let error = error.to_string();
                    // The first failure is worth a warning; the rest of the
                    // backoff is quiet unless the reason changes.
                    let changed = b.retries.get(addr).is_none_or(|r| r.error != error);
                    if changed {
                        tracing::warn!(%addr, import = %what, %error, retry_in = ?delay, "cannot bind egress import listener; retrying with backoff");
                    } else {
                        tracing::debug!(%addr, import = %what, %error, failures, retry_in = ?delay, "egress import listener still cannot bind");
                    }
                    b.retries.insert(
                        *addr,
                        BindRetry {
                            failures,
                            at: now + delay,
                            error,
                        },
                    );
                }
            }
        }
        if beyond.len() != b.over_budget {
            if beyond.is_empty() {
                tracing::info!(
                    budget = b.budget,
                    "every egress import listener fits the budget again"
                );
            } else {
                tracing::error!(budget = b.budget, beyond = beyond.len(), first = %beyond[0].2, "egress import listeners beyond the budget are not bound (raise the open-file limit or proxy.vipListenerBudget, or use proxy.mode: shared)");
            }
            b.over_budget = beyond.len();
        }
        let mut unbound: Vec<Unbound> = wanted
            .iter()
            .filter_map(|(addr, _, what)| {
                let r = b.retries.get(addr)?;
                Some(Unbound {
                    addr: *addr,
                    what: what.clone(),
                    reason: "bind",
                    error: Some(r.error.clone()),
                })
            })
            .collect();
        unbound.extend(beyond.into_iter().map(|(addr, _, what)| Unbound {
            addr,
            what,
            reason: "budget",
            error: None,
        }));
        let stats = &self.stats;
        stats
            .listeners
            .store(b.listeners.len() as u64, Ordering::Relaxed);
        let mut current = lock(&stats.unbound);
        if **current != unbound {
            *current = Arc::new(unbound);
        }
        drop(current);
        b.retries.values().map(|r| r.at).min()
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        route: Route,
        cancel: CancellationToken,
    ) {
        use elsinore_transport::accept;
        // The cap is per listener, as `proxy.maxConnections` says; the drain
        // waits on `self.open`, which spans every egress listener.
        let connections = accept::Connections::new(self.ctx.tuning.max_connections);
        let cap = connections.cap();
        let stats = Arc::clone(&self.stats);
        let hooks = accept::Hooks::default().on_refused(move |client| {
            EgressStats::bump(&stats.refused_over_cap);
            tracing::debug!(client.addr = %client, max_connections = cap, "egress listener at its connection cap; closing");
        });
        let settings = accept::Settings::new("egress");
        accept::serve(
            listener,
            settings,
            connections,
            cancel,
            hooks,
            |tcp, client, permit| {
                EgressStats::bump(&self.stats.connections);
                let _ = tcp.set_nodelay(true);
                self.clone().connection(tcp, client, route, permit);
            },
        )
        .await;
    }

    /// Starts the task of one accepted connection. An HTTP connection's
    /// task is the HTTP/1.1 loop itself, with no span or wrapper around it:
    /// thousands of them sit idle in keep-alive, and every byte of their
    /// state counts. Its events name the client and service themselves.
    fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        client: SocketAddr,
        route: Route,
        permit: elsinore_transport::accept::Permit,
    ) {
        let entry = match route {
            Route::CatchAll => None,
            Route::Port(port) => match self.view.load().table.port_route(port) {
                Some(PortRoute::Stream(entry)) => Some(entry.clone()),
                Some(PortRoute::Http(_)) => None,
                None => {
                    tracing::debug!(client.addr = %client, port, "connection to a port no longer imported; closing");
                    return;
                }
            },
            Route::Vip(addr) => {
                let Some(entry) = self.view.load().lookup_vip(addr) else {
                    tracing::debug!(client.addr = %client, %addr, "connection to a VIP no longer imported; closing");
                    return;
                };
                Some(entry)
            }
        };
        match entry {
            Some(entry) if entry.mode == Mode::Stream => {
                let span = tracing::info_span!("egress", client.addr = %client, service = %entry.fqdn, peer = %entry.import.peer);
                let open = self.open.enter();
                tokio::spawn(
                    async move {
                        let _open = open;
                        // Boxed: the TLS dial and splice state stay out of
                        // the task's own allocation until they are needed.
                        match Box::pin(self.serve_stream(&entry, tcp)).await {
                            Ok(()) => {}
                            Err(e) if e.kind == ErrorKind::IdleTimeout => {
                                tracing::debug!(error = %e, "connection closed");
                            }
                            Err(e) => {
                                self.stats.error(&e);
                                tracing::warn!(error = %e, side = %e.side, "egress connection failed");
                            }
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            _ => {
                let open = self.open.enter();
                tokio::spawn(async move {
                    let _open = open;
                    self.serve_http(tcp, client, route, permit).await;
                });
            }
        }
    }
}

/// Binds an import listener with `IP_FREEBIND`, so an address of a
/// routable VIP range (or a shared address) can be bound before, or
/// without, being configured on an interface: traffic for it arrives once
/// the host routes it locally (see docs/data-plane.md, "AnyIP").
pub(super) fn bind_import_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
