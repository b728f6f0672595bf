//! Virtual IPs for imported services. Every imported service gets one IPv4
//! address from the configured range, stable for as long as the import
//! exists: the first choice is a hash of the registered FQDN (so a restart
//! usually hands out the same address), collisions probe linearly, and an
//! address is reused only after its import is withdrawn. The DNS responder
//! answers imported names with these addresses and the egress listens on
//! them, so two imported services on the same port never collide.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use crate::catalog::{ImportsView, Resolved};
use crate::config::VipRange;

/// One imported service reachable at a VIP.
#[derive(Debug, Clone)]
pub struct VipEntry {
    pub vip: Ipv4Addr,
    /// The name it is registered under in this mesh (may be an alias).
    pub fqdn: String,
    /// The port local apps call: the instance's `PORT` metadata, else the
    /// first endpoint's port.
    pub port: u16,
    /// Shared with the imports view it was built from.
    pub import: Arc<Resolved>,
    /// What the egress proxy derives from this entry on first use (TLS
    /// config, pool keys) and keeps for the entry's life; opaque here, as
    /// this room knows nothing of the proxy. An entry is replaced when its
    /// import changes, and the derived state with it.
    pub derived: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl PartialEq for VipEntry {
    /// Equal when they describe the same route (derived state aside).
    fn eq(&self, other: &Self) -> bool {
        self.vip == other.vip
            && self.fqdn == other.fqdn
            && self.port == other.port
            && self.import == other.import
    }
}

/// The VIP table published to DNS and egress, replaced whole on change.
/// Entries of an import that did not change are the same `Arc` from one
/// table to the next.
#[derive(Debug, Clone, Default)]
pub struct VipTable {
    by_fqdn: BTreeMap<Arc<str>, Arc<VipEntry>>,
    by_vip: HashMap<Ipv4Addr, Arc<VipEntry>>,
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
        e.import
            .service
            .instances
            .iter()
            .any(|i| i.id.eq_ignore_ascii_case(first))
            .then_some(e)
    }

    pub fn lookup_vip(&self, vip: Ipv4Addr) -> Option<&Arc<VipEntry>> {
        self.by_vip.get(&vip)
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

/// Hands out VIPs; owned by the one task that publishes the table.
#[derive(Debug)]
pub struct VipAllocator {
    range: VipRange,
    /// Registered name → its entry in the last table (which holds the VIP).
    assigned: HashMap<Arc<str>, Arc<VipEntry>>,
    /// The VIPs in `assigned`.
    used: HashSet<Ipv4Addr>,
}

impl VipAllocator {
    pub fn new(range: VipRange) -> Self {
        VipAllocator {
            range,
            assigned: HashMap::new(),
            used: HashSet::new(),
        }
    }

    /// The table for `view`: names still imported keep their VIPs, withdrawn
    /// names free theirs, new names get one. An import that finds the range
    /// full is left out and logged. An entry whose import is the same
    /// object as last time is reused, not rebuilt.
    pub fn update(&mut self, view: &ImportsView) -> VipTable {
        let used = &mut self.used;
        self.assigned.retain(|fqdn, entry| {
            let keep = view.by_fqdn.contains_key(fqdn);
            if !keep {
                used.remove(&entry.vip);
            }
            keep
        });
        let usable = self.range.size().saturating_sub(2).max(1);
        let mut table = VipTable {
            by_fqdn: BTreeMap::new(),
            by_vip: HashMap::with_capacity(view.by_fqdn.len()),
        };
        for (fqdn, import) in &view.by_fqdn {
            let entry = match self.assigned.get(fqdn) {
                Some(entry) if Arc::ptr_eq(&entry.import, import) => Arc::clone(entry),
                Some(entry) => {
                    let entry = new_entry(entry.vip, fqdn, import);
                    self.assigned.insert(Arc::clone(fqdn), Arc::clone(&entry));
                    entry
                }
                None => {
                    let start = fnv1a(fqdn.as_bytes()) % usable;
                    // Skip the network address (offset 0) and the broadcast-like last one.
                    let found = (0..usable)
                        .map(|i| self.range.nth(1 + (start + i) % usable))
                        .find(|ip| !self.used.contains(ip));
                    let Some(vip) = found else {
                        tracing::error!(%fqdn, range = %self.range, "VIP range exhausted; import not reachable through egress");
                        continue;
                    };
                    self.used.insert(vip);
                    let entry = new_entry(vip, fqdn, import);
                    self.assigned.insert(Arc::clone(fqdn), Arc::clone(&entry));
                    entry
                }
            };
            table.by_vip.insert(entry.vip, Arc::clone(&entry));
            table.by_fqdn.insert(Arc::clone(fqdn), entry);
        }
        table
    }
}

fn new_entry(vip: Ipv4Addr, fqdn: &str, import: &Arc<Resolved>) -> Arc<VipEntry> {
    Arc::new(VipEntry {
        vip,
        fqdn: fqdn.to_owned(),
        port: service_port(import),
        import: Arc::clone(import),
        derived: OnceLock::new(),
    })
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
    use elsinore_federation_api::{Endpoint, FederatedService, Instance, Protocol};
    use std::collections::BTreeSet;

    fn svc(name: &str, fqdn: &str, port: u16) -> Arc<FederatedService> {
        Arc::new(FederatedService {
            name: name.into(),
            description: String::new(),
            tags: vec![],
            labels: Default::default(),
            fqdn: fqdn.into(),
            endpoints: vec![Endpoint {
                address: "127.0.0.1".into(),
                port: 15443,
                labels: vec![],
                description: String::new(),
            }],
            sans: vec!["spiffe://a/x".into()],
            instances: vec![Instance {
                id: "gw".into(),
                protocol: Protocol::Http,
                metadata: [("PORT".to_owned(), port.to_string())]
                    .into_iter()
                    .collect(),
                endpoint_selector: vec![],
                description: String::new(),
            }],
        })
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
        assert!(alloc.used.is_empty() && alloc.assigned.is_empty());
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
}
