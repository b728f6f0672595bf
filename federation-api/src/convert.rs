//! Conversions between the generated proto messages and the catalog domain
//! types, for both Hamlet versions, plus packing into and out of
//! `google.protobuf.Any`. Every import normalizes and validates, so a
//! [`FederatedService`] that came from a peer always satisfies
//! [`FederatedService::validate`]. Every conversion builds its output as a
//! whole struct literal (no `..`): a field added to a `.proto` fails to
//! compile in the exports, one added to the domain types in the imports,
//! so neither is dropped unnoticed.
//!
//! # v1alpha1 mapping
//!
//! v1alpha1 has no instances and a single SAN, so the mapping is lossy:
//!
//! * import: `sans` = `[san]` if `san` is non-empty, else empty; `instances`
//!   = one instance per distinct entry of `protocols` (case-insensitive,
//!   first wins), with `id` = the protocol in lower case (`"http"`) and no
//!   metadata, selectors or description; the v1alpha1 `id` field is ignored,
//!   because the domain identifies a service by `name`.
//! * export: `id` = `name`; `san` = the first SAN or empty; `protocols` =
//!   the distinct instance protocols in instance order; `endpoints` =
//!   address and port (endpoint labels and descriptions are dropped);
//!   `description`, `tags`, `labels` and `fqdn` are carried as they are.

use prost::Message;

use crate::domain::{ApiVersion, Endpoint, FederatedService, Instance, Protocol, StringMap};
use crate::proto::federation::types::{v1alpha1, v1alpha2};
use crate::validate::{Problem, ValidationError};

/// Type URL of a `v1alpha2` `FederatedService` packed in an `Any`.
pub const TYPE_URL_V1ALPHA2: &str =
    "type.googleapis.com/federation.types.v1alpha2.FederatedService";
/// Type URL of a `v1alpha1` `FederatedService` packed in an `Any`.
pub const TYPE_URL_V1ALPHA1: &str =
    "type.googleapis.com/federation.types.v1alpha1.FederatedService";

/// The `FederatedService` type URL (also the stream's `resource_url`) of `version`.
pub fn type_url(version: ApiVersion) -> &'static str {
    match version {
        ApiVersion::V1alpha2 => TYPE_URL_V1ALPHA2,
        ApiVersion::V1alpha1 => TYPE_URL_V1ALPHA1,
    }
}

/// Why a resource received from a peer could not be turned into a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("resource has type url {got:?}, expected {expected:?}")]
    WrongTypeUrl { expected: &'static str, got: String },
    #[error("resource is not a valid protobuf message: {0}")]
    Protobuf(String),
    #[error("invalid federated service: {0}")]
    Invalid(#[from] ValidationError),
}

/// Peers differ on case and on the trailing dot; the catalog keys on one spelling.
/// In place: the received string is kept, not copied.
fn normalize_fqdn(mut fqdn: String) -> String {
    fqdn.make_ascii_lowercase();
    if fqdn.ends_with('.') {
        fqdn.pop();
    }
    fqdn
}

/// prost fills repeated fields by pushing (room for four on the first
/// push), and a consumer keeps every imported service until it is
/// withdrawn: with 100,000 imports the spare room was a quarter of the
/// heap, so vectors that outlive the message are cut to their length.
pub(crate) fn trimmed<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

/// `convert` applied to each item with its index, into a fresh vector of
/// the exact length (`collect` would reuse the proto vector's spare room in
/// place).
fn each<T, U>(
    items: Vec<T>,
    mut convert: impl FnMut(usize, T) -> Result<U, ValidationError>,
) -> Result<Vec<U>, ValidationError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        out.push(convert(i, item)?);
    }
    Ok(out)
}

fn port_from_wire(i: usize, port: u32) -> Result<u16, ValidationError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ValidationError::new(
            format!("endpoints[{i}].port"),
            Problem::PortOutOfRange(u64::from(port)),
        )),
    }
}

fn parse_protocol(field: String, s: &str) -> Result<Protocol, ValidationError> {
    s.parse()
        .map_err(|_| ValidationError::new(field, Problem::UnknownProtocol(s.to_owned())))
}

impl TryFrom<v1alpha2::FederatedService> for FederatedService {
    type Error = ValidationError;

    /// Imports a `v1alpha2` message: parses ports and protocols, normalizes
    /// the fqdn and checks every `v1alpha2` rule.
    fn try_from(p: v1alpha2::FederatedService) -> Result<Self, Self::Error> {
        import(p, ApiVersion::V1alpha2)
    }
}

/// A `v1alpha2` message, or the one a `v1alpha1` message maps to, as a
/// service checked against every rule of `version`.
fn import(
    p: v1alpha2::FederatedService,
    version: ApiVersion,
) -> Result<FederatedService, ValidationError> {
    let v1alpha2::FederatedService {
        name,
        description,
        tags,
        labels,
        fqdn,
        endpoints,
        sans,
        instances,
    } = p;

    let domain_endpoints = each(endpoints, |i, e| {
        Ok(Endpoint {
            address: e.address,
            port: port_from_wire(i, e.port)?,
            labels: trimmed(e.labels),
            description: e.description,
        })
    })?;
    let domain_instances = each(instances, |i, inst| {
        Ok(Instance {
            id: inst.id,
            protocol: parse_protocol(format!("instances[{i}].protocol"), &inst.protocol)?,
            metadata: inst.metadata.into_iter().collect(),
            endpoint_selector: trimmed(inst.endpoint_selector),
            description: inst.description,
        })
    })?;

    let svc = FederatedService {
        name,
        description,
        tags: trimmed(tags),
        labels: labels.into_iter().collect(),
        fqdn: normalize_fqdn(fqdn),
        endpoints: domain_endpoints,
        sans: trimmed(sans),
        instances: domain_instances,
    };
    svc.validate(version)?;
    Ok(svc)
}

/// A string map as the protos' `map<string, string>`.
fn proto_map(m: &StringMap) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Exports `svc` as a `v1alpha2` message. Every domain field has a home, so
/// this is lossless.
pub fn to_v1alpha2(svc: &FederatedService) -> v1alpha2::FederatedService {
    v1alpha2::FederatedService {
        name: svc.name.clone(),
        description: svc.description.clone(),
        tags: svc.tags.clone(),
        labels: proto_map(&svc.labels),
        fqdn: svc.fqdn.clone(),
        endpoints: svc
            .endpoints
            .iter()
            .map(|e| v1alpha2::federated_service::Endpoint {
                address: e.address.clone(),
                port: u32::from(e.port),
                labels: e.labels.clone(),
                description: e.description.clone(),
            })
            .collect(),
        sans: svc.sans.clone(),
        instances: svc
            .instances
            .iter()
            .map(|inst| v1alpha2::federated_service::Instance {
                id: inst.id.clone(),
                protocol: inst.protocol.as_str().to_owned(),
                metadata: proto_map(&inst.metadata),
                endpoint_selector: inst.endpoint_selector.clone(),
                description: inst.description.clone(),
            })
            .collect(),
    }
}

impl TryFrom<v1alpha1::FederatedService> for FederatedService {
    type Error = ValidationError;

    /// See [`from_v1alpha1`].
    fn try_from(p: v1alpha1::FederatedService) -> Result<Self, Self::Error> {
        from_v1alpha1(p)
    }
}

/// Imports a `v1alpha1` message as the `v1alpha2` message the mapping in
/// the module docs gives, then checks every `v1alpha1` rule. Unknown
/// protocols fail with field `protocols[i]`.
pub fn from_v1alpha1(p: v1alpha1::FederatedService) -> Result<FederatedService, ValidationError> {
    let v1alpha1::FederatedService {
        name,
        description,
        tags,
        labels,
        fqdn,
        // The domain identifies a service by `name`; v1alpha1's separate id
        // has no home and no consumer-visible meaning.
        id: _,
        san,
        protocols,
        endpoints,
    } = p;

    // Ports first, as a v1alpha1 message has always been checked; the
    // v1alpha2 import checks them again under the same field names.
    for (i, e) in endpoints.iter().enumerate() {
        port_from_wire(i, e.port)?;
    }
    let mut instances: Vec<v1alpha2::federated_service::Instance> = Vec::new();
    for (i, raw) in protocols.iter().enumerate() {
        let protocol = parse_protocol(format!("protocols[{i}]"), raw)?.as_str();
        // A repeated protocol would give two instances the same id; it says
        // nothing new, so the first one stands.
        if instances.iter().any(|inst| inst.protocol == protocol) {
            continue;
        }
        instances.push(v1alpha2::federated_service::Instance {
            id: protocol.to_ascii_lowercase(),
            protocol: protocol.to_owned(),
            metadata: std::collections::HashMap::new(),
            endpoint_selector: Vec::new(),
            description: String::new(),
        });
    }
    let mapped = v1alpha2::FederatedService {
        name,
        description,
        tags,
        labels,
        fqdn,
        endpoints: endpoints
            .into_iter()
            .map(|e| v1alpha2::federated_service::Endpoint {
                address: e.address,
                port: e.port,
                labels: Vec::new(),
                description: String::new(),
            })
            .collect(),
        sans: if san.is_empty() {
            Vec::new()
        } else {
            vec![san]
        },
        instances,
    };
    import(mapped, ApiVersion::V1alpha1)
}

/// Exports `svc` as a `v1alpha1` message per the mapping in the module docs.
/// It reads only the fields v1alpha1 carries; the module docs list what it
/// drops.
pub fn to_v1alpha1(svc: &FederatedService) -> v1alpha1::FederatedService {
    let mut protocols: Vec<String> = Vec::new();
    for inst in &svc.instances {
        let p = inst.protocol.as_str();
        if !protocols.iter().any(|q| q == p) {
            protocols.push(p.to_owned());
        }
    }
    v1alpha1::FederatedService {
        name: svc.name.clone(),
        description: svc.description.clone(),
        tags: svc.tags.clone(),
        labels: proto_map(&svc.labels),
        fqdn: svc.fqdn.clone(),
        id: svc.name.clone(),
        san: svc.sans.first().cloned().unwrap_or_default(),
        protocols,
        endpoints: svc
            .endpoints
            .iter()
            .map(|e| v1alpha1::federated_service::Endpoint {
                address: e.address.clone(),
                port: u32::from(e.port),
            })
            .collect(),
    }
}

/// Packs `svc` as the `FederatedService` of `version` in an `Any` whose
/// type URL is [`type_url`]`(version)`.
pub fn encode_any(svc: &FederatedService, version: ApiVersion) -> prost_types::Any {
    let value = match version {
        ApiVersion::V1alpha2 => to_v1alpha2(svc).encode_to_vec(),
        ApiVersion::V1alpha1 => to_v1alpha1(svc).encode_to_vec(),
    };
    prost_types::Any {
        type_url: type_url(version).to_owned(),
        value,
    }
}

/// Unpacks, normalizes and validates a `FederatedService` of `version` from
/// an `Any` received from a peer.
pub fn decode_any(
    any: &prost_types::Any,
    version: ApiVersion,
) -> Result<FederatedService, DecodeError> {
    let expected = type_url(version);
    if any.type_url != expected {
        return Err(DecodeError::WrongTypeUrl {
            expected,
            got: any.type_url.clone(),
        });
    }
    let bytes = any.value.as_slice();
    let svc = match version {
        ApiVersion::V1alpha2 => v1alpha2::FederatedService::decode(bytes)
            .map_err(|e| DecodeError::Protobuf(e.to_string()))?
            .try_into()?,
        ApiVersion::V1alpha1 => from_v1alpha1(
            v1alpha1::FederatedService::decode(bytes)
                .map_err(|e| DecodeError::Protobuf(e.to_string()))?,
        )?,
    };
    Ok(svc)
}

#[cfg(test)]
mod tests;
