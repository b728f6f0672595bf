//! Catalog domain types: what a federated service *is*, independent of the
//! wire version that carried it. Parsed and validated once at the boundary.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The application protocol of a service instance (closed set from the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Https,
    Grpc,
    Http2,
    Mongo,
    Tcp,
    Tls,
    Mtls,
}

impl Protocol {
    pub const ALL: [Protocol; 8] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Grpc,
        Protocol::Http2,
        Protocol::Mongo,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Mtls,
    ];

    /// The spelling used on the wire and in config (upper case).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Grpc => "GRPC",
            Protocol::Http2 => "HTTP2",
            Protocol::Mongo => "MONGO",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Mtls => "MTLS",
        }
    }

    /// Whether the data plane proxies this protocol as HTTP (as opposed to splicing bytes).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol name that is not one of the spec's set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected one of HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP, TLS, MTLS)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    /// Case-insensitive: peers and operators are not consistent about case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownProtocol(s.to_owned()))
    }
}

/// Where the owner exposes a service (typically its ingress gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address or FQDN.
    pub address: String,
    pub port: u16,
    pub labels: Vec<String>,
    pub description: String,
}

/// One backing instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub protocol: Protocol,
    /// Reserved keys: `SNI`, `HOSTNAME`, `PORT`.
    pub metadata: BTreeMap<String, String>,
    pub endpoint_selector: Vec<String>,
    pub description: String,
}

impl Instance {
    /// Metadata key carrying the server name to present at the owner's ingress.
    pub const META_SNI: &'static str = "SNI";
    /// Metadata key carrying the instance's host name.
    pub const META_HOSTNAME: &'static str = "HOSTNAME";
    /// Metadata key carrying the instance's port.
    pub const META_PORT: &'static str = "PORT";

    /// The `SNI` metadata value, if set.
    pub fn sni(&self) -> Option<&str> {
        self.metadata.get(Self::META_SNI).map(String::as_str)
    }

    /// The `HOSTNAME` metadata value, if set.
    pub fn hostname(&self) -> Option<&str> {
        self.metadata.get(Self::META_HOSTNAME).map(String::as_str)
    }

    /// The `PORT` metadata value, if set and a port in 1..=65535 (validation
    /// guarantees that for any service accepted from a peer).
    pub fn port(&self) -> Option<u16> {
        self.metadata
            .get(Self::META_PORT)
            .and_then(|p| crate::validate::parse_port(p))
    }
}

/// A service one mesh exports to another. Always the full object, never a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedService {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub fqdn: String,
    pub endpoints: Vec<Endpoint>,
    pub sans: Vec<String>,
    pub instances: Vec<Instance>,
}

impl FederatedService {
    /// The endpoints `instance` goes with, per the spec's selector rule: every
    /// endpoint whose labels contain one of the instance's selectors; if no
    /// endpoint matches (or the instance has no selectors), all endpoints.
    pub fn endpoints_for(&self, instance: &Instance) -> Vec<&Endpoint> {
        let selected: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| {
                e.labels
                    .iter()
                    .any(|l| instance.endpoint_selector.contains(l))
            })
            .collect();
        if selected.is_empty() {
            self.endpoints.iter().collect()
        } else {
            selected
        }
    }

    /// The name a consumer registers `instance` under: `<instance id>.<fqdn>`.
    pub fn instance_fqdn(&self, instance: &Instance) -> String {
        format!("{}.{}", instance.id, self.fqdn)
    }
}

/// The Hamlet wire version a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiVersion {
    V1alpha2,
    V1alpha1,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1alpha2 => "v1alpha2",
            ApiVersion::V1alpha1 => "v1alpha1",
        }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, labels: &[&str]) -> Endpoint {
        Endpoint {
            address: address.into(),
            port: 443,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            description: String::new(),
        }
    }

    fn instance(selectors: &[&str]) -> Instance {
        Instance {
            id: "v1".into(),
            protocol: Protocol::Http,
            metadata: BTreeMap::new(),
            endpoint_selector: selectors.iter().map(|l| (*l).to_owned()).collect(),
            description: String::new(),
        }
    }

    fn service() -> FederatedService {
        FederatedService {
            name: "reviews".into(),
            description: String::new(),
            tags: vec![],
            labels: BTreeMap::new(),
            fqdn: "reviews.mesh-a.global".into(),
            endpoints: vec![
                endpoint("10.0.0.1", &["zone-a", "public"]),
                endpoint("10.0.0.2", &["zone-b"]),
                endpoint("10.0.0.3", &[]),
            ],
            sans: vec![],
            instances: vec![],
        }
    }

    fn addresses<'a>(eps: &[&'a Endpoint]) -> Vec<&'a str> {
        eps.iter().map(|e| e.address.as_str()).collect()
    }

    #[test]
    fn selector_picks_matching_endpoints() {
        let svc = service();
        assert_eq!(
            addresses(&svc.endpoints_for(&instance(&["zone-a"]))),
            ["10.0.0.1"]
        );
        assert_eq!(
            addresses(&svc.endpoints_for(&instance(&["zone-b", "public"]))),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn selector_matching_nothing_or_absent_means_all() {
        let svc = service();
        let all = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
        assert_eq!(addresses(&svc.endpoints_for(&instance(&["zone-c"]))), all);
        assert_eq!(addresses(&svc.endpoints_for(&instance(&[]))), all);
    }

    #[test]
    fn selector_matches_whole_labels_only() {
        let svc = service();
        // "zone" is a prefix of labels but not a label: no match, so all.
        assert_eq!(svc.endpoints_for(&instance(&["zone"])).len(), 3);
    }

    #[test]
    fn metadata_accessors_and_instance_fqdn() {
        let svc = service();
        let mut inst = instance(&[]);
        assert_eq!(inst.sni(), None);
        assert_eq!(inst.port(), None);
        inst.metadata
            .insert("SNI".into(), "reviews.internal".into());
        inst.metadata.insert("PORT".into(), "9080".into());
        inst.metadata.insert("HOSTNAME".into(), "reviews".into());
        assert_eq!(inst.sni(), Some("reviews.internal"));
        assert_eq!(inst.port(), Some(9080));
        assert_eq!(inst.hostname(), Some("reviews"));
        inst.metadata.insert("PORT".into(), "0".into());
        assert_eq!(inst.port(), None);
        assert_eq!(svc.instance_fqdn(&inst), "v1.reviews.mesh-a.global");
    }

    #[test]
    fn protocol_parses_case_insensitively() {
        assert_eq!("grpc".parse::<Protocol>().unwrap(), Protocol::Grpc);
        assert_eq!("MTLS".parse::<Protocol>().unwrap(), Protocol::Mtls);
        let err = "QUIC".parse::<Protocol>().unwrap_err();
        assert!(err.to_string().contains("\"QUIC\""));
    }
}
