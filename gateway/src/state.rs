//! The handles the rooms of a running gateway share, and nothing else: the
//! channels and counters are defined by the rooms that write them, and nothing
//! but their construction lives here. Each piece has one writer: the config
//! reloader writes `exports`, each peer's consumer task writes its own
//! `consumer` view, the runtime's merger task writes `imports` and `vips`.
//! Readers (owner sessions, admin, metrics, dns, the proxy) get immutable
//! snapshots through `watch` channels and never hold a lock across an
//! await.

use std::collections::HashMap;
use std::sync::Arc;

use elsinore_certs::TrustDomain;
use tokio::sync::{Notify, watch};

use crate::catalog::ExportCatalog;
use crate::catalog::imports::ImportsView;
use crate::catalog::routes::VipTable;
use crate::config::Peer;
use crate::federation::status::{ConsumerState, ConsumerView, OwnerCounters};

/// Everything the tasks of one gateway share.
pub struct Shared {
    pub mesh: String,
    pub exports: watch::Sender<Arc<ExportCatalog>>,
    pub imports: watch::Sender<Arc<ImportsView>>,
    /// VIPs of the imports, published by the merger right after `imports`.
    pub vips: watch::Sender<Arc<VipTable>>,
    /// Peers in config order (the order is the aliasing priority).
    pub peers: Vec<Arc<PeerState>>,
    pub peer_by_trust_domain: HashMap<TrustDomain, usize>,
    /// Poked by consumers whenever their imports change; the merger rebuilds `imports`.
    pub imports_changed: Notify,
    pub listeners_bound: std::sync::atomic::AtomicBool,
    /// Set on SIGTERM: `/ready` fails from then on (see `Gateway::drain`).
    pub draining: std::sync::atomic::AtomicBool,
    /// Certificate expiry and rotation counters, written by `credentials`.
    pub tls_status: Arc<crate::credentials::TlsStatus>,
    /// Request and handshake latency histograms (see `metrics`).
    pub latency: crate::metrics::Latency,
    /// Federation streams refused by the owner side, by reason.
    pub stream_refusals: crate::federation::status::StreamRefusals,
}

impl Shared {
    pub fn peer_for(&self, td: &TrustDomain) -> Option<&Arc<PeerState>> {
        self.peer_by_trust_domain
            .get(td)
            .and_then(|&i| self.peers.get(i))
    }
}

/// What we know of one peer, in both roles.
pub struct PeerState {
    pub config: Peer,
    /// Consumer side: written only by this peer's consumer task.
    pub consumer: watch::Sender<Arc<ConsumerView>>,
    /// Owner side: counters of the streams this peer opened to us.
    pub owner: OwnerCounters,
}

/// Builds the shared state for a validated config.
pub fn new_shared(mesh: String, exports: ExportCatalog, peers: &[Peer]) -> Arc<Shared> {
    let peers: Vec<Arc<PeerState>> = peers
        .iter()
        .map(|p| {
            // A peer whose owner dials us is imported from whether or not we
            // know its address, and readiness cannot wait for it to dial.
            let pushed = p.dial == crate::config::DialMode::Owner;
            let initial = ConsumerView {
                state: if p.federation.is_some() || pushed {
                    ConsumerState::Connecting
                } else {
                    ConsumerState::Idle
                },
                attempted: p.federation.is_none() || pushed,
                ..ConsumerView::default()
            };
            Arc::new(PeerState {
                config: p.clone(),
                consumer: watch::Sender::new(Arc::new(initial)),
                owner: OwnerCounters::default(),
            })
        })
        .collect();
    let peer_by_trust_domain = peers
        .iter()
        .enumerate()
        .map(|(i, p)| (p.config.trust_domain.clone(), i))
        .collect();
    Arc::new(Shared {
        mesh,
        exports: watch::Sender::new(Arc::new(exports)),
        imports: watch::Sender::new(Arc::new(ImportsView::default())),
        vips: watch::Sender::new(Arc::new(VipTable::default())),
        peers,
        peer_by_trust_domain,
        imports_changed: Notify::new(),
        listeners_bound: std::sync::atomic::AtomicBool::new(false),
        draining: std::sync::atomic::AtomicBool::new(false),
        tls_status: Arc::default(),
        latency: crate::metrics::Latency::default(),
        stream_refusals: Default::default(),
    })
}
