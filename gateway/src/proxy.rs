//! The data plane. [`ingress`] faces peers: it terminates mTLS, identifies
//! the peer by its SPIFFE ID, routes by SNI to an exported service the peer
//! may reach, and forwards to the service's backends. [`egress`] faces local
//! apps: it listens on one VIP per imported service (or on one shared
//! address, once per port), opens (or reuses) an mTLS connection to the
//! owner's ingress, and carries the traffic across.
//! Routing state is read from immutable snapshots (`watch`), never locked
//! per request.

use std::collections::HashMap;
use std::sync::Arc;

use elsinore_certs::{Identity, TrustBundle};
use tokio_util::sync::CancellationToken;

use crate::config::ProxyTuning;
use crate::state::Shared;

pub(crate) mod activity;
pub mod backend;
pub mod budget;
pub mod egress;
pub mod error;
pub mod h1;
pub mod h1client;
pub mod h2body;
pub mod h2client;
pub mod h2server;
pub mod handoff;
pub mod ingress;
pub mod pool;
#[cfg(test)]
mod recording;
pub mod splice;
pub mod tls;

/// The header in which ingress hands the verified peer identity (SPIFFE ID)
/// to the backend. Any copy a peer sends is stripped first.
pub const PEER_IDENTITY_HEADER: &str = "x-elsinore-peer-identity";

/// Identity headers a peer must never be able to set for our backends:
/// stripped from every request arriving through ingress.
pub const STRIPPED_IDENTITY_HEADERS: &[&str] = &[
    PEER_IDENTITY_HEADER,
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-s-dn",
    "x-ssl-client-verify",
    "l5d-client-id",
    "x-envoy-peer-metadata",
    "x-envoy-peer-metadata-id",
];

/// Whether `headers` hold a field named in `names` (lower-case). One pass
/// over a request's few fields: most hold none of the hop-by-hop or
/// identity headers, and this is cheaper than a map lookup per name.
pub(crate) fn has_any(headers: &http::HeaderMap, names: &[&str]) -> bool {
    headers.keys().any(|n| names.contains(&n.as_str()))
}

/// What both proxies need from the running gateway.
#[derive(Clone)]
pub struct ProxyContext {
    pub shared: Arc<Shared>,
    /// Our gateway identity (presented by egress, and by ingress as server).
    pub identity: Identity,
    /// Each peer's trust bundle, by peer name.
    pub bundles: Arc<HashMap<String, TrustBundle>>,
    pub tuning: ProxyTuning,
    pub shutdown: CancellationToken,
}
