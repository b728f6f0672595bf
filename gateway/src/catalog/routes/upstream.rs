//! What egress needs to carry an import's traffic, worked out once when an
//! entry of the route table is built rather than on every request: how the
//! traffic is carried ([`Mode`]), the owner's endpoints with the SNI each is
//! reached by, and who the far side must prove to be ([`RemoteIdentity`]).
//! The keys built here are what the egress pool and its TLS config cache
//! are keyed by, so two imports that need the same connection share it and
//! two that need different checks never do.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use elsinore_certs::SpiffeId;
use elsinore_federation_api::{Endpoint, Instance, Protocol};

use crate::catalog::Resolved;

/// How a service's traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Terminated as HTTP and multiplexed over pooled HTTP/2 (HTTP, HTTP2,
    /// gRPC: also routable by Host on a shared port).
    Http,
    /// Spliced over one mTLS connection per client connection (TCP and the
    /// TLS-like protocols egress does not terminate).
    Stream,
}

impl Mode {
    fn of(protocol: Protocol) -> Mode {
        if protocol.is_http() {
            Mode::Http
        } else {
            Mode::Stream
        }
    }
}

/// Who the owner's ingress must prove to be: a certificate that chains to
/// `peer`'s trust bundle and carries one of `ids`, the SPIFFE IDs among the
/// service's `sans`. Equal (and hashed) by peer and SANs as imported.
#[derive(Debug)]
pub struct RemoteIdentity {
    pub peer: String,
    pub sans: Vec<String>,
    /// The SANs that parse as SPIFFE IDs; the others are ignored (and
    /// logged when the entry is built). Empty means no connection may be
    /// made: any certificate of the trust domain is not what `sans` promises.
    pub ids: Vec<SpiffeId>,
}

impl RemoteIdentity {
    pub fn new(peer: &str, sans: &[String], service: &str) -> RemoteIdentity {
        let ids = sans
            .iter()
            .filter_map(|san| match san.parse::<SpiffeId>() {
                Ok(id) => Some(id),
                Err(error) => {
                    tracing::debug!(%san, %error, %service, "ignoring a SAN that is not a SPIFFE ID");
                    None
                }
            })
            .collect();
        RemoteIdentity {
            peer: peer.to_owned(),
            sans: sans.to_vec(),
            ids,
        }
    }
}

impl PartialEq for RemoteIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.peer == other.peer && self.sans == other.sans
    }
}

impl Eq for RemoteIdentity {}

impl Hash for RemoteIdentity {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.peer.hash(state);
        self.sans.hash(state);
    }
}

/// What a pooled egress connection is for. Two services behind the same
/// remote endpoint and SNI share connections; different expected identities
/// never do, because a connection is only as trusted as the check made when
/// it opened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    /// The remote gateway endpoint, `address:port` as imported.
    pub endpoint: String,
    /// The server name presented at the owner's ingress.
    pub sni: String,
    pub remote: Arc<RemoteIdentity>,
}

/// One endpoint of the owner that an import's traffic may go to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub endpoint: Endpoint,
    pub key: UpstreamKey,
}

/// The mode of `import` (its first instance's: the port is taken from the
/// instances in the same order) and every (instance, endpoint) pair of its
/// instances in that mode, as upstreams.
pub(super) fn upstreams(
    import: &Resolved,
    fqdn: &str,
) -> (Mode, Arc<RemoteIdentity>, Vec<Upstream>) {
    let svc = &import.service;
    let mode = svc
        .instances
        .first()
        .map_or(Mode::Stream, |i| Mode::of(i.protocol));
    let remote = Arc::new(RemoteIdentity::new(&import.peer, &svc.sans, fqdn));
    let upstreams = svc
        .instances
        .iter()
        .filter(|i| Mode::of(i.protocol) == mode)
        .flat_map(|i| svc.endpoints_for(i).into_iter().map(move |e| (i, e)))
        .map(|(instance, endpoint)| Upstream {
            endpoint: endpoint.clone(),
            key: UpstreamKey {
                endpoint: format!("{}:{}", endpoint.address, endpoint.port),
                sni: sni_for(instance, import).to_owned(),
                remote: Arc::clone(&remote),
            },
        })
        .collect();
    (mode, remote, upstreams)
}

/// The SNI the owner's ingress routes on: the instance's `SNI` metadata,
/// else the FQDN the owner gave the service.
fn sni_for<'a>(instance: &'a Instance, import: &'a Resolved) -> &'a str {
    instance
        .sni()
        .filter(|s| !s.is_empty())
        .unwrap_or(&import.original_fqdn)
}

#[cfg(test)]
mod tests {
    use elsinore_federation_api::FederatedService;

    use super::*;

    fn endpoint(address: &str, label: &str) -> Endpoint {
        Endpoint {
            address: address.into(),
            port: 15443,
            labels: vec![label.into()],
            description: String::new(),
        }
    }

    fn instance(id: &str, protocol: Protocol, selector: &[&str], sni: Option<&str>) -> Instance {
        Instance {
            id: id.into(),
            protocol,
            metadata: sni
                .map(|s| ("SNI".to_owned(), s.to_owned()))
                .into_iter()
                .collect(),
            endpoint_selector: selector.iter().map(|s| (*s).to_owned()).collect(),
            description: String::new(),
        }
    }

    /// The first instance sets the mode; only instances in that mode give
    /// upstreams, each over the endpoints its selector picks, with its SNI
    /// or else the owner's own FQDN (not the name registered here).
    #[test]
    fn upstreams_follow_mode_selectors_and_sni() {
        let service = FederatedService {
            name: "db".into(),
            description: String::new(),
            tags: vec![],
            labels: Default::default(),
            fqdn: "db.mesh-a.global".into(),
            endpoints: vec![endpoint("10.0.0.1", "east"), endpoint("10.0.0.2", "west")],
            sans: vec![
                "spiffe://mesh-a.example/ns/elsinore/sa/gateway".into(),
                "not a spiffe id".into(),
            ],
            instances: vec![
                instance("east", Protocol::Http, &["east"], Some("db.east.sni")),
                instance("raw", Protocol::Tcp, &[], None),
                instance("any", Protocol::Grpc, &[], None),
            ],
        };
        let import = Resolved {
            peer: "mesh-a".into(),
            name: "db".into(),
            original_fqdn: "db.mesh-a.global".into(),
            alias: true,
            service: Arc::new(service),
        };
        let (mode, remote, upstreams) = upstreams(&import, "db.mesh-a-2.global");
        assert_eq!(mode, Mode::Http);
        let got: Vec<(&str, &str)> = upstreams
            .iter()
            .map(|u| (u.key.endpoint.as_str(), u.key.sni.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:15443", "db.east.sni"),
                ("10.0.0.1:15443", "db.mesh-a.global"),
                ("10.0.0.2:15443", "db.mesh-a.global"),
            ]
        );
        assert_eq!(
            remote.ids.len(),
            1,
            "the SAN that is no SPIFFE ID is dropped"
        );
        assert!(
            upstreams
                .iter()
                .all(|u| Arc::ptr_eq(&u.key.remote, &remote))
        );
        // Keys (and TLS configs) are shared by content, not by entry.
        let again = RemoteIdentity::new("mesh-a", &import.service.sans, "x");
        assert_eq!(*remote, again);
        assert_ne!(
            *remote,
            RemoteIdentity::new("mesh-b", &import.service.sans, "x")
        );
    }
}
