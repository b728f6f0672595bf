//! Validation of a [`FederatedService`] against the Hamlet rules for one API
//! version, and the DNS-name helpers those rules (and the gateway config)
//! rely on. A peer's message is validated once, at the boundary; everything
//! past it may assume the rules below hold.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use crate::domain::{ApiVersion, Endpoint, FederatedService, Instance};

/// Longest DNS name we accept, in bytes, without the trailing dot.
pub const MAX_DNS_NAME_LEN: usize = 253;
/// Longest DNS label, in bytes.
pub const MAX_DNS_LABEL_LEN: usize = 63;
/// Longest service name, in bytes (same bound as a DNS name, so it fits in one).
pub const MAX_NAME_LEN: usize = 253;

/// What is wrong with one field. Every message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is required but empty")]
    Missing,
    #[error("{0:?} contains whitespace or control characters")]
    BadCharacters(String),
    #[error("{value:?} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        value: String,
        len: usize,
        max: usize,
    },
    #[error("{value:?} is not a valid DNS name: {reason}")]
    NotDnsName { value: String, reason: &'static str },
    #[error("{value:?} is not a valid DNS label: {reason}")]
    NotDnsLabel { value: String, reason: &'static str },
    #[error("{0:?} is neither an IP address nor a valid host name")]
    BadAddress(String),
    #[error("port {0} is outside 1..=65535")]
    PortOutOfRange(u64),
    #[error("{0:?} is not a port number in 1..=65535")]
    NotAPort(String),
    #[error(
        "unknown protocol {0:?} (expected one of HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP, TLS, MTLS)"
    )]
    UnknownProtocol(String),
    #[error("instance id {0:?} is used by more than one instance")]
    DuplicateInstanceId(String),
}

/// A service that breaks a rule: which field (a path such as
/// `endpoints[1].port` or `instances[0].protocol`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub problem: Problem,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        ValidationError {
            field: field.into(),
            problem,
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ValidationError {}

/// Why `s` is not a DNS label, or `None` if it is one: 1–63 bytes of
/// `[a-z0-9-]`, not starting or ending with `-`. Lower case only, because
/// the consumer registers names as given and DNS answers must match them.
fn dns_label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("a label is empty")
    } else if s.len() > MAX_DNS_LABEL_LEN {
        Some("a label is longer than 63 bytes")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("a label has a character outside [a-z0-9-]")
    } else if s.starts_with('-') || s.ends_with('-') {
        Some("a label starts or ends with '-'")
    } else {
        None
    }
}

/// Why `s` is not a DNS name, or `None` if it is one: at least two valid
/// labels separated by dots, at most 253 bytes, no trailing dot.
fn dns_name_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("it is empty");
    }
    if s.len() > MAX_DNS_NAME_LEN {
        return Some("it is longer than 253 bytes");
    }
    if !s.contains('.') {
        return Some("it needs at least two labels");
    }
    s.split('.').find_map(dns_label_problem)
}

/// Whether `s` is a single DNS label: 1–63 bytes of `[a-z0-9-]`, not starting
/// or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    dns_label_problem(s).is_none()
}

/// Whether `s` is a DNS name as Hamlet needs it: at least two labels (see
/// [`is_dns_label`]) joined by dots, at most 253 bytes, lower case, no
/// trailing dot.
pub fn is_dns_name(s: &str) -> bool {
    dns_name_problem(s).is_none()
}

/// Host names in addresses and SNI are case-insensitive on the wire, so they
/// are checked in lower case; a single label (`localhost`) is a fine address.
fn is_host(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    is_dns_label(&lower) || is_dns_name(&lower)
}

impl FederatedService {
    /// Checks every rule of `version` and returns the first broken one.
    ///
    /// Both versions: `name` (non-empty, no whitespace or control characters,
    /// at most 253 bytes), `fqdn` (a DNS name), `endpoints` (non-empty; each
    /// address an IP or host name, each port non-zero), non-empty `sans`
    /// entries, and for every instance present: id a DNS label (the consumer
    /// registers `<id>.<fqdn>`) unique in the service, non-empty selectors and
    /// metadata keys, `PORT` a port number and `SNI` a DNS name.
    ///
    /// `v1alpha2` also requires `sans` and `instances` to be non-empty;
    /// `v1alpha1` carries at most one SAN and protocols only, so both may be
    /// empty there.
    pub fn validate(&self, version: ApiVersion) -> Result<(), ValidationError> {
        let FederatedService {
            name,
            description: _,
            tags: _,
            labels: _,
            fqdn,
            endpoints,
            sans,
            instances,
        } = self;

        validate_name(name)?;
        validate_fqdn(fqdn)?;

        if endpoints.is_empty() {
            return Err(ValidationError::new("endpoints", Problem::Missing));
        }
        for (i, endpoint) in endpoints.iter().enumerate() {
            validate_endpoint(i, endpoint)?;
        }

        let required = version == ApiVersion::V1alpha2;
        if required && sans.is_empty() {
            return Err(ValidationError::new("sans", Problem::Missing));
        }
        if let Some(i) = sans.iter().position(String::is_empty) {
            return Err(ValidationError::new(format!("sans[{i}]"), Problem::Missing));
        }

        if required && instances.is_empty() {
            return Err(ValidationError::new("instances", Problem::Missing));
        }
        let mut seen = HashSet::new();
        for (i, instance) in instances.iter().enumerate() {
            validate_instance(i, instance)?;
            if !seen.insert(instance.id.as_str()) {
                return Err(ValidationError::new(
                    format!("instances[{i}].id"),
                    Problem::DuplicateInstanceId(instance.id.clone()),
                ));
            }
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new("name", Problem::Missing));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::new(
            "name",
            Problem::BadCharacters(name.to_owned()),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            "name",
            Problem::TooLong {
                value: name.to_owned(),
                len: name.len(),
                max: MAX_NAME_LEN,
            },
        ));
    }
    Ok(())
}

fn validate_fqdn(fqdn: &str) -> Result<(), ValidationError> {
    if fqdn.is_empty() {
        return Err(ValidationError::new("fqdn", Problem::Missing));
    }
    match dns_name_problem(fqdn) {
        None => Ok(()),
        Some(reason) => Err(ValidationError::new(
            "fqdn",
            Problem::NotDnsName {
                value: fqdn.to_owned(),
                reason,
            },
        )),
    }
}

fn validate_endpoint(i: usize, endpoint: &Endpoint) -> Result<(), ValidationError> {
    let Endpoint {
        address,
        port,
        labels: _,
        description: _,
    } = endpoint;
    if address.is_empty() {
        return Err(ValidationError::new(
            format!("endpoints[{i}].address"),
            Problem::Missing,
        ));
    }
    if address.parse::<IpAddr>().is_err() && !is_host(address) {
        return Err(ValidationError::new(
            format!("endpoints[{i}].address"),
            Problem::BadAddress(address.clone()),
        ));
    }
    if *port == 0 {
        return Err(ValidationError::new(
            format!("endpoints[{i}].port"),
            Problem::PortOutOfRange(0),
        ));
    }
    Ok(())
}

fn validate_instance(i: usize, instance: &Instance) -> Result<(), ValidationError> {
    let Instance {
        id,
        // Already a closed enum here; the wire string is checked on conversion.
        protocol: _,
        metadata,
        endpoint_selector,
        description: _,
    } = instance;

    if id.is_empty() {
        return Err(ValidationError::new(
            format!("instances[{i}].id"),
            Problem::Missing,
        ));
    }
    if let Some(reason) = dns_label_problem(id) {
        return Err(ValidationError::new(
            format!("instances[{i}].id"),
            Problem::NotDnsLabel {
                value: id.clone(),
                reason,
            },
        ));
    }

    if let Some(j) = endpoint_selector.iter().position(String::is_empty) {
        return Err(ValidationError::new(
            format!("instances[{i}].endpoint_selector[{j}]"),
            Problem::Missing,
        ));
    }

    for (key, value) in metadata {
        if key.is_empty() {
            return Err(ValidationError::new(
                format!("instances[{i}].metadata"),
                Problem::Missing,
            ));
        }
        if key == Instance::META_PORT && parse_port(value).is_none() {
            return Err(ValidationError::new(
                format!("instances[{i}].metadata.{key}"),
                Problem::NotAPort(value.clone()),
            ));
        }
        if key == Instance::META_SNI
            && let Some(reason) = dns_name_problem(&value.to_ascii_lowercase())
        {
            return Err(ValidationError::new(
                format!("instances[{i}].metadata.{key}"),
                Problem::NotDnsName {
                    value: value.clone(),
                    reason,
                },
            ));
        }
    }
    Ok(())
}

/// A port number in 1..=65535, as written in metadata.
pub(crate) fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Protocol, StringMap};

    pub(crate) fn valid() -> FederatedService {
        FederatedService {
            name: "reviews".into(),
            description: "book reviews".into(),
            tags: vec!["books".into()],
            labels: StringMap::from([("team".into(), "bookinfo".into())]),
            fqdn: "reviews.mesh-a.global".into(),
            endpoints: vec![
                Endpoint {
                    address: "192.0.2.10".into(),
                    port: 15443,
                    labels: vec!["zone-a".into()],
                    description: String::new(),
                },
                Endpoint {
                    address: "ingress.mesh-a.example".into(),
                    port: 443,
                    labels: vec![],
                    description: String::new(),
                },
            ],
            sans: vec!["spiffe://mesh-a/ns/gw/sa/elsinore".into()],
            instances: vec![Instance {
                id: "v1".into(),
                protocol: Protocol::Http,
                metadata: StringMap::from([
                    (Instance::META_SNI.into(), "reviews.mesh-a.internal".into()),
                    (Instance::META_PORT.into(), "9080".into()),
                ]),
                endpoint_selector: vec!["zone-a".into()],
                description: String::new(),
            }],
        }
    }

    #[track_caller]
    fn assert_err(svc: &FederatedService, v: ApiVersion, field: &str, needle: &str) {
        let err = svc.validate(v).expect_err("expected a validation error");
        assert_eq!(err.field, field, "wrong field in {err}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    }

    #[test]
    fn valid_service_passes_both_versions() {
        valid().validate(ApiVersion::V1alpha2).unwrap();
        valid().validate(ApiVersion::V1alpha1).unwrap();
    }

    #[test]
    fn name_rules() {
        let mut s = valid();
        s.name = String::new();
        assert_err(&s, ApiVersion::V1alpha2, "name", "required");
        s.name = "re views".into();
        assert_err(&s, ApiVersion::V1alpha2, "name", "\"re views\"");
        s.name = "re\u{7}views".into();
        assert_err(&s, ApiVersion::V1alpha2, "name", "control");
        s.name = "x".repeat(254);
        assert_err(&s, ApiVersion::V1alpha2, "name", "254 bytes");
        s.name = "x".repeat(253);
        s.validate(ApiVersion::V1alpha2).unwrap();
        s.name = "Reviews_v2@ns".into();
        s.validate(ApiVersion::V1alpha2).unwrap();
    }

    #[test]
    fn fqdn_rules() {
        let mut s = valid();
        s.fqdn = String::new();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "required");
        s.fqdn = "reviews".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "two labels");
        s.fqdn = "-reviews.global".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "\"-reviews.global\"");
        s.fqdn = "reviews-.global".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "'-'");
        s.fqdn = "rev_iews.global".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "[a-z0-9-]");
        s.fqdn = "Reviews.global".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "\"Reviews.global\"");
        s.fqdn = "reviews..global".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "empty");
        s.fqdn = "reviews.global.".into();
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "empty");
        s.fqdn = format!("{}.global", "a".repeat(64));
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "63");
        s.fqdn = format!("{}.global", "a".repeat(63));
        s.validate(ApiVersion::V1alpha2).unwrap();
        // 4 * 63 + 3 dots = 255 bytes.
        s.fqdn = vec!["a".repeat(63); 4].join(".");
        assert_err(&s, ApiVersion::V1alpha2, "fqdn", "253");
    }

    #[test]
    fn dns_helpers() {
        assert!(is_dns_name("a.b"));
        assert!(is_dns_name("reviews.mesh-a.global"));
        assert!(is_dns_name("0.1a"));
        assert!(!is_dns_name("a"));
        assert!(!is_dns_name(""));
        assert!(!is_dns_name("a.b."));
        assert!(!is_dns_name("A.b"));
        assert!(!is_dns_name("a b.c"));
        assert!(is_dns_label("v1"));
        assert!(is_dns_label("a-b"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn endpoint_rules() {
        let mut s = valid();
        s.endpoints.clear();
        assert_err(&s, ApiVersion::V1alpha2, "endpoints", "required");

        let mut s = valid();
        s.endpoints[1].address = String::new();
        assert_err(&s, ApiVersion::V1alpha2, "endpoints[1].address", "required");
        s.endpoints[1].address = "not a host".into();
        assert_err(
            &s,
            ApiVersion::V1alpha2,
            "endpoints[1].address",
            "\"not a host\"",
        );
        s.endpoints[1].address = "2001:db8::1".into();
        s.validate(ApiVersion::V1alpha2).unwrap();
        s.endpoints[1].address = "localhost".into();
        s.validate(ApiVersion::V1alpha2).unwrap();
        s.endpoints[1].address = "Ingress.Example.COM".into();
        s.validate(ApiVersion::V1alpha2).unwrap();

        s.endpoints[1].port = 0;
        assert_err(&s, ApiVersion::V1alpha2, "endpoints[1].port", "port 0");
    }

    #[test]
    fn sans_rules() {
        let mut s = valid();
        s.sans.clear();
        assert_err(&s, ApiVersion::V1alpha2, "sans", "required");
        s.validate(ApiVersion::V1alpha1).unwrap();
        s.sans = vec!["spiffe://a/b".into(), String::new()];
        assert_err(&s, ApiVersion::V1alpha2, "sans[1]", "required");
        assert_err(&s, ApiVersion::V1alpha1, "sans[1]", "required");
    }

    #[test]
    fn instance_rules() {
        let mut s = valid();
        s.instances.clear();
        assert_err(&s, ApiVersion::V1alpha2, "instances", "required");
        s.validate(ApiVersion::V1alpha1).unwrap();

        let mut s = valid();
        s.instances[0].id = String::new();
        assert_err(&s, ApiVersion::V1alpha2, "instances[0].id", "required");
        s.instances[0].id = "v1.canary".into();
        assert_err(&s, ApiVersion::V1alpha2, "instances[0].id", "\"v1.canary\"");
        s.instances[0].id = "V1".into();
        assert_err(&s, ApiVersion::V1alpha1, "instances[0].id", "\"V1\"");

        let mut s = valid();
        let mut second = s.instances[0].clone();
        second.protocol = Protocol::Tcp;
        s.instances.push(second);
        assert_err(&s, ApiVersion::V1alpha2, "instances[1].id", "\"v1\"");
        s.instances[1].id = "v2".into();
        s.validate(ApiVersion::V1alpha2).unwrap();

        s.instances[1].endpoint_selector = vec!["x".into(), String::new()];
        assert_err(
            &s,
            ApiVersion::V1alpha2,
            "instances[1].endpoint_selector[1]",
            "required",
        );
    }

    #[test]
    fn metadata_rules() {
        let mut s = valid();
        s.instances[0].metadata.insert(String::new(), "x".into());
        assert_err(
            &s,
            ApiVersion::V1alpha2,
            "instances[0].metadata",
            "required",
        );

        for bad in ["0", "65536", "http", "-1", ""] {
            let mut s = valid();
            s.instances[0]
                .metadata
                .insert(Instance::META_PORT.into(), bad.into());
            assert_err(
                &s,
                ApiVersion::V1alpha2,
                "instances[0].metadata.PORT",
                &format!("{bad:?}"),
            );
        }

        let mut s = valid();
        s.instances[0]
            .metadata
            .insert(Instance::META_SNI.into(), "no_underscores.example".into());
        assert_err(
            &s,
            ApiVersion::V1alpha2,
            "instances[0].metadata.SNI",
            "\"no_underscores.example\"",
        );
        s.instances[0]
            .metadata
            .insert(Instance::META_SNI.into(), "Reviews.Example".into());
        s.validate(ApiVersion::V1alpha2).unwrap();

        // Keys other than the reserved ones are free-form.
        s.instances[0]
            .metadata
            .insert("port".into(), "not a number".into());
        s.validate(ApiVersion::V1alpha2).unwrap();
    }
}
