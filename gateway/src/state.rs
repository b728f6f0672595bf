//! State shared between the rooms of a running gateway. Each piece has one
//! writer: the config reloader writes `exports`, each peer's consumer task
//! writes its own `consumer` view, the merger writes `imports`. Readers
//! (owner sessions, admin, later dns/proxy) get immutable snapshots through
//! `watch` channels and never hold a lock across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use elsinore_certs::TrustDomain;
use elsinore_federation_api::FederatedService;
use tokio::sync::{Notify, watch};

use crate::catalog::ExportCatalog;
use crate::catalog::imports::ImportsView;
use crate::config::Peer;
use crate::dns::vip::{TablePlan, VipAllocator, VipTable};

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
}

impl Shared {
    pub fn peer(&self, name: &str) -> Option<&Arc<PeerState>> {
        self.peers.iter().find(|p| p.config.name == name)
    }

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

/// Consumer-side view of one peer, published after every batch of changes.
#[derive(Debug, Clone, Default)]
pub struct ConsumerView {
    /// `idle` (no federation address), `connecting`, `syncing`, `synced`,
    /// `disconnected`, `failed`.
    pub state: &'static str,
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
}

impl OwnerCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Builds the shared state for a validated config.
pub fn new_shared(mesh: String, exports: ExportCatalog, peers: &[Peer]) -> Arc<Shared> {
    let peers: Vec<Arc<PeerState>> = peers
        .iter()
        .map(|p| {
            let initial = ConsumerView {
                state: if p.federation.is_some() {
                    "connecting"
                } else {
                    "idle"
                },
                attempted: p.federation.is_none(),
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
    })
}

/// Rebuilds the merged imports view whenever a consumer reports a change or
/// the local exports change (local names win over imported ones).
pub async fn run_merger(
    shared: Arc<Shared>,
    plan: TablePlan,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut exports = shared.exports.subscribe();
    let mut vips = VipAllocator::with_plan(plan);
    loop {
        let view = merge(&shared);
        let table = vips.update(&view);
        shared.imports.send_replace(Arc::new(view));
        shared.vips.send_replace(Arc::new(table));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.imports_changed.notified() => {}
            changed = exports.changed() => if changed.is_err() { return },
        }
        // Coalesce bursts: a snapshot of thousands of entries rebuilds a few times, not thousands.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The new merged view. Entries that did not change are shared with the
/// published one rather than rebuilt: during a snapshot of 100,000 entries
/// the old and new views are alive together, and copies of both would be
/// the gateway's peak memory.
fn merge(shared: &Shared) -> ImportsView {
    let local = shared.exports.borrow().fqdns();
    let peers: Vec<(String, Vec<Arc<FederatedService>>)> = shared
        .peers
        .iter()
        .map(|p| (p.config.name.clone(), p.consumer.borrow().services.clone()))
        .collect();
    let previous = shared.imports.borrow().clone();
    crate::catalog::imports::resolve_reusing(&local, &peers, &previous)
}

/// Convenience for admin: the consumer views by peer name.
pub fn consumer_views(shared: &Shared) -> BTreeMap<String, Arc<ConsumerView>> {
    shared
        .peers
        .iter()
        .map(|p| (p.config.name.clone(), p.consumer.borrow().clone()))
        .collect()
}
