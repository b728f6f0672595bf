//! What the admin API (`/peers`, `/catalog`, `/ready`) and the metrics show
//! of each peer's federation: the consumer's view, published whole by that
//! peer's consumer task after every batch of changes, and the owner's
//! counters, bumped by the owner sessions. Plain data: this room decides
//! nothing and talks to no peer; the federation tasks write it and the
//! readers never wait on them.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use elsinore_federation_api::FederatedService;

/// Where the consumer side of one peer stands. Shown in `/peers` and
/// `/catalog` by its lower-case name, the one [`ConsumerState::as_str`]
/// gives (`Display` and serde both write that).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsumerState {
    /// The peer has no federation address: we only serve it.
    #[default]
    Idle,
    Connecting,
    Syncing,
    Synced,
    Disconnected,
    Failed,
    /// The gateway is shutting down.
    Stopped,
}

impl ConsumerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Idle => "idle",
            ConsumerState::Connecting => "connecting",
            ConsumerState::Syncing => "syncing",
            ConsumerState::Synced => "synced",
            ConsumerState::Disconnected => "disconnected",
            ConsumerState::Failed => "failed",
            ConsumerState::Stopped => "stopped",
        }
    }
}

impl serde::Serialize for ConsumerState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for ConsumerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consumer-side view of one peer, published after every batch of changes.
#[derive(Debug, Clone, Default)]
pub struct ConsumerView {
    pub state: ConsumerState,
    pub detail: Option<String>,
    /// True once the first sync completed or failed: readiness.
    pub attempted: bool,
    pub connected: bool,
    pub snapshot_complete: bool,
    pub messages: u64,
    pub acks: u64,
    pub nacks: u64,
    pub reconnects: u64,
    pub last_ack_at: Option<SystemTime>,
    /// When the last stream whose snapshot was complete ended (`None`
    /// while it never did): how stale the imports are.
    pub synced_until: Option<SystemTime>,
    pub last_nack: Option<(String, String)>,
    pub services: Vec<Arc<FederatedService>>,
    /// Entries refused by a claim rule (names, limits), by rule.
    pub refused: std::collections::BTreeMap<crate::catalog::claims::Rule, u64>,
    /// The entries refused lately, oldest first (bounded, one per name).
    pub refusals: Vec<crate::federation::consumer::session::RefusalRecord>,
}

/// Owner-side counters for one peer (atomics: updated per message, read by admin).
#[derive(Debug, Default)]
pub struct OwnerCounters {
    pub streams_open: AtomicU64,
    pub streams_total: AtomicU64,
    pub sent: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub unknown_nonces: AtomicU64,
    /// Last NACK received: (service name, message). Touched only on NACK.
    pub last_nack: Mutex<Option<(String, String)>>,
    /// The window of the last stream opened (either direction): 1 with a
    /// foreign peer, what was negotiated with another Elsinore.
    pub window: AtomicU64,
}

impl OwnerCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Why a federation stream was refused before any catalog moved (a bounded
/// metric label, like the ingress's refusal reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefusal {
    /// The verified certificate carries no usable SPIFFE ID.
    NoPeerIdentity,
    /// The SPIFFE ID's trust domain is not a configured peer.
    UnknownPeer,
    /// The trust domain is a peer's, but the ID is not in its `identities`.
    IdentityNotAllowed,
}

impl StreamRefusal {
    pub const ALL: [StreamRefusal; 3] = [
        StreamRefusal::NoPeerIdentity,
        StreamRefusal::UnknownPeer,
        StreamRefusal::IdentityNotAllowed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StreamRefusal::NoPeerIdentity => "no_peer_identity",
            StreamRefusal::UnknownPeer => "unknown_peer",
            StreamRefusal::IdentityNotAllowed => "identity_not_allowed",
        }
    }
}

/// Federation streams refused, by reason (the owner side bumps them).
#[derive(Debug, Default)]
pub struct StreamRefusals {
    counts: [AtomicU64; StreamRefusal::ALL.len()],
}

impl StreamRefusals {
    pub fn bump(&self, reason: StreamRefusal) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: StreamRefusal) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count, for /metrics.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        StreamRefusal::ALL.iter().map(|r| (r.label(), self.get(*r)))
    }
}
