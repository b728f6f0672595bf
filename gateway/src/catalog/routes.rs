//! The route table of imported services: one immutable snapshot, computed
//! from the imports view whenever it changes, of which address and name
//! reach which import, and (in [`upstream`]) which owner endpoints, SNI,
//! pool keys and expected identity egress uses for it. DNS answers from it;
//! egress listens and routes from it.
//!
//! In VIP mode (the default) every imported service gets one IPv4 address
//! from the configured range and egress listens on each (VIP, port), so two
//! imports on the same port never collide. In shared mode every imported
//! name is answered with one configured address (or a CNAME) and egress has
//! one listener per distinct port: HTTP-like imports on a port are told
//! apart by Host, a TCP import needs the port to itself.
//!
//! The table is a pure function of the imports view and the plan (range,
//! mode, port overrides): two replicas that hold the same catalog answer
//! every name with the same address and route it the same way, whatever
//! order the catalog arrived in. A VIP's first choice is a hash of the
//! registered FQDN; names that hash to taken slots probe linearly, in the
//! total order (first choice, FQDN), so an address only moves when a name
//! that sorts before it in the same probe run appears or goes.

mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

pub use upstream::{Mode, RemoteIdentity, Upstream, UpstreamKey};

use crate::catalog::{ImportsView, Resolved};
use crate::config::{Config, EgressMode, SharedAnswer, VipRange};

/// One imported service reachable at a VIP (or at the shared address).
#[derive(Debug, Clone)]
pub struct VipEntry {
    /// Its own VIP; in shared mode the shared address (unspecified when
    /// DNS answers with a CNAME).
    pub vip: Ipv4Addr,
    /// The name it is registered under in this mesh (may be an alias).
    pub fqdn: String,
    /// The port local apps call: `imports.portOverrides` for its name, else
    /// the instance's `PORT` metadata, else the first endpoint's port.
    pub port: u16,
    /// Shared with the imports view it was built from.
    pub import: Arc<Resolved>,
    /// How egress carries it: the first instance's protocol decides.
    pub mode: Mode,
    /// Who the owner's ingress must prove to be.
    pub remote: Arc<RemoteIdentity>,
    /// The owner's endpoints for the instances in `mode`, each with its SNI
    /// and pool key, in the order egress tries them.
    pub upstreams: Vec<Upstream>,
}

impl PartialEq for VipEntry {
    /// Equal when they describe the same route (what is derived from the
    /// import aside: it follows from it).
    fn eq(&self, other: &Self) -> bool {
        self.vip == other.vip
            && self.fqdn == other.fqdn
            && self.port == other.port
            && self.import == other.import
    }
}

impl VipEntry {
    /// The protocol named in reports: the first instance's.
    pub fn protocol(&self) -> &'static str {
        self.import
            .service
            .instances
            .first()
            .map_or("TCP", |i| i.protocol.as_str())
    }
}

/// What the table is built from besides the imports: the mode and its
/// parameters and the port overrides. Fixed for a gateway's life.
#[derive(Debug, Clone, PartialEq)]
pub struct TablePlan {
    pub range: VipRange,
    /// `None` in VIP mode; else what DNS answers for every name.
    pub shared: Option<SharedAnswer>,
    /// Registered FQDN → the port apps call it on.
    pub port_overrides: BTreeMap<String, u16>,
}

impl TablePlan {
    /// VIP mode over `range`, no overrides.
    pub fn vips(range: VipRange) -> Self {
        TablePlan {
            range,
            shared: None,
            port_overrides: BTreeMap::new(),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        TablePlan {
            range: config.proxy.vip_range,
            shared: match &config.proxy.mode {
                EgressMode::Vip => None,
                EgressMode::Shared { answer, .. } => Some(answer.clone()),
            },
            port_overrides: config.imports.port_overrides.clone(),
        }
    }
}

/// How one port of the shared address is routed.
#[derive(Debug, Clone)]
pub enum PortRoute {
    /// HTTP-like imports, by registered name (lower case).
    Http(HashMap<Arc<str>, Arc<VipEntry>>),
    /// The one TCP (or TLS-like) import that holds the port.
    Stream(Arc<VipEntry>),
}

/// A shared-mode import left without a route because another holds its
/// port. Its name is not answered in DNS (an app must never reach the
/// holder believing it reached this one) until the collision is resolved,
/// e.g. by `imports.portOverrides`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortCollision {
    pub fqdn: Arc<str>,
    pub peer: String,
    pub protocol: &'static str,
    pub port: u16,
    /// Who holds the port: a TCP import's FQDN, or HTTP imports.
    pub holder: String,
}

impl std::fmt::Display for PortCollision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} import {} of peer {} wants port {} which {} holds; not answered in DNS until moved with imports.portOverrides",
            self.protocol, self.fqdn, self.peer, self.port, self.holder
        )
    }
}

/// The table published to DNS and egress, replaced whole on change.
/// Entries of an import that did not change are the same `Arc` from one
/// table to the next.
#[derive(Debug, Clone, Default)]
pub struct VipTable {
    by_fqdn: BTreeMap<Arc<str>, Arc<VipEntry>>,
    /// VIP mode only.
    by_vip: HashMap<Ipv4Addr, Arc<VipEntry>>,
    /// Shared mode: what DNS answers. `None` in VIP mode.
    shared: Option<SharedAnswer>,
    /// Shared mode only: the routes of each port.
    by_port: HashMap<u16, PortRoute>,
    /// Shared mode: imports that lost their port (sorted by port, FQDN).
    port_collisions: Vec<PortCollision>,
    /// VIP mode: imports left without an address because the range is full.
    unassigned: Vec<Arc<str>>,
}

impl VipTable {
    /// The entry for an imported name: its registered FQDN or
    /// `<instance id>.<fqdn>` (case-insensitive, trailing dot ignored).
    pub fn lookup_name(&self, name: &str) -> Option<&Arc<VipEntry>> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(e) = self.by_fqdn.get(key.as_str()) {
            return Some(e);
        }
        let (first, rest) = key.split_once('.')?;
        let e = self.by_fqdn.get(rest)?;
        has_instance(e, first).then_some(e)
    }

    pub fn lookup_vip(&self, vip: Ipv4Addr) -> Option<&Arc<VipEntry>> {
        self.by_vip.get(&vip)
    }

    /// Shared mode: how `port` is routed.
    pub fn port_route(&self, port: u16) -> Option<&PortRoute> {
        self.by_port.get(&port)
    }

    /// Shared mode: the HTTP import on `port` that `host` (a registered
    /// name or `<instance>.<name>`, any case, trailing dot allowed) names.
    /// One hash lookup when the name is already lower case.
    pub fn lookup_http(&self, port: u16, host: &str) -> Option<&Arc<VipEntry>> {
        let Some(PortRoute::Http(names)) = self.by_port.get(&port) else {
            return None;
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let lowered;
        let key = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if let Some(e) = names.get(key) {
            return Some(e);
        }
        let (first, rest) = key.split_once('.')?;
        let e = names.get(rest)?;
        has_instance(e, first).then_some(e)
    }

    /// The ports shared mode listens on, ascending.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    /// Shared mode: what DNS answers for every name; `None` in VIP mode
    /// (each entry's own VIP).
    pub fn shared_answer(&self) -> Option<&SharedAnswer> {
        self.shared.as_ref()
    }

    pub fn port_collisions(&self) -> &[PortCollision] {
        &self.port_collisions
    }

    /// VIP mode: registered names without an address (range full).
    pub fn unassigned(&self) -> &[Arc<str>] {
        &self.unassigned
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<VipEntry>> {
        self.by_fqdn.values()
    }

    pub fn len(&self) -> usize {
        self.by_fqdn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fqdn.is_empty()
    }
}

fn has_instance(e: &VipEntry, id: &str) -> bool {
    e.import
        .service
        .instances
        .iter()
        .any(|i| i.id.eq_ignore_ascii_case(id))
}

/// Builds tables; owned by the one task that publishes them. It keeps the
/// last table's entries only to share unchanged ones (so what egress keeps
/// per entry survives a republish) and to log what changed: the result never depends on history.
#[derive(Debug)]
pub struct VipAllocator {
    plan: TablePlan,
    /// Registered name → its entry in the last table.
    assigned: HashMap<Arc<str>, Arc<VipEntry>>,
    last_collisions: Vec<PortCollision>,
    last_unassigned: usize,
}

impl VipAllocator {
    /// VIP mode over `range`.
    pub fn new(range: VipRange) -> Self {
        Self::with_plan(TablePlan::vips(range))
    }

    pub fn with_plan(plan: TablePlan) -> Self {
        VipAllocator {
            plan,
            assigned: HashMap::new(),
            last_collisions: Vec::new(),
            last_unassigned: 0,
        }
    }

    /// The table for `view`. An entry whose import, address and port are
    /// the same as last time is reused, not rebuilt. Collisions and a full
    /// range are logged once per change.
    pub fn update(&mut self, view: &ImportsView) -> VipTable {
        let table = build(&self.plan, view, &self.assigned);
        self.assigned = table
            .by_fqdn
            .iter()
            .map(|(k, e)| (Arc::clone(k), Arc::clone(e)))
            .collect();
        for c in &table.port_collisions {
            if !self.last_collisions.contains(c) {
                tracing::error!(fqdn = %c.fqdn, peer = %c.peer, port = c.port, holder = %c.holder, "egress port collision: {c}");
            }
        }
        for c in &self.last_collisions {
            if !table.port_collisions.iter().any(|n| n.fqdn == c.fqdn) {
                tracing::info!(fqdn = %c.fqdn, port = c.port, "egress port collision resolved");
            }
        }
        self.last_collisions = table.port_collisions.clone();
        if table.unassigned.len() != self.last_unassigned {
            if table.unassigned.is_empty() {
                tracing::info!(range = %self.plan.range, "every import has a VIP again");
            } else {
                tracing::error!(range = %self.plan.range, unassigned = table.unassigned.len(), first = %table.unassigned[0], "VIP range exhausted; these imports are not reachable through egress");
            }
            self.last_unassigned = table.unassigned.len();
        }
        table
    }
}

/// A registered name with its entry.
type Named = (Arc<str>, Arc<VipEntry>);

/// The pure table function (see the module docs). `previous` only lends
/// entries that come out identical.
/// Long because it is one pure pass over the imports that has to decide
/// addresses, shared-mode port collisions and reuse of the previous
/// table's entries together, so the result is the same on every replica.
fn build(
    plan: &TablePlan,
    view: &ImportsView,
    previous: &HashMap<Arc<str>, Arc<VipEntry>>,
) -> VipTable {
    let entry_for = |fqdn: &Arc<str>, import: &Arc<Resolved>, vip: Ipv4Addr| -> Arc<VipEntry> {
        let port = plan
            .port_overrides
            .get(&**fqdn)
            .copied()
            .unwrap_or_else(|| service_port(import));
        match previous.get(fqdn) {
            Some(e) if Arc::ptr_eq(&e.import, import) && e.vip == vip && e.port == port => {
                Arc::clone(e)
            }
            _ => {
                let (mode, remote, upstreams) = upstream::upstreams(import, fqdn);
                Arc::new(VipEntry {
                    vip,
                    fqdn: fqdn.to_string(),
                    port,
                    import: Arc::clone(import),
                    mode,
                    remote,
                    upstreams,
                })
            }
        }
    };
    let mut table = VipTable {
        shared: plan.shared.clone(),
        ..VipTable::default()
    };
    match &plan.shared {
        None => {
            let (assigned, unassigned) = assign_vips(plan.range, view.by_fqdn.keys());
            table.by_vip.reserve(assigned.len());
            for (fqdn, import) in &view.by_fqdn {
                let Some(&vip) = assigned.get(fqdn) else {
                    continue;
                };
                let entry = entry_for(fqdn, import, vip);
                table.by_vip.insert(vip, Arc::clone(&entry));
                table.by_fqdn.insert(Arc::clone(fqdn), entry);
            }
            table.unassigned = unassigned;
        }
        Some(answer) => {
            let vip = match answer {
                SharedAnswer::Address(ip) => *ip,
                SharedAnswer::Cname(_) => Ipv4Addr::UNSPECIFIED,
            };
            // Group by port; BTreeMap iteration keeps FQDN order within a port.
            let mut by_port: BTreeMap<u16, Vec<Named>> = BTreeMap::new();
            for (fqdn, import) in &view.by_fqdn {
                let entry = entry_for(fqdn, import, vip);
                by_port
                    .entry(entry.port)
                    .or_default()
                    .push((Arc::clone(fqdn), entry));
            }
            for (port, claimants) in by_port {
                if port == 0 {
                    // No port to listen on; still answered (the catch-all
                    // HTTP listener routes by Host).
                    table.by_fqdn.extend(claimants);
                    continue;
                }
                let (http, stream): (Vec<_>, Vec<_>) = claimants
                    .into_iter()
                    .partition(|(_, e)| e.mode == Mode::Http);
                // HTTP imports share a port, so they hold it against TCP;
                // among TCP imports the smallest FQDN holds it.
                let (route, holder, losers) = if http.is_empty() {
                    let mut stream = stream.into_iter();
                    let Some((fqdn, winner)) = stream.next() else {
                        continue;
                    };
                    table.by_fqdn.insert(fqdn, Arc::clone(&winner));
                    let holder = format!("TCP import {}", winner.fqdn);
                    (
                        PortRoute::Stream(winner),
                        holder,
                        stream.collect::<Vec<_>>(),
                    )
                } else {
                    let holder = format!("{} HTTP import(s)", http.len());
                    let mut names = HashMap::with_capacity(http.len());
                    for (fqdn, entry) in http {
                        names.insert(Arc::clone(&fqdn), Arc::clone(&entry));
                        table.by_fqdn.insert(fqdn, entry);
                    }
                    (PortRoute::Http(names), holder, stream)
                };
                table.by_port.insert(port, route);
                for (fqdn, entry) in losers {
                    table.port_collisions.push(PortCollision {
                        fqdn,
                        peer: entry.import.peer.clone(),
                        protocol: entry.protocol(),
                        port,
                        holder: holder.clone(),
                    });
                }
            }
        }
    }
    table
}

/// Assigns a VIP to each name, as a function of the set of names alone:
/// slot = hash(name) mod usable, then in (slot, name) order each takes the
/// first free slot from its own on (wrapping). Offsets 0 and the last of
/// the range (network and broadcast-like) are never used. Names beyond the
/// range's capacity (the last in that order) get none.
fn assign_vips<'a>(
    range: VipRange,
    names: impl Iterator<Item = &'a Arc<str>>,
) -> (HashMap<Arc<str>, Ipv4Addr>, Vec<Arc<str>>) {
    let usable = range.size().saturating_sub(2).max(1);
    let mut order: Vec<(u64, &Arc<str>)> =
        names.map(|n| (fnv1a(n.as_bytes()) % usable, n)).collect();
    order.sort_unstable();
    let mut assigned = HashMap::with_capacity(order.len().min(usable as usize));
    // Slots of names that did not wrap past the end: ascending, since the
    // probe position only grows.
    let mut taken: Vec<u64> = Vec::new();
    let mut last: Option<u64> = None;
    let mut unassigned = Vec::new();
    for (start, name) in order {
        if assigned.len() as u64 >= usable {
            unassigned.push(Arc::clone(name));
            continue;
        }
        // Every position in [start, last] is taken (one probe run), so the
        // probe resumes after `last`. Positions past the end wrap to low
        // slots, which may hold names that did not wrap; there is a free
        // one before wrapping twice, as fewer names than slots are placed.
        let mut pos = match last {
            Some(l) if l >= start => l + 1,
            _ => start,
        };
        while pos >= usable && taken.binary_search(&(pos - usable)).is_ok() {
            pos += 1;
        }
        if pos < usable {
            taken.push(pos);
        }
        last = Some(pos);
        assigned.insert(Arc::clone(name), range.nth(1 + pos % usable));
    }
    (assigned, unassigned)
}

fn service_port(import: &Resolved) -> u16 {
    import
        .service
        .instances
        .iter()
        .find_map(|i| i.port())
        .or_else(|| import.service.endpoints.first().map(|e| e.port))
        .unwrap_or(0)
}

/// FNV-1a: a small, stable hash (std's hasher is randomized per process).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::catalog::imports::{resolve, resolve_reusing};
    use elsinore_federation_api::{FederatedService, Protocol};
    use std::collections::{BTreeSet, HashSet};

    fn svc(name: &str, fqdn: &str, port: u16) -> Arc<FederatedService> {
        crate::catalog::fixtures::service_on(name, fqdn, "gw", port)
    }

    fn view(services: Vec<Arc<FederatedService>>) -> ImportsView {
        resolve(&BTreeSet::new(), &[("mesh-a".to_owned(), services)])
    }

    #[test]
    fn allocates_distinct_stable_vips_in_range() {
        let range: VipRange = "127.77.0.0/16".parse().unwrap();
        let mut alloc = VipAllocator::new(range);
        let t1 = alloc.update(&view(vec![
            svc("a", "a.m.global", 80),
            svc("b", "b.m.global", 80),
        ]));
        let a = t1.lookup_name("a.m.global").unwrap().vip;
        let b = t1.lookup_name("B.M.GLOBAL.").unwrap().vip;
        assert_ne!(a, b);
        assert!(range.contains(a) && range.contains(b));
        assert_eq!(t1.lookup_name("gw.a.m.global").unwrap().vip, a);
        assert_eq!(t1.lookup_name("a.m.global").unwrap().port, 80);
        // b withdrawn, c added: a keeps its VIP.
        let t2 = alloc.update(&view(vec![
            svc("a", "a.m.global", 80),
            svc("c", "c.m.global", 81),
        ]));
        assert_eq!(t2.lookup_name("a.m.global").unwrap().vip, a);
        assert!(t2.lookup_name("b.m.global").is_none());
        assert!(t2.lookup_vip(b).is_none() || t2.lookup_vip(b).unwrap().fqdn == "c.m.global");
        // A fresh allocator (a restart) gives the same first choice.
        let mut again = VipAllocator::new(range);
        let t3 = again.update(&view(vec![svc("a", "a.m.global", 80)]));
        assert_eq!(t3.lookup_name("a.m.global").unwrap().vip, a);
    }

    /// A republished table shares the entries of unchanged imports and
    /// rebuilds (at the same VIP) those whose import changed.
    #[test]
    fn unchanged_imports_keep_their_entries() {
        let range: VipRange = "127.77.0.0/16".parse().unwrap();
        let mut alloc = VipAllocator::new(range);
        let a = svc("a", "a.m.global", 80);
        let b = svc("b", "b.m.global", 80);
        let v1 = view(vec![a.clone(), b]);
        let t1 = alloc.update(&v1);
        let v2 = resolve_reusing(
            &BTreeSet::new(),
            &[("mesh-a".to_owned(), vec![a, svc("b", "b.m.global", 81)])],
            &v1,
        );
        let t2 = alloc.update(&v2);
        let (a1, a2) = (
            t1.lookup_name("a.m.global").unwrap(),
            t2.lookup_name("a.m.global").unwrap(),
        );
        assert!(Arc::ptr_eq(a1, a2));
        let (b1, b2) = (
            t1.lookup_name("b.m.global").unwrap(),
            t2.lookup_name("b.m.global").unwrap(),
        );
        assert!(!Arc::ptr_eq(b1, b2));
        assert_eq!(b1.vip, b2.vip);
        assert_eq!((b1.port, b2.port), (80, 81));
        assert!(Arc::ptr_eq(
            &t2.lookup_vip(b2.vip).unwrap().import,
            &v2.by_fqdn["b.m.global"]
        ));
        // A withdrawn name frees its VIP for the next newcomer's probe.
        let t3 = alloc.update(&ImportsView::default());
        assert!(t3.is_empty());
        assert!(alloc.assigned.is_empty());
    }

    #[test]
    fn full_range_leaves_imports_out_without_panicking() {
        let range: VipRange = "127.77.0.0/30".parse().unwrap();
        let mut alloc = VipAllocator::new(range);
        let services = (0..5)
            .map(|i| svc(&format!("s{i}"), &format!("s{i}.m.global"), 80))
            .collect();
        let t = alloc.update(&view(services));
        assert_eq!(t.len(), 2, "a /30 has two usable addresses");
        let vips: HashSet<_> = t.iter().map(|e| e.vip).collect();
        assert_eq!(vips.len(), 2);
    }

    fn svc_proto(fqdn: &str, port: u16, protocol: Protocol) -> Arc<FederatedService> {
        let mut s = (*svc(fqdn.split('.').next().unwrap(), fqdn, port)).clone();
        s.instances[0].protocol = protocol;
        Arc::new(s)
    }

    /// Two peers' catalogs resolved the way the merger does.
    fn view2(a: Vec<Arc<FederatedService>>, b: Vec<Arc<FederatedService>>) -> ImportsView {
        resolve(
            &BTreeSet::new(),
            &[("mesh-a".to_owned(), a), ("mesh-c".to_owned(), b)],
        )
    }

    fn summary(t: &VipTable) -> Vec<(String, Ipv4Addr, u16)> {
        t.iter().map(|e| (e.fqdn.clone(), e.vip, e.port)).collect()
    }

    /// A tiny deterministic shuffle (no RNG dependency in unit tests).
    fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
        let mut v = items.to_vec();
        let mut x = seed | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    /// Replicas that receive the same catalog in
    /// different orders (one service at a time, in different sequences,
    /// with some withdrawn and re-added on the way) end with the same
    /// table. A /24 with 200 names makes hash collisions certain, so a
    /// first-come allocation would disagree.
    #[test]
    fn replicas_agree_whatever_the_arrival_order() {
        let range: VipRange = "10.231.99.0/24".parse().unwrap();
        let services: Vec<_> = (0..200)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("s{i}.m.global"),
                    8000 + (i % 3) as u16,
                )
            })
            .collect();
        let mut finals = Vec::new();
        for seed in [1u64, 7, 12345, 999_999] {
            let mut alloc = VipAllocator::new(range);
            let order = shuffled(&services, seed);
            let mut have = Vec::new();
            for (k, s) in order.iter().enumerate() {
                have.push(s.clone());
                // Every 50th step, one earlier arrival is withdrawn for a while.
                if k % 50 == 49 {
                    let gone = have.remove(k / 3);
                    alloc.update(&view(have.clone()));
                    have.push(gone);
                }
                alloc.update(&view(have.clone()));
            }
            let t = alloc.update(&view(have));
            assert_eq!(t.len(), 200);
            let distinct: HashSet<_> = t.iter().map(|e| e.vip).collect();
            assert_eq!(distinct.len(), 200, "every name has its own VIP");
            finals.push(summary(&t));
        }
        // And a fresh replica that got it all at once.
        finals.push(summary(&VipAllocator::new(range).update(&view(services))));
        for f in &finals[1..] {
            assert_eq!(f, &finals[0]);
        }
    }

    /// Shared mode: one answer for every name, one route per port; HTTP
    /// imports share a port by Host, a TCP import needs it alone.
    #[test]
    fn shared_mode_routes_by_port_and_host() {
        let plan = TablePlan {
            range: "127.77.0.0/16".parse().unwrap(),
            shared: Some(SharedAnswer::Address(Ipv4Addr::new(10, 96, 0, 53))),
            port_overrides: BTreeMap::new(),
        };
        let mut alloc = VipAllocator::with_plan(plan);
        let t = alloc.update(&view(vec![
            svc_proto("web.m.global", 80, Protocol::Http),
            svc_proto("api.m.global", 80, Protocol::Grpc),
            svc_proto("db.m.global", 5432, Protocol::Tcp),
        ]));
        assert_eq!(t.ports(), vec![80, 5432]);
        for name in ["web.m.global", "api.m.global", "db.m.global"] {
            assert_eq!(
                t.lookup_name(name).unwrap().vip,
                Ipv4Addr::new(10, 96, 0, 53)
            );
        }
        assert_eq!(
            t.lookup_http(80, "WEB.m.global.").unwrap().fqdn,
            "web.m.global"
        );
        assert_eq!(
            t.lookup_http(80, "gw.api.m.global").unwrap().fqdn,
            "api.m.global"
        );
        assert!(t.lookup_http(80, "db.m.global").is_none());
        assert!(
            t.lookup_http(5432, "db.m.global").is_none(),
            "TCP is routed by port"
        );
        assert!(
            matches!(t.port_route(5432), Some(PortRoute::Stream(e)) if e.fqdn == "db.m.global")
        );
        assert!(t.lookup_vip(Ipv4Addr::new(10, 96, 0, 53)).is_none());
        assert!(t.port_collisions().is_empty());
    }

    /// Two TCP imports on one port: the smallest FQDN holds it, whatever
    /// order they came in; the other is reported and not answered (never
    /// routed to the holder). HTTP imports hold a port against TCP. An
    /// override moves the loser, and then both route.
    #[test]
    fn shared_mode_port_collisions_are_deterministic_and_movable() {
        let plan = |overrides: &[(&str, u16)]| TablePlan {
            range: "127.77.0.0/16".parse().unwrap(),
            shared: Some(SharedAnswer::Cname(
                "egress.elsinore.svc.cluster.local".into(),
            )),
            port_overrides: overrides
                .iter()
                .map(|(f, p)| ((*f).to_owned(), *p))
                .collect(),
        };
        let pg_a = svc_proto("pg.mesh-a.global", 5432, Protocol::Tcp);
        let pg_c = svc_proto("pg.mesh-c.global", 5432, Protocol::Tcp);
        let web = svc_proto("web.mesh-a.global", 80, Protocol::Http);
        let raw80 = svc_proto("raw.mesh-c.global", 80, Protocol::Tcp);
        let views = [
            view2(
                vec![pg_a.clone(), web.clone()],
                vec![pg_c.clone(), raw80.clone()],
            ),
            // The other arrival order: the later peer's services first.
            view2(vec![], vec![raw80.clone(), pg_c.clone()]),
        ];
        let mut first = VipAllocator::with_plan(plan(&[]));
        let t1 = first.update(&views[0]);
        let mut second = VipAllocator::with_plan(plan(&[]));
        second.update(&views[1]);
        let t2 = second.update(&views[0]);
        for t in [&t1, &t2] {
            assert!(
                matches!(t.port_route(5432), Some(PortRoute::Stream(e)) if e.fqdn == "pg.mesh-a.global")
            );
            let lost: Vec<(&str, u16)> = t
                .port_collisions()
                .iter()
                .map(|c| (&*c.fqdn, c.port))
                .collect();
            assert_eq!(
                lost,
                vec![("raw.mesh-c.global", 80), ("pg.mesh-c.global", 5432)]
            );
            assert!(
                t.lookup_name("pg.mesh-c.global").is_none(),
                "a loser is not answered"
            );
            assert!(t.lookup_name("raw.mesh-c.global").is_none());
            assert!(t.lookup_http(80, "web.mesh-a.global").is_some());
            assert_eq!(t.port_collisions()[1].holder, "TCP import pg.mesh-a.global");
        }
        assert_eq!(summary(&t1), summary(&t2));
        // Moving the loser to 15432 (names are matched lower case).
        let mut moved = VipAllocator::with_plan(plan(&[("pg.mesh-c.global", 15432)]));
        let t3 = moved.update(&views[0]);
        assert!(
            matches!(t3.port_route(15432), Some(PortRoute::Stream(e)) if e.fqdn == "pg.mesh-c.global")
        );
        assert!(
            matches!(t3.port_route(5432), Some(PortRoute::Stream(e)) if e.fqdn == "pg.mesh-a.global")
        );
        assert_eq!(
            t3.port_collisions().len(),
            1,
            "raw on 80 still loses to HTTP"
        );
        assert_eq!(t3.lookup_name("pg.mesh-c.global").unwrap().port, 15432);
        assert_eq!(
            t3.shared_answer(),
            Some(&SharedAnswer::Cname(
                "egress.elsinore.svc.cluster.local".into()
            ))
        );
    }

    /// Issue 15: 100,000 imports in shared mode need one listener per
    /// distinct port, not per import; the table builds in bounded time and
    /// routes by one hash lookup. Also measures VIP mode over a /8.
    #[test]
    fn hundred_thousand_imports() {
        const N: usize = 100_000;
        let services: Vec<_> = (0..N)
            .map(|i| {
                let proto = if i % 1000 == 0 {
                    Protocol::Tcp
                } else {
                    Protocol::Http
                };
                // HTTP on 80/443/8080; TCP imports each on their own port.
                let port = if proto == Protocol::Tcp {
                    20_000 + (i / 1000) as u16
                } else {
                    [80, 443, 8080][i % 3]
                };
                svc_proto(&format!("svc-{i}.mesh-a.global"), port, proto)
            })
            .collect();
        let v = view(services);
        let rss = || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines().find(|l| l.starts_with("VmRSS")).and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .map(|n| n.parse::<u64>().unwrap())
                    })
                })
                .unwrap_or(0)
        };
        let before = rss();
        let started = std::time::Instant::now();
        let mut alloc = VipAllocator::with_plan(TablePlan {
            range: "127.77.0.0/16".parse().unwrap(),
            shared: Some(SharedAnswer::Address(Ipv4Addr::new(10, 96, 0, 53))),
            port_overrides: BTreeMap::new(),
        });
        let t = alloc.update(&v);
        let built = started.elapsed();
        let again = std::time::Instant::now();
        let t2 = alloc.update(&v);
        let rebuilt = again.elapsed();
        println!(
            "shared mode, {N} imports: table built in {built:?}, rebuilt (unchanged) in {rebuilt:?}, RSS +{} KiB, {} listeners",
            rss().saturating_sub(before),
            t.ports().len()
        );
        assert_eq!(t.len(), N);
        assert_eq!(t.ports().len(), 3 + 100, "one listener per distinct port");
        assert!(t.port_collisions().is_empty());
        assert_eq!(
            t.lookup_http(8080, "svc-99998.mesh-a.global").unwrap().fqdn,
            "svc-99998.mesh-a.global"
        );
        assert!(
            matches!(t2.port_route(20_099), Some(PortRoute::Stream(e)) if e.fqdn == "svc-99000.mesh-a.global")
        );
        let lookups = std::time::Instant::now();
        for i in (1..N).step_by(7) {
            let port = [80, 443, 8080][i % 3];
            let name = format!("svc-{i}.mesh-a.global");
            if i % 1000 != 0 {
                assert!(t.lookup_http(port, &name).is_some(), "{name}");
            }
        }
        println!(
            "shared mode: {} Host lookups in {:?}",
            N / 7,
            lookups.elapsed()
        );
        // VIP mode over a /8: every import its own address, still a pure function.
        let started = std::time::Instant::now();
        let tv = VipAllocator::new("10.0.0.0/8".parse().unwrap()).update(&v);
        println!(
            "VIP mode, {N} imports in a /8: table built in {:?}",
            started.elapsed()
        );
        assert_eq!(tv.len(), N);
        let distinct: HashSet<_> = tv.iter().map(|e| e.vip).collect();
        assert_eq!(distinct.len(), N);
        // A /16 holds 65,534: the rest are reported, deterministically.
        let t16 = VipAllocator::new("127.77.0.0/16".parse().unwrap()).update(&v);
        assert_eq!(t16.len(), 65_534);
        assert_eq!(t16.unassigned().len(), N - 65_534);
    }
}
