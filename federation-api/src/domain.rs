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
