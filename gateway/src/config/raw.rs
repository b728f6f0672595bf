//! The YAML shape exactly as users write it: camelCase keys, unknown keys
//! rejected, everything a string or integer. Nothing here is checked beyond
//! what serde does; `validate` turns it into the typed config so every
//! error can name its YAML path.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawConfig {
    pub mesh: RawMesh,
    pub identity: RawIdentity,
    #[serde(default)]
    pub listeners: RawListeners,
    #[serde(default)]
    pub advertise: Option<RawAdvertise>,
    #[serde(default)]
    pub exports: Vec<RawExport>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    #[serde(default)]
    pub imports: RawImports,
    #[serde(default)]
    pub federation: RawFederation,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub drain: RawDrain,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawMesh {
    pub name: String,
    pub trust_domain: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub certificate: String,
    pub private_key: String,
    pub trust_bundle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawListeners {
    pub federation: Option<String>,
    pub admin: Option<String>,
    pub ingress: Option<String>,
    pub egress: Option<String>,
    pub dns: Option<String>,
}

// Ports are wide integers here so that 0 or 70000 become a validation error
// naming the path, rather than serde's bare "invalid u16".
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawAdvertise {
    pub address: String,
    pub port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawExport {
    pub name: String,
    pub fqdn: Option<String>,
    pub protocol: String,
    pub port: Option<i64>,
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub peers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPeer {
    pub name: String,
    pub trust_domain: String,
    pub trust_bundle: String,
    pub federation: Option<String>,
    pub api_version: Option<String>,
    pub identities: Option<Vec<String>>,
    pub follow_trust_bundle: Option<bool>,
    pub dial: Option<String>,
    pub allowed_names: Option<Vec<String>>,
    #[serde(default)]
    pub limits: RawLimits,
}

// Wide integers, as for ports: an out-of-range value is a validation error
// naming its path.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawLimits {
    pub services: Option<i64>,
    pub instances_per_service: Option<i64>,
    pub endpoints_per_service: Option<i64>,
    pub message_bytes: Option<i64>,
    pub metadata_entries: Option<i64>,
    pub metadata_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawImports {
    pub stale_after: Option<String>,
    pub cache_dir: Option<String>,
    /// Registered FQDN → the port local apps call it on instead of its own.
    #[serde(default)]
    pub port_overrides: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawFederation {
    pub window: Option<i64>,
    pub ack_timeout: Option<String>,
    pub snapshot_quiet_period: Option<String>,
    #[serde(default)]
    pub backoff: RawBackoff,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub initial: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawProxy {
    pub vip_range: Option<String>,
    pub connect_timeout: Option<String>,
    pub handshake_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub http2_max_concurrent_streams: Option<i64>,
    pub tls_resumption: Option<bool>,
    pub yield_to_clients: Option<bool>,
    pub mode: Option<String>,
    #[serde(default)]
    pub shared: Option<RawShared>,
    pub vip_listener_budget: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawShared {
    pub answer: String,
    pub bind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawDrain {
    pub delay: Option<String>,
    pub timeout: Option<String>,
}
