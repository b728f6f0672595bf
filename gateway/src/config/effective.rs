//! The effective configuration as JSON, for the admin `/config` endpoint,
//! and the list of keys that differ between two configs, for the reloader
//! to name what needs a restart. Keys are spelled as in the YAML file
//! (camelCase), durations in humantime form, defaults filled in.
//!
//! The config holds no secret material: the identity's private key and the
//! trust bundles are named by path, and only the paths are shown, never the
//! files' content. That every key of the file is shown (and so, through
//! [`changed_keys`], reported on reload) is held by a test, not by the
//! compiler: `every_key_of_the_file_is_shown` checks that a config sets
//! every key of the raw structs, and looks each of its keys up in
//! [`to_json`].

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::{Config, EgressMode, Export, HostPort, Peer, SharedAnswer};

fn duration(d: std::time::Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn path(p: &std::path::Path) -> Value {
    Value::String(p.display().to_string())
}

fn host_port(h: &HostPort) -> Value {
    Value::String(h.to_string())
}

fn export(e: &Export) -> Value {
    json!({
        "name": e.name,
        "fqdn": e.fqdn,
        "protocol": e.protocol.as_str(),
        "port": e.port,
        "backends": e.backends.iter().map(host_port).collect::<Vec<_>>(),
        "peers": e.peers,
    })
}

fn peer(p: &Peer) -> Value {
    let limits = &p.limits;
    json!({
        "name": p.name,
        "trustDomain": p.trust_domain.as_str(),
        "trustBundle": path(&p.trust_bundle),
        "federation": p.federation.as_ref().map(host_port),
        "apiVersion": p.api_version.as_str(),
        "identities": p.identities.to_strings(&p.trust_domain),
        "followTrustBundle": p.follow_trust_bundle,
        "dial": p.dial.as_str(),
        "allowedNames": p.allowed_names,
        "limits": {
            "services": limits.services,
            "instancesPerService": limits.instances_per_service,
            "endpointsPerService": limits.endpoints_per_service,
            "messageBytes": limits.message_bytes,
            "metadataEntries": limits.metadata_entries,
            "metadataBytes": limits.metadata_bytes,
        },
    })
}

/// `proxy.mode` and the `proxy.shared` section that goes with it.
fn egress_mode(mode: &EgressMode) -> (&'static str, Value) {
    match mode {
        EgressMode::Vip => ("vip", Value::Null),
        EgressMode::Shared { answer, bind } => {
            let answer = match answer {
                SharedAnswer::Address(ip) => ip.to_string(),
                SharedAnswer::Cname(name) => name.clone(),
            };
            (
                "shared",
                json!({ "answer": answer, "bind": bind.to_string() }),
            )
        }
    }
}

/// A data-plane listener's address, or `off`.
fn listener(addr: Option<SocketAddr>) -> Value {
    Value::String(addr.map_or_else(|| "off".to_owned(), |a| a.to_string()))
}

/// The whole config as JSON: what `/config` serves. Long because it names
/// every key of the file, in the file's order.
pub fn to_json(config: &Config) -> Value {
    let (listeners, imports) = (&config.listeners, &config.imports);
    let (federation, proxy) = (&config.federation, &config.proxy);
    let (mode, shared) = egress_mode(&proxy.mode);
    json!({
        "mesh": {
            "name": config.mesh.name,
            "trustDomain": config.mesh.trust_domain.as_str(),
        },
        "identity": {
            "certificate": path(&config.identity.certificate),
            "privateKey": path(&config.identity.private_key),
            "trustBundle": config.identity.trust_bundle.as_deref().map(path),
        },
        "listeners": {
            "federation": listeners.federation.to_string(),
            "admin": listeners.admin.to_string(),
            "ingress": listener(listeners.ingress),
            "egress": listener(listeners.egress),
            "dns": listener(listeners.dns),
        },
        "advertise": { "address": config.advertise.address, "port": config.advertise.port },
        "exports": config.exports.iter().map(export).collect::<Vec<_>>(),
        "peers": config.peers.iter().map(peer).collect::<Vec<_>>(),
        "imports": {
            "staleAfter": duration(imports.stale_after),
            "cacheDir": imports.cache_dir.as_deref().map(path),
            "portOverrides": imports.port_overrides,
        },
        "federation": {
            "window": federation.window,
            "ackTimeout": duration(federation.ack_timeout),
            "snapshotQuietPeriod": duration(federation.snapshot_quiet_period),
            "backoffInitial": duration(federation.backoff_initial),
            "backoffMax": duration(federation.backoff_max),
        },
        "proxy": {
            "vipRange": proxy.vip_range.to_string(),
            "connectTimeout": duration(proxy.connect_timeout),
            "handshakeTimeout": duration(proxy.handshake_timeout),
            "idleTimeout": duration(proxy.idle_timeout),
            "requestTimeout": duration(proxy.request_timeout),
            "maxConnections": proxy.max_connections,
            "http2MaxConcurrentStreams": proxy.http2_max_concurrent_streams,
            "tlsResumption": proxy.tls_resumption,
            "yieldToClients": proxy.yield_to_clients,
            "mode": mode,
            "shared": shared,
            "vipListenerBudget": proxy.vip_listener_budget,
        },
        "drain": {
            "delay": duration(config.drain.delay),
            "timeout": duration(config.drain.timeout),
        },
    })
}

/// The keys whose values differ between `a` and `b`, as YAML paths
/// (`proxy.idleTimeout`, `peers[1].federation`, `peers` when the list
/// changed length), in document order.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let mut out = Vec::new();
    diff("", &to_json(a), &to_json(b), &mut out);
    out
}

fn diff(at: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, va) in a {
                let child = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match b.get(key) {
                    Some(vb) => diff(&child, va, vb, out),
                    None => out.push(child),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                });
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(&format!("{at}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(at.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "mesh: {{ name: mesh-a, trustDomain: mesh-a.example }}
identity: {{ certificate: certs/gw.pem, privateKey: certs/gw.key }}
advertise: {{ address: gw.mesh-a.example }}
exports:
  - {{ name: reviews, protocol: HTTP, backends: [\"10.0.0.1:9080\"], peers: [mesh-b] }}
peers:
  - {{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, federation: \"gw.b:8008\" }}
{extra}"
        );
        Config::from_yaml_str(&text, Path::new("/etc/elsinore")).unwrap()
    }

    /// A config that sets every key of the YAML file, each to a value
    /// other than its default.
    const EVERY_KEY: &str = "mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: certs/gw.pem, privateKey: certs/gw.key, trustBundle: certs/own.pem }
listeners:
  federation: \"0.0.0.0:18008\"
  admin: \"127.0.0.1:15100\"
  ingress: \"0.0.0.0:15443\"
  egress: \"127.0.0.1:15101\"
  dns: \"127.0.0.1:15153\"
advertise: { address: gw.mesh-a.example, port: 16443 }
exports:
  - name: reviews
    fqdn: Reviews.Mesh-A.Global.
    protocol: GRPC
    port: 9081
    backends: [\"reviews.default.svc.cluster.local:9080\", \"10.0.0.1:9080\"]
    peers: [mesh-b]
peers:
  - name: mesh-b
    trustDomain: mesh-b.example
    trustBundle: certs/b/ca.pem
    federation: \"gw.mesh-b.example:8008\"
    apiVersion: v1alpha1
    identities: [\"spiffe://mesh-b.example/ns/prod/sa/web\"]
    followTrustBundle: true
    dial: consumer
    allowedNames: [.Mesh-B.Global.]
    limits:
      services: 100
      instancesPerService: 20
      endpointsPerService: 30
      messageBytes: 1048576
      metadataEntries: 8
      metadataBytes: 4096
imports:
  staleAfter: 5m
  cacheDir: /var/lib/elsinore
  portOverrides: { ratings.mesh-b.global: 8080 }
federation:
  window: 128
  ackTimeout: 20s
  snapshotQuietPeriod: 3s
  backoff: { initial: 2s, max: 1m }
proxy:
  vipRange: 127.78.0.0/24
  connectTimeout: 3s
  handshakeTimeout: 4s
  idleTimeout: 90s
  requestTimeout: 2m
  maxConnections: 1000
  http2MaxConcurrentStreams: 50
  tlsResumption: false
  yieldToClients: true
  mode: shared
  shared: { answer: 10.96.0.10, bind: 10.0.0.2 }
  vipListenerBudget: 64
drain: { delay: 7s, timeout: 45s }
";

    /// All of what `/config` shows for [`EVERY_KEY`], value by value.
    #[test]
    fn json_of_a_config_with_every_key() {
        let c = Config::from_yaml_str(EVERY_KEY, Path::new("/etc/elsinore")).unwrap();
        let expected = json!({
            "mesh": { "name": "mesh-a", "trustDomain": "mesh-a.example" },
            "identity": {
                "certificate": "/etc/elsinore/certs/gw.pem",
                "privateKey": "/etc/elsinore/certs/gw.key",
                "trustBundle": "/etc/elsinore/certs/own.pem",
            },
            "listeners": {
                "federation": "0.0.0.0:18008",
                "admin": "127.0.0.1:15100",
                "ingress": "0.0.0.0:15443",
                "egress": "127.0.0.1:15101",
                "dns": "127.0.0.1:15153",
            },
            "advertise": { "address": "gw.mesh-a.example", "port": 16443 },
            "exports": [{
                "name": "reviews",
                "fqdn": "reviews.mesh-a.global",
                "protocol": "GRPC",
                "port": 9081,
                "backends": ["reviews.default.svc.cluster.local:9080", "10.0.0.1:9080"],
                "peers": ["mesh-b"],
            }],
            "peers": [{
                "name": "mesh-b",
                "trustDomain": "mesh-b.example",
                "trustBundle": "/etc/elsinore/certs/b/ca.pem",
                "federation": "gw.mesh-b.example:8008",
                "apiVersion": "v1alpha1",
                "identities": ["spiffe://mesh-b.example/ns/prod/sa/web"],
                "followTrustBundle": true,
                "dial": "consumer",
                "allowedNames": ["mesh-b.global"],
                "limits": {
                    "services": 100,
                    "instancesPerService": 20,
                    "endpointsPerService": 30,
                    "messageBytes": 1048576,
                    "metadataEntries": 8,
                    "metadataBytes": 4096,
                },
            }],
            "imports": {
                "staleAfter": "5m",
                "cacheDir": "/var/lib/elsinore",
                "portOverrides": { "ratings.mesh-b.global": 8080 },
            },
            "federation": {
                "window": 128,
                "ackTimeout": "20s",
                "snapshotQuietPeriod": "3s",
                "backoffInitial": "2s",
                "backoffMax": "1m",
            },
            "proxy": {
                "vipRange": "127.78.0.0/24",
                "connectTimeout": "3s",
                "handshakeTimeout": "4s",
                "idleTimeout": "1m 30s",
                "requestTimeout": "2m",
                "maxConnections": 1000,
                "http2MaxConcurrentStreams": 50,
                "tlsResumption": false,
                "yieldToClients": true,
                "mode": "shared",
                "shared": { "answer": "10.96.0.10", "bind": "10.0.0.2" },
                "vipListenerBudget": 64,
            },
            "drain": { "delay": "7s", "timeout": "45s" },
        });
        assert_eq!(to_json(&c), expected);
    }

    /// What keeps `/config` complete: [`EVERY_KEY`] sets every key of the
    /// raw structs (parsed into them, none is left `None` or empty; no key
    /// is unknown, or it would not parse), and each of its key paths is in
    /// what [`to_json`] shows. A new key fails here until it is set above
    /// and shown.
    #[test]
    fn every_key_of_the_file_is_shown() {
        // The one section /config spells flat: `federation.backoff`.
        const RENAMED: [(&str, &str); 2] = [
            ("/federation/backoff/initial", "/federation/backoffInitial"),
            ("/federation/backoff/max", "/federation/backoffMax"),
        ];
        let raw: crate::config::raw::RawConfig =
            serde_saphyr::from_str_with_options(EVERY_KEY, crate::config::yaml_options()).unwrap();
        let raw = format!("{raw:#?}");
        assert!(
            !["None", "[]", "{}"].iter().any(|unset| raw.contains(unset)),
            "EVERY_KEY leaves a key unset (None or empty):\n{raw}"
        );
        let mut keys = Vec::new();
        leaves(
            String::new(),
            &serde_saphyr::from_str(EVERY_KEY).unwrap(),
            &mut keys,
        );
        let shown = to_json(&Config::from_yaml_str(EVERY_KEY, Path::new("/etc/elsinore")).unwrap());
        let missing: Vec<&String> = keys
            .iter()
            .filter(|key| {
                let at = RENAMED
                    .iter()
                    .find(|(file, _)| file == key)
                    .map_or(key.as_str(), |(_, json)| json);
                shown.pointer(at).is_none_or(Value::is_null)
            })
            .collect();
        assert!(missing.is_empty(), "/config does not show {missing:?}");
    }

    /// The JSON pointers of `v`'s leaves (`/proxy/idleTimeout`,
    /// `/exports/0/backends/1`).
    fn leaves(at: String, v: &Value, keys: &mut Vec<String>) {
        match v {
            Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    leaves(format!("{at}/{i}"), item, keys);
                }
            }
            Value::Object(o) => {
                for (key, item) in o {
                    leaves(format!("{at}/{key}"), item, keys);
                }
            }
            _ => keys.push(at),
        }
    }

    #[test]
    fn json_spells_keys_as_yaml_and_fills_defaults() {
        let v = to_json(&config("proxy: { idleTimeout: 90s }\n"));
        assert_eq!(v["identity"]["privateKey"], "/etc/elsinore/certs/gw.key");
        assert_eq!(v["peers"][0]["trustBundle"], "/etc/elsinore/b.pem");
        assert_eq!(v["peers"][0]["federation"], "gw.b:8008");
        assert_eq!(v["peers"][0]["apiVersion"], "v1alpha2");
        assert_eq!(v["proxy"]["idleTimeout"], "1m 30s");
        assert_eq!(v["proxy"]["vipRange"], "127.77.0.0/16");
        assert_eq!(v["listeners"]["admin"], "127.0.0.1:15000");
        assert_eq!(v["exports"][0]["protocol"], "HTTP");
        assert_eq!(v["exports"][0]["fqdn"], "reviews.mesh-a.global");
        assert_eq!(v["imports"]["cacheDir"], Value::Null);
    }

    #[test]
    fn changed_keys_name_each_leaf_by_yaml_path() {
        let a = config("");
        assert!(changed_keys(&a, &a).is_empty());
        let b = config(
            "proxy: { idleTimeout: 90s, tlsResumption: false }\nlisteners: { admin: \"0.0.0.0:15000\" }\n",
        );
        assert_eq!(
            changed_keys(&a, &b),
            [
                "listeners.admin",
                "proxy.idleTimeout",
                "proxy.tlsResumption"
            ]
        );
        let mut c = a.clone();
        c.peers.push(c.peers[0].clone());
        assert_eq!(changed_keys(&a, &c), ["peers"]);
        c.peers.pop();
        c.peers[0].federation = None;
        assert_eq!(changed_keys(&a, &c), ["peers[0].federation"]);
    }

    #[test]
    fn reload_status_applies_live_sections_and_lists_the_rest() {
        let a = config("");
        let mut next = config("proxy: { requestTimeout: 2s }\n");
        next.exports[0].port = 9999;
        next.advertise.port = 16443;
        let status = crate::reload::ConfigStatus::new(a.clone()).apply(&next);
        assert_eq!(status.running.exports[0].port, 9999);
        assert_eq!(status.running.advertise.port, 16443);
        assert_eq!(status.running.proxy, a.proxy);
        assert_eq!(status.pending_restart, ["proxy.requestTimeout"]);
        // Back to the running value: nothing pending any more.
        let back = status.apply(&a);
        assert!(back.pending_restart.is_empty());
    }
}
