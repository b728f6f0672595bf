//! The egress side's counters: what admin's `/catalog` and `/metrics` and
//! the tests read. It owns the atomics and their snapshot, and the list of
//! import listeners wanted but not held; it counts, it decides nothing (the
//! listener, dial and HTTP stages bump these where things happen).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::proxy::error::{ProxyError, Side};

/// Counters of the egress side, read by admin and tests.
#[derive(Debug, Default)]
pub struct EgressStats {
    /// Client connections accepted and served (all listeners).
    pub connections: AtomicU64,
    /// Client connections closed at once because the listener was at `maxConnections`.
    pub refused_over_cap: AtomicU64,
    /// New TLS connections to remote gateways that completed the handshake.
    pub upstream_connects: AtomicU64,
    /// TLS handshakes to remote gateways that failed or timed out
    /// (including certificates that did not verify).
    pub upstream_handshake_failures: AtomicU64,
    /// HTTP requests received from local apps.
    pub requests: AtomicU64,
    pub errors_downstream: AtomicU64,
    pub errors_upstream: AtomicU64,
    pub errors_internal: AtomicU64,
    /// Import listeners (VIPs, or shared-mode ports) bound now.
    pub listeners: AtomicU64,
    /// Failed binds of import listeners (each retried with backoff).
    pub bind_failures: AtomicU64,
    /// The listener budget in force ([`crate::proxy::budget`]).
    pub listener_budget: AtomicU64,
    /// Listeners wanted but not held: beyond the budget, or failing to bind.
    /// Replaced whole on change; read by `/catalog`.
    pub unbound: Mutex<Arc<Vec<Unbound>>>,
}

/// An import listener egress wants but does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbound {
    /// The address apps would call.
    pub addr: SocketAddr,
    /// The import (VIP mode) or `port <n>` (shared mode).
    pub what: String,
    /// `budget` or `bind`.
    pub reason: &'static str,
    /// For `bind`: the last error.
    pub error: Option<String>,
}

impl EgressStats {
    /// The listeners wanted but not held, by reason.
    pub fn unbound(&self) -> Arc<Vec<Unbound>> {
        lock(&self.unbound).clone()
    }
}

/// A copy of [`EgressStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStatsSnapshot {
    pub connections: u64,
    pub refused_over_cap: u64,
    pub upstream_connects: u64,
    pub upstream_handshake_failures: u64,
    pub requests: u64,
    pub errors_downstream: u64,
    pub errors_upstream: u64,
    pub errors_internal: u64,
}

impl EgressStats {
    pub fn snapshot(&self) -> EgressStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EgressStatsSnapshot {
            connections: get(&self.connections),
            refused_over_cap: get(&self.refused_over_cap),
            upstream_connects: get(&self.upstream_connects),
            upstream_handshake_failures: get(&self.upstream_handshake_failures),
            requests: get(&self.requests),
            errors_downstream: get(&self.errors_downstream),
            errors_upstream: get(&self.errors_upstream),
            errors_internal: get(&self.errors_internal),
        }
    }

    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn error(&self, e: &ProxyError) {
        Self::bump(match e.side {
            Side::Downstream => &self.errors_downstream,
            Side::Upstream => &self.errors_upstream,
            Side::Internal => &self.errors_internal,
        });
    }
}
