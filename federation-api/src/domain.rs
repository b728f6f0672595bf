//! Catalog domain types: what a federated service *is*, independent of the
//! wire version that carried it. Parsed and validated once at the boundary.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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

/// String keys to string values (service labels, instance metadata), kept
/// sorted by key in one flat vector. A consumer holds one of these per
/// imported service and instance, usually with one to three entries: a
/// `BTreeMap` would spend a 544-byte node on each, which at 100,000 imports
/// was a third of the gateway's heap. Lookups are binary searches; the API
/// is the part of `BTreeMap`'s that the catalog uses, with the same
/// semantics (iteration in key order, a later duplicate key wins).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct StringMap(Vec<(String, String)>);

/// Iterator over the entries of a [`StringMap`] in key order.
pub type StringMapIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (String, String)>,
    fn(&(String, String)) -> (&String, &String),
>;

impl StringMap {
    pub const fn new() -> Self {
        StringMap(Vec::new())
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.position(key).ok().map(|i| self.0.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> StringMapIter<'_> {
        fn pair((k, v): &(String, String)) -> (&String, &String) {
            (k, v)
        }
        self.0
            .iter()
            .map(pair as fn(&(String, String)) -> (&String, &String))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }
}

impl fmt::Debug for StringMap {
    /// Formats like a `BTreeMap`, so logs and test failures read the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, String)> for StringMap {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut entries: Vec<(String, String)> = iter.into_iter().collect();
        // Stable sort, then keep the last of equal keys: `BTreeMap`'s rule.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.reverse();
        entries.dedup_by(|dup, kept| dup.0 == kept.0);
        entries.reverse();
        entries.shrink_to_fit();
        StringMap(entries)
    }
}

impl<const N: usize> From<[(String, String); N]> for StringMap {
    fn from(entries: [(String, String); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl Extend<(String, String)> for StringMap {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl IntoIterator for StringMap {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a StringMap {
    type Item = (&'a String, &'a String);
    type IntoIter = StringMapIter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Where the owner exposes a service (typically its ingress gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// IP address or FQDN.
    pub address: String,
    pub port: u16,
    #[serde(deserialize_with = "crate::json::trimmed")]
    pub labels: Vec<String>,
    pub description: String,
}

/// One backing instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id: String,
    pub protocol: Protocol,
    /// Reserved keys: `SNI`, `HOSTNAME`, `PORT`.
    pub metadata: StringMap,
    #[serde(deserialize_with = "crate::json::trimmed")]
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
/// Its JSON form (admin API, import cache) is in [`crate::json`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedService {
    pub name: String,
    pub description: String,
    #[serde(deserialize_with = "crate::json::trimmed")]
    pub tags: Vec<String>,
    pub labels: StringMap,
    pub fqdn: String,
    #[serde(deserialize_with = "crate::json::trimmed")]
    pub endpoints: Vec<Endpoint>,
    #[serde(deserialize_with = "crate::json::trimmed")]
    pub sans: Vec<String>,
    #[serde(deserialize_with = "crate::json::trimmed")]
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
            metadata: StringMap::new(),
            endpoint_selector: selectors.iter().map(|l| (*l).to_owned()).collect(),
            description: String::new(),
        }
    }

    fn service() -> FederatedService {
        FederatedService {
            name: "reviews".into(),
            description: String::new(),
            tags: vec![],
            labels: StringMap::new(),
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

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// `StringMap` behaves like the `BTreeMap` it replaced, whatever the
    /// order and duplicates it is built from.
    #[test]
    fn string_map_matches_btree_map() {
        let pairs = [
            (s("PORT"), s("80")),
            (s("SNI"), s("a.global")),
            (s("HOSTNAME"), s("h")),
            (s("PORT"), s("8080")),
            (s(""), s("empty")),
        ];
        let map: StringMap = pairs.clone().into_iter().collect();
        let reference: std::collections::BTreeMap<String, String> = pairs.into_iter().collect();
        assert_eq!(map.len(), 4);
        assert!(!map.is_empty());
        assert_eq!(format!("{map:?}"), format!("{reference:?}"));
        assert!(map.iter().eq(reference.iter()));
        assert!(map.keys().eq(reference.keys()));
        assert!(map.values().eq(reference.values()));
        assert_eq!(map.get("PORT").map(String::as_str), Some("8080"));
        assert_eq!(map.get(""), Some(&s("empty")));
        assert_eq!(map.get("port"), None);
        assert!(map.contains_key("SNI") && !map.contains_key("ZZZ"));
        assert_eq!(map.0.capacity(), map.len(), "built once, no spare room");

        let mut m = StringMap::new();
        assert!(m.is_empty());
        assert_eq!(m.insert(s("b"), s("1")), None);
        assert_eq!(m.insert(s("a"), s("2")), None);
        assert_eq!(m.insert(s("c"), s("3")), None);
        assert_eq!(m.insert(s("b"), s("4")), Some(s("1")));
        assert_eq!(m.remove("a"), Some(s("2")));
        assert_eq!(m.remove("a"), None);
        m.extend([(s("d"), s("5")), (s("c"), s("6"))]);
        let owned: Vec<(String, String)> = m.clone().into_iter().collect();
        assert_eq!(
            owned,
            [(s("b"), s("4")), (s("c"), s("6")), (s("d"), s("5"))]
        );
        let borrowed: Vec<_> = (&m).into_iter().collect();
        assert_eq!(
            borrowed,
            [(&s("b"), &s("4")), (&s("c"), &s("6")), (&s("d"), &s("5"))]
        );
        assert_eq!(
            m,
            StringMap::from([(s("d"), s("5")), (s("c"), s("6")), (s("b"), s("4"))])
        );
    }
}
