//! The export catalog: every `exports` entry of the config turned into the
//! [`FederatedService`] peers receive, plus who may see it. Built once per
//! config (re)load and replaced whole; it never changes in place.
//!
//! Each export is published with exactly one instance whose `SNI` is the
//! export's FQDN. An export has exactly one port, so the FQDN alone names the
//! (service, port) pair our ingress must route to, and a consumer needs no
//! further convention to build the server name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use elsinore_certs::SpiffeId;
use elsinore_federation_api::{Endpoint, FederatedService, Instance, Protocol, StringMap};

use crate::config::{Config, HostPort};

/// The label key carrying the owning mesh's name on every exported service.
const MESH_LABEL: &str = "elsinore.io/mesh";

/// One exported service: what peers are sent, and what only we need to know
/// (who may see it, where its backends are).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedService {
    /// Shared with every owner session that sends it, so a snapshot of the
    /// catalog costs one clone of an `Arc` per service.
    pub service: Arc<FederatedService>,
    /// Peer names (from config) allowed to see and reach this service.
    pub peers: BTreeSet<String>,
    pub backends: Vec<HostPort>,
    pub protocol: Protocol,
    /// The port consumers call.
    pub port: u16,
}

impl ExportedService {
    /// Whether `peer` may see (and reach) this service.
    pub fn is_visible_to(&self, peer: &str) -> bool {
        self.peers.contains(peer)
    }
}

/// Every exported service of this gateway, keyed by export name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportCatalog {
    services: BTreeMap<String, ExportedService>,
}

impl ExportCatalog {
    /// Builds the catalog from a validated config. `gateway_id` is the SPIFFE
    /// ID in our gateway certificate; consumers require it as the SAN of
    /// whoever answers on the advertised endpoint.
    pub fn from_config(cfg: &Config, gateway_id: &SpiffeId) -> ExportCatalog {
        let mesh = &cfg.mesh.name;
        let sans = vec![gateway_id.to_string()];
        let endpoint = Endpoint {
            address: cfg.advertise.address.clone(),
            port: cfg.advertise.port,
            labels: Vec::new(),
            description: String::new(),
        };
        let services = cfg
            .exports
            .iter()
            .map(|export| {
                let service = FederatedService {
                    name: export.name.clone(),
                    description: String::new(),
                    tags: Vec::new(),
                    labels: StringMap::from([(MESH_LABEL.to_owned(), mesh.clone())]),
                    fqdn: export.fqdn.clone(),
                    endpoints: vec![endpoint.clone()],
                    sans: sans.clone(),
                    instances: vec![Instance {
                        id: mesh.clone(),
                        protocol: export.protocol,
                        metadata: StringMap::from([
                            ("SNI".to_owned(), export.fqdn.clone()),
                            ("PORT".to_owned(), export.port.to_string()),
                        ]),
                        endpoint_selector: Vec::new(),
                        description: String::new(),
                    }],
                };
                let exported = ExportedService {
                    service: Arc::new(service),
                    peers: export.peers.iter().cloned().collect(),
                    backends: export.backends.clone(),
                    protocol: export.protocol,
                    port: export.port,
                };
                (export.name.clone(), exported)
            })
            .collect();
        ExportCatalog { services }
    }

    /// The services `peer` may see, keyed by service name: exactly what an
    /// owner session for that peer snapshots and diffs against.
    pub fn visible_to(&self, peer: &str) -> BTreeMap<String, Arc<FederatedService>> {
        self.services
            .iter()
            .filter(|(_, e)| e.is_visible_to(peer))
            .map(|(name, e)| (name.clone(), Arc::clone(&e.service)))
            .collect()
    }

    /// All exports in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &ExportedService)> {
        self.services.iter()
    }

    /// An export by its name.
    pub fn get(&self, name: &str) -> Option<&ExportedService> {
        self.services.get(name)
    }

    /// An export by its FQDN (= the SNI our ingress receives), compared
    /// case-insensitively with any trailing dot ignored.
    #[cfg(test)]
    pub fn get_by_fqdn(&self, fqdn: &str) -> Option<&ExportedService> {
        let wanted = fqdn.strip_suffix('.').unwrap_or(fqdn);
        self.services
            .values()
            .find(|e| e.service.fqdn.eq_ignore_ascii_case(wanted))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The FQDNs of all exports, lower-cased: the names imports may never
    /// take (see `imports::resolve`).
    pub fn fqdns(&self) -> BTreeSet<String> {
        self.services
            .values()
            .map(|e| e.service.fqdn.to_ascii_lowercase())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{
        Advertise, ApiVersion, Export, FederationTuning, IdentityFiles, Imports, Listeners, Mesh,
        Peer,
    };

    fn peer(name: &str) -> Peer {
        let trust_domain = format!("{name}.example").parse().unwrap();
        Peer {
            identities: crate::config::PeerIdentities::gateway_of(&trust_domain),
            follow_trust_bundle: false,
            name: name.to_owned(),
            trust_domain,
            trust_bundle: format!("certs/{name}/ca.pem").into(),
            federation: None,
            api_version: ApiVersion::V1alpha2,
            dial: crate::config::DialMode::Consumer,
            allowed_names: vec!["global".to_owned()],
            limits: crate::config::PeerLimits::default(),
        }
    }

    fn export(name: &str, protocol: Protocol, port: u16, peers: &[&str]) -> Export {
        Export {
            name: name.to_owned(),
            fqdn: format!("{name}.mesh-a.global"),
            protocol,
            port,
            backends: vec![HostPort {
                host: format!("{name}.default.svc.cluster.local"),
                port,
            }],
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    pub(crate) fn config() -> Config {
        Config {
            mesh: Mesh {
                name: "mesh-a".to_owned(),
                trust_domain: "mesh-a.example".parse().unwrap(),
            },
            identity: IdentityFiles {
                certificate: "gw.pem".into(),
                private_key: "gw.key".into(),
                trust_bundle: None,
            },
            listeners: Listeners {
                federation: "127.0.0.1:8008".parse().unwrap(),
                admin: "127.0.0.1:15000".parse().unwrap(),
                ingress: None,
                egress: None,
                dns: None,
            },
            advertise: Advertise {
                address: "gw.mesh-a.example".to_owned(),
                port: 15443,
            },
            exports: vec![
                export("reviews", Protocol::Http, 9080, &["mesh-b"]),
                export("ratings", Protocol::Grpc, 9090, &["mesh-b", "mesh-c"]),
                export("db", Protocol::Tcp, 5432, &[]),
            ],
            peers: vec![peer("mesh-b"), peer("mesh-c")],
            imports: Imports {
                stale_after: Duration::from_secs(300),
                cache_dir: None,
                port_overrides: Default::default(),
            },
            federation: FederationTuning {
                window: 256,
                ack_timeout: Duration::from_secs(30),
                snapshot_quiet_period: Duration::from_secs(2),
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(30),
            },
            proxy: crate::config::ProxyTuning::default(),
            drain: crate::config::Drain::default(),
        }
    }

    fn gateway_id() -> SpiffeId {
        SpiffeId::gateway("mesh-a.example".parse().unwrap())
    }

    #[test]
    fn each_export_becomes_a_federated_service() {
        let catalog = ExportCatalog::from_config(&config(), &gateway_id());
        assert_eq!(catalog.len(), 3);
        assert!(!catalog.is_empty());

        let reviews = catalog.get("reviews").unwrap();
        assert_eq!(reviews.protocol, Protocol::Http);
        assert_eq!(reviews.port, 9080);
        assert_eq!(
            reviews.backends,
            vec![HostPort {
                host: "reviews.default.svc.cluster.local".to_owned(),
                port: 9080
            }]
        );
        let expected = FederatedService {
            name: "reviews".to_owned(),
            description: String::new(),
            tags: vec![],
            labels: StringMap::from([("elsinore.io/mesh".to_owned(), "mesh-a".to_owned())]),
            fqdn: "reviews.mesh-a.global".to_owned(),
            endpoints: vec![Endpoint {
                address: "gw.mesh-a.example".to_owned(),
                port: 15443,
                labels: vec![],
                description: String::new(),
            }],
            sans: vec!["spiffe://mesh-a.example/ns/elsinore/sa/gateway".to_owned()],
            instances: vec![Instance {
                id: "mesh-a".to_owned(),
                protocol: Protocol::Http,
                metadata: StringMap::from([
                    ("SNI".to_owned(), "reviews.mesh-a.global".to_owned()),
                    ("PORT".to_owned(), "9080".to_owned()),
                ]),
                endpoint_selector: vec![],
                description: String::new(),
            }],
        };
        assert_eq!(*reviews.service, expected);
        assert_eq!(
            catalog.get("ratings").unwrap().service.instances[0].protocol,
            Protocol::Grpc
        );
        assert!(catalog.get("nope").is_none());
    }

    #[test]
    fn visible_to_filters_by_peer() {
        let catalog = ExportCatalog::from_config(&config(), &gateway_id());
        let b: Vec<_> = catalog.visible_to("mesh-b").into_keys().collect();
        assert_eq!(b, ["ratings", "reviews"]);
        let c: Vec<_> = catalog.visible_to("mesh-c").into_keys().collect();
        assert_eq!(c, ["ratings"]);
        assert!(catalog.visible_to("mesh-z").is_empty());
        // Same Arc as the catalog holds: sessions share, not copy.
        let shared = &catalog.visible_to("mesh-c")["ratings"];
        assert!(Arc::ptr_eq(
            shared,
            &catalog.get("ratings").unwrap().service
        ));
    }

    #[test]
    fn fqdns_and_lookup_by_fqdn() {
        let mut cfg = config();
        cfg.exports[2].fqdn = "DB.Mesh-A.Global".to_owned();
        let catalog = ExportCatalog::from_config(&cfg, &gateway_id());
        let fqdns: Vec<_> = catalog.fqdns().into_iter().collect();
        assert_eq!(
            fqdns,
            [
                "db.mesh-a.global",
                "ratings.mesh-a.global",
                "reviews.mesh-a.global"
            ]
        );
        assert_eq!(
            catalog.get_by_fqdn("REVIEWS.mesh-a.global.").unwrap().port,
            9080
        );
        assert_eq!(catalog.get_by_fqdn("db.mesh-a.global").unwrap().port, 5432);
        assert!(catalog.get_by_fqdn("reviews.mesh-b.global").is_none());
        let names: Vec<_> = catalog.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["db", "ratings", "reviews"]);
    }
}
