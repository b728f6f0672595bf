//! The JSON form of the domain types, defined once: the admin API shows
//! services in it and the gateway's import cache stores them in it. Keys
//! are camelCase (as in the protos' JSON mapping), a protocol is its wire
//! spelling (`"HTTP"`), a string map is an object in key order.
//!
//! Reading this form does not validate: it is for documents the gateway
//! wrote itself. A service from a peer comes through [`crate::convert`].
//! The format is pinned by the import cache's golden-file test, so a change
//! here that would alter the cache file fails there.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, Serializer};

use crate::domain::{Protocol, StringMap};

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Protocol, E> {
                s.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Name)
    }
}

impl Serialize for StringMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = StringMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMap, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                // Sorted, a repeated key's last value kept, cut to length.
                Ok(entries.into_iter().collect())
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A vector cut to its length ([`crate::convert::trimmed`]): deserializers
/// grow vectors by pushing too, and a restored import lives for hours.
pub(crate) fn trimmed<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Vec::<T>::deserialize(deserializer).map(crate::convert::trimmed)
}

#[cfg(test)]
mod tests {
    use crate::domain::{Endpoint, FederatedService, Instance, Protocol, StringMap};

    #[test]
    fn a_protocol_is_its_wire_name_and_an_unknown_one_is_named() {
        assert_eq!(
            serde_json::to_string(&Protocol::Http2).unwrap(),
            "\"HTTP2\""
        );
        let back: Protocol = serde_json::from_str("\"grpc\"").unwrap();
        assert_eq!(back, Protocol::Grpc);
        let err = serde_json::from_str::<Protocol>("\"SMTP\"").unwrap_err();
        assert!(
            err.to_string().contains("unknown protocol \"SMTP\""),
            "{err}"
        );
    }

    #[test]
    fn a_string_map_reads_like_a_btreemap() {
        let map: StringMap = serde_json::from_str(r#"{"b":"1","a":"2","b":"3"}"#).unwrap();
        assert_eq!(
            map,
            StringMap::from([
                ("a".to_owned(), "2".to_owned()),
                ("b".to_owned(), "3".to_owned())
            ])
        );
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"a":"2","b":"3"}"#);
    }

    #[test]
    fn a_service_round_trips_with_vectors_cut_to_length() {
        let svc = FederatedService {
            name: "reviews".to_owned(),
            description: "d".to_owned(),
            tags: vec!["t".to_owned()],
            labels: StringMap::from([("k".to_owned(), "v".to_owned())]),
            fqdn: "reviews.mesh-b.global".to_owned(),
            endpoints: vec![Endpoint {
                address: "gw".to_owned(),
                port: 15443,
                labels: vec!["zone=a".to_owned()],
                description: String::new(),
            }],
            sans: vec!["spiffe://b/x".to_owned()],
            instances: vec![Instance {
                id: "i".to_owned(),
                protocol: Protocol::Tcp,
                metadata: StringMap::new(),
                endpoint_selector: vec!["zone=a".to_owned()],
                description: String::new(),
            }],
        };
        let text = serde_json::to_string(&svc).unwrap();
        assert!(text.contains(r#""endpointSelector":["zone=a"]"#), "{text}");
        let back: FederatedService = serde_json::from_str(&text).unwrap();
        assert_eq!(back, svc);
        assert_eq!(back.tags.capacity(), back.tags.len());
        assert_eq!(back.endpoints.capacity(), back.endpoints.len());
        assert_eq!(back.endpoints[0].labels.capacity(), 1);
        assert_eq!(back.instances[0].endpoint_selector.capacity(), 1);
    }
}
