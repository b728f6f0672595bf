//! The ingress's counters: why connections were refused ([`Refusal`]) and
//! what the authorized ones carried ([`IngressStats`]). The admin server
//! and /metrics read them; the listener's stages only bump them. Relaxed
//! atomics and nothing else: no locks, no logging, no decisions here.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// The SPIFFE ID is in a peer's trust domain but not one of that
    /// peer's `identities`.
    IdentityNotAllowed,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Overloaded,
        Refusal::HandshakeFailed,
        Refusal::HandshakeTimeout,
        Refusal::NoPeerIdentity,
        Refusal::UnknownPeer,
        Refusal::NoSni,
        Refusal::UnknownSni,
        Refusal::Unauthorized,
        Refusal::IdentityNotAllowed,
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
            Refusal::IdentityNotAllowed => "identity_not_allowed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one ingress listener. Created by the caller of
/// [`serve`](super::serve) so the admin server can read them; all relaxed
/// atomics.
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
}

impl IngressStats {
    #[cfg(test)]
    pub(super) fn new() -> std::sync::Arc<IngressStats> {
        std::sync::Arc::new(IngressStats::default())
    }

    /// Connections refused for `reason` so far.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Every refusal reason with its count, for /metrics.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|r| (r.label(), self.refused(*r)))
    }

    pub(super) fn refuse(&self, reason: Refusal) {
        bump(&self.refused[reason.index()]);
    }
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
