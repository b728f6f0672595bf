//! The effective configuration as JSON, for the admin `/config` endpoint,
//! and the list of keys that differ between two configs, for the reloader
//! to name what needs a restart. Keys are spelled as in the YAML file
//! (camelCase), durations in humantime form, defaults filled in.
//!
//! The config holds no secret material: the identity's private key and the
//! trust bundles are named by path, and only the paths are shown, never the
//! files' content. Every struct is destructured field by field, so a new
//! config key fails to compile here until it is shown (and, through
//! [`changed_keys`], reported on reload).

use serde_json::{Value, json};

use super::{
    Advertise, Config, Export, FederationTuning, HostPort, IdentityFiles, Imports, Listeners, Mesh,
    Peer, ProxyTuning,
};

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
    let Export {
        name,
        fqdn,
        protocol,
        port,
        backends,
        peers,
    } = e;
    json!({
        "name": name,
        "fqdn": fqdn,
        "protocol": protocol.as_str(),
        "port": port,
        "backends": backends.iter().map(host_port).collect::<Vec<_>>(),
        "peers": peers,
    })
}

fn peer(p: &Peer) -> Value {
    let Peer {
        name,
        trust_domain,
        trust_bundle,
        federation,
        api_version,
        identities,
        follow_trust_bundle,
        dial,
        allowed_names,
        limits,
    } = p;
    let crate::config::PeerLimits {
        services,
        instances_per_service,
        endpoints_per_service,
        message_bytes,
        metadata_entries,
        metadata_bytes,
    } = limits;
    json!({
        "name": name,
        "trustDomain": trust_domain.as_str(),
        "trustBundle": path(trust_bundle),
        "federation": federation.as_ref().map(host_port),
        "apiVersion": api_version.as_str(),
        "identities": identities.to_strings(trust_domain),
        "followTrustBundle": follow_trust_bundle,
        "dial": dial.as_str(),
        "allowedNames": allowed_names,
        "limits": {
            "services": services,
            "instancesPerService": instances_per_service,
            "endpointsPerService": endpoints_per_service,
            "messageBytes": message_bytes,
            "metadataEntries": metadata_entries,
            "metadataBytes": metadata_bytes,
        },
    })
}

/// The whole config as JSON: what `/config` serves.
/// Long because it names every key of the config exhaustively (each
/// struct destructured), so a new key fails to compile until `/config`
/// shows it.
pub fn to_json(config: &Config) -> Value {
    let Config {
        mesh,
        identity,
        listeners,
        advertise,
        exports,
        peers,
        imports,
        federation,
        proxy,
        drain,
    } = config;
    let crate::config::Drain {
        delay: drain_delay,
        timeout: drain_timeout,
    } = drain;
    let Mesh { name, trust_domain } = mesh;
    let IdentityFiles {
        certificate,
        private_key,
        trust_bundle: own_bundle,
    } = identity;
    let Listeners {
        federation: federation_listener,
        admin,
        ingress,
        egress,
        dns,
    } = listeners;
    let Advertise { address, port } = advertise;
    let Imports {
        stale_after,
        cache_dir,
        port_overrides,
    } = imports;
    let FederationTuning {
        window,
        ack_timeout,
        snapshot_quiet_period,
        backoff_initial,
        backoff_max,
    } = federation;
    let ProxyTuning {
        vip_range,
        connect_timeout,
        handshake_timeout,
        idle_timeout,
        request_timeout,
        max_connections,
        http2_max_concurrent_streams,
        tls_resumption,
        yield_to_clients,
        mode,
        vip_listener_budget,
    } = proxy;
    let (mode, shared) = match mode {
        crate::config::EgressMode::Vip => ("vip", Value::Null),
        crate::config::EgressMode::Shared { answer, bind } => {
            let answer = match answer {
                crate::config::SharedAnswer::Address(ip) => ip.to_string(),
                crate::config::SharedAnswer::Cname(name) => name.clone(),
            };
            (
                "shared",
                json!({ "answer": answer, "bind": bind.to_string() }),
            )
        }
    };
    let off = |a: &Option<std::net::SocketAddr>| match a {
        Some(a) => Value::String(a.to_string()),
        None => Value::String("off".to_owned()),
    };
    json!({
        "mesh": { "name": name, "trustDomain": trust_domain.as_str() },
        "identity": {
            "certificate": path(certificate),
            "privateKey": path(private_key),
            "trustBundle": own_bundle.as_deref().map(path),
        },
        "listeners": {
            "federation": federation_listener.to_string(),
            "admin": admin.to_string(),
            "ingress": off(ingress),
            "egress": off(egress),
            "dns": off(dns),
        },
        "advertise": { "address": address, "port": port },
        "exports": exports.iter().map(export).collect::<Vec<_>>(),
        "peers": peers.iter().map(peer).collect::<Vec<_>>(),
        "imports": {
            "staleAfter": duration(*stale_after),
            "cacheDir": cache_dir.as_deref().map(path),
            "portOverrides": port_overrides,
        },
        "federation": {
            "window": window,
            "ackTimeout": duration(*ack_timeout),
            "snapshotQuietPeriod": duration(*snapshot_quiet_period),
            "backoffInitial": duration(*backoff_initial),
            "backoffMax": duration(*backoff_max),
        },
        "proxy": {
            "vipRange": vip_range.to_string(),
            "connectTimeout": duration(*connect_timeout),
            "handshakeTimeout": duration(*handshake_timeout),
            "idleTimeout": duration(*idle_timeout),
            "requestTimeout": duration(*request_timeout),
            "maxConnections": max_connections,
            "http2MaxConcurrentStreams": http2_max_concurrent_streams,
            "tlsResumption": tls_resumption,
            "yieldToClients": yield_to_clients,
            "mode": mode,
            "shared": shared,
            "vipListenerBudget": vip_listener_budget,
        },
        "drain": {
            "delay": duration(*drain_delay),
            "timeout": duration(*drain_timeout),
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
