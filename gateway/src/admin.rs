//! The admin HTTP listener: `/live`, `/ready`, `/catalog` (and
//! `/catalog?peer=NAME`, the catalog as one peer sees it), `/peers`,
//! `/config`, `/metrics`. Read only; it reads the shared snapshots and
//! never blocks the other rooms.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::federation::status::{ConsumerView, OwnerCounters};
use crate::proxy::egress::EgressStats;
use crate::proxy::ingress::IngressStats;
use crate::state::Shared;

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ingress: Arc<IngressStats>,
    pub egress: Arc<EgressStats>,
    /// The effective config and the keys waiting for a restart (`/config`).
    pub config: tokio::sync::watch::Receiver<Arc<crate::reload::ConfigStatus>>,
}

/// Serves the admin API until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    use elsinore_transport::accept;
    // Never capped so far (an operator's and a prober's listener, on an
    // address of its own); the cap is only the loop's upper bound.
    let connections = accept::Connections::new(usize::MAX);
    let settings = accept::Settings::new("admin");
    let stop = shutdown.clone();
    accept::serve(
        listener,
        settings,
        connections,
        stop,
        accept::Hooks::default(),
        |tcp, _, slot| {
            let state = state.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req)) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        },
    )
    .await;
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let shared = &state.shared;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            let (ready, waiting) = readiness(shared);
            if shared.draining.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: draining for shutdown\n",
                )
            } else if ready {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: waiting for {}\n", waiting.join(", ")),
                )
            }
        }
        "/catalog" if query_peer(req).is_some() => {
            let peer = query_peer(req).unwrap_or_default();
            match peer_catalog_json(shared, &peer) {
                Some(doc) => json_response(doc),
                None => {
                    let known: Vec<&str> = shared
                        .peers
                        .iter()
                        .map(|p| p.config.name.as_str())
                        .collect();
                    text(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "unknown peer {peer:?} (configured peers: {})\n",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    )
                }
            }
        }
        "/catalog" => {
            let mut doc = catalog_json(shared);
            doc["egress"] = egress_json(shared, &state.egress);
            json_response(doc)
        }
        "/peers" => json_response(peers_json(shared)),
        "/config" => json_response(config_json(&state.config.borrow())),
        "/metrics" => {
            let mut r = text(
                StatusCode::OK,
                &crate::metrics::render(shared, &state.ingress, &state.egress),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /catalog, /peers, /config, /metrics\n",
        ),
    }
}

/// Ready when the listeners are bound and every peer we dial has synced or
/// failed once, and not draining.
pub fn readiness(shared: &Shared) -> (bool, Vec<String>) {
    let mut waiting = Vec::new();
    if shared.draining.load(Ordering::Acquire) {
        // SIGTERM: out of rotation at once, whatever else holds.
        return (false, vec!["draining".to_owned()]);
    }
    if !shared.listeners_bound.load(Ordering::Acquire) {
        waiting.push("listeners".to_owned());
    }
    for peer in &shared.peers {
        if !peer.consumer.borrow().attempted {
            waiting.push(format!("peer {}", peer.config.name));
        }
    }
    (waiting.is_empty(), waiting)
}

/// The `/catalog` document: exports, and imports per peer with sync state.
pub fn catalog_json(shared: &Shared) -> Value {
    let exports = shared.exports.borrow().clone();
    let imports = shared.imports.borrow().clone();
    let exports: Vec<Value> = exports
        .iter()
        .map(|(name, e)| {
            json!({
                "name": name,
                "fqdn": e.service.fqdn,
                "protocol": e.protocol.as_str(),
                "port": e.port,
                "backends": e.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
                "peers": e.peers,
            })
        })
        .collect();
    let mut per_peer = serde_json::Map::new();
    for (peer, view) in consumer_views(shared) {
        let mut services: Vec<Value> = imports
            .for_peer(&peer)
            .map(|(registered, r)| {
                json!({
                    "name": r.name,
                    "fqdn": registered,
                    "originalFqdn": r.original_fqdn,
                    "aliased": r.alias,
                })
            })
            .collect();
        services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        per_peer.insert(
            peer,
            json!({
                "state": view.state,
                "detail": view.detail,
                "snapshotComplete": view.snapshot_complete,
                "services": services,
            }),
        );
    }
    let collisions: Vec<Value> = imports
        .collisions
        .iter()
        .map(|c| json!({ "peer": c.peer, "name": c.name, "fqdn": c.fqdn, "with": c.with.to_string(), "resolution": match &c.resolution {
            crate::catalog::Resolution::Aliased(alias) => format!("aliased as {alias}"),
            crate::catalog::Resolution::Dropped => "dropped".to_owned(),
        } }))
        .collect();
    json!({
        "mesh": shared.mesh,
        "exports": exports,
        "imports": per_peer,
        "collisions": collisions,
    })
}

/// The `egress` part of `/catalog`: what the address table could not give
/// a route (shared-mode port collisions, a full VIP range) and the import
/// listeners egress holds, against its budget, with those it does not.
pub fn egress_json(shared: &Shared, egress: &EgressStats) -> Value {
    let table = shared.vips.borrow().clone();
    let mode = match table.shared_answer() {
        None => json!({ "mode": "vip" }),
        Some(crate::config::SharedAnswer::Address(ip)) => {
            json!({ "mode": "shared", "answer": ip.to_string() })
        }
        Some(crate::config::SharedAnswer::Cname(name)) => {
            json!({ "mode": "shared", "answer": name })
        }
    };
    let port_collisions: Vec<Value> = table
        .port_collisions()
        .iter()
        .map(|c| {
            json!({
                "fqdn": &*c.fqdn,
                "peer": c.peer,
                "protocol": c.protocol,
                "port": c.port,
                "heldBy": c.holder,
            })
        })
        .collect();
    let unbound: Vec<Value> = egress
        .unbound()
        .iter()
        .map(|u| json!({ "address": u.addr.to_string(), "import": u.what, "reason": u.reason, "error": u.error }))
        .collect();
    let budget = egress.listener_budget.load(Ordering::Relaxed);
    json!({
        "mode": mode["mode"],
        "answer": mode.get("answer"),
        "listeners": egress.listeners.load(Ordering::Relaxed),
        "listenerBudget": if budget == u64::MAX { Value::Null } else { json!(budget) },
        "unbound": unbound,
        "portCollisions": port_collisions,
        "unassigned": table.unassigned().iter().map(|f| &**f).collect::<Vec<_>>(),
    })
}

/// The `/config` document: the effective config (file paths, never the
/// content of keys or certificates), the version, and the keys changed in
/// the file that wait for a restart.
pub fn config_json(status: &crate::reload::ConfigStatus) -> Value {
    json!({
        "version": crate::cli::VERSION,
        "commit": crate::cli::COMMIT,
        "config": crate::config::effective::to_json(&status.running),
        "pendingRestart": status.pending_restart,
    })
}

/// The `peer` parameter of the query string, if any (peer names are DNS
/// labels: nothing to percent-decode).
fn query_peer(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("peer="))
        .map(str::to_owned)
}

/// `/catalog?peer=NAME`: what `peer` receives from us (our exports it may
/// see, as the owner encodes them in its API version: encoded and decoded
/// again, so a field the version cannot carry is not shown) and what we
/// hold from it, each entry with its state: `imported` (under its own
/// FQDN), `aliased` (under `registeredAs`), `dropped` (its alias was taken
/// too), and the entries refused lately (`refused`, with the rule and the
/// NACK's message). `None` for a peer not in the config.
pub fn peer_catalog_json(shared: &Shared, peer: &str) -> Option<Value> {
    use elsinore_federation_api::{decode_any, encode_any};
    let state = shared.peers.iter().find(|p| p.config.name == peer)?;
    let version = state.config.api_version;
    let receives: Vec<Value> = shared
        .exports
        .borrow()
        .visible_to(peer)
        .values()
        .map(|svc| {
            let any = encode_any(svc, version);
            let mut doc = match decode_any(&any, version) {
                Ok(sent) => json!(sent),
                // Our own exports always decode; say so if one did not.
                Err(e) => json!({ "name": svc.name, "error": e.to_string() }),
            };
            doc["encodedBytes"] = json!(any.value.len());
            doc
        })
        .collect();
    let view = state.consumer.borrow().clone();
    let imports = shared.imports.borrow().clone();
    let registered: BTreeMap<&str, (&str, bool)> = imports
        .for_peer(peer)
        .map(|(fqdn, r)| (r.name.as_str(), (fqdn, r.alias)))
        .collect();
    let mut held: Vec<Value> = view
        .services
        .iter()
        .map(|svc| {
            let (state, registered_as) = match registered.get(svc.name.as_str()) {
                Some((fqdn, false)) => ("imported", Some(*fqdn)),
                Some((fqdn, true)) => ("aliased", Some(*fqdn)),
                None => ("dropped", None),
            };
            json!({
                "name": svc.name,
                "fqdn": svc.fqdn,
                "state": state,
                "registeredAs": registered_as,
            })
        })
        .collect();
    held.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let refused: Vec<Value> = view
        .refusals
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "fqdn": r.fqdn,
                "state": "refused",
                "rule": r.rule.map_or("invalid", |rule| rule.as_str()),
                "message": r.message,
                "heldFromBefore": view.services.iter().any(|s| s.name == r.name),
            })
        })
        .collect();
    Some(json!({
        "mesh": shared.mesh,
        "peer": peer,
        "apiVersion": version.as_str(),
        "receives": receives,
        "held": held,
        "refused": refused,
        "consumer": { "state": view.state, "detail": view.detail },
    }))
}

/// The `/peers` document: both roles of every peer.
pub fn peers_json(shared: &Shared) -> Value {
    let tls = shared.tls_status.snapshot();
    let peers: Vec<Value> = shared
        .peers
        .iter()
        .map(|p| {
            let c = p.consumer.borrow().clone();
            let o = &p.owner;
            let owner_last_nack = o.last_nack.lock().ok().and_then(|g| g.clone());
            json!({
                "name": p.config.name,
                "trustDomain": p.config.trust_domain.as_str(),
                "apiVersion": p.config.api_version.as_str(),
                "federation": p.config.federation.as_ref().map(|h| h.to_string()),
                "trust": tls.trust.get(&p.config.name),
                "consumer": {
                    "state": c.state,
                    "detail": c.detail,
                    "connected": c.connected,
                    "snapshotComplete": c.snapshot_complete,
                    "messages": c.messages,
                    "acks": c.acks,
                    "nacks": c.nacks,
                    "reconnects": c.reconnects,
                    "lastAck": c.last_ack_at.map(unix),
                    "lastNack": c.last_nack.as_ref().map(|(s, m)| json!({"service": s, "message": m})),
                    "imported": c.services.len(),
                    "refused": c.refused.iter().map(|(rule, n)| (rule.as_str().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
                },
                "owner": {
                    "streamsOpen": OwnerCounters::get(&o.streams_open),
                    "streamsTotal": OwnerCounters::get(&o.streams_total),
                    "sent": OwnerCounters::get(&o.sent),
                    "acks": OwnerCounters::get(&o.acks),
                    "nacks": OwnerCounters::get(&o.nacks),
                    "unknownNonces": OwnerCounters::get(&o.unknown_nonces),
                    "lastNack": owner_last_nack.map(|(s, m)| json!({"service": s, "message": m})),
                    "window": OwnerCounters::get(&o.window),
                },
                "dial": p.config.dial.as_str(),
            })
        })
        .collect();
    json!({ "mesh": shared.mesh, "peers": peers })
}

/// The consumer views by peer name.
fn consumer_views(shared: &Shared) -> BTreeMap<String, Arc<ConsumerView>> {
    shared
        .peers
        .iter()
        .map(|p| (p.config.name.clone(), p.consumer.borrow().clone()))
        .collect()
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::catalog::exports::ExportCatalog;
    use crate::config::{ApiVersion, HostPort, Peer};
    use crate::federation::status::ConsumerState;
    use crate::state::new_shared;

    fn peer(name: &str, dialed: bool) -> Peer {
        let trust_domain = format!("{name}.example").parse().unwrap();
        Peer {
            identities: crate::config::PeerIdentities::gateway_of(&trust_domain),
            follow_trust_bundle: false,
            name: name.to_owned(),
            trust_domain,
            trust_bundle: format!("certs/{name}/ca.pem").into(),
            federation: dialed.then(|| HostPort {
                host: "127.0.0.1".into(),
                port: 15001,
            }),
            api_version: ApiVersion::V1alpha2,
            dial: crate::config::DialMode::Consumer,
            allowed_names: vec!["global".to_owned()],
            limits: crate::config::PeerLimits::default(),
        }
    }

    fn svc(name: &str, fqdn: &str) -> Arc<elsinore_federation_api::FederatedService> {
        use elsinore_federation_api::{Endpoint, FederatedService, Instance, Protocol, StringMap};
        Arc::new(FederatedService {
            name: name.into(),
            description: String::new(),
            tags: Vec::new(),
            labels: StringMap::new(),
            fqdn: fqdn.into(),
            endpoints: vec![Endpoint {
                address: "192.0.2.1".into(),
                port: 15443,
                labels: Vec::new(),
                description: String::new(),
            }],
            sans: vec!["spiffe://mesh-b.example/gw".into()],
            instances: vec![Instance {
                id: "v1".into(),
                protocol: Protocol::Http,
                metadata: StringMap::new(),
                endpoint_selector: Vec::new(),
                description: String::new(),
            }],
        })
    }

    /// What a peer receives (our exports it may see, as encoded for its
    /// version) and what we hold from it: imported, aliased, dropped,
    /// refused with the rule.
    #[test]
    fn catalog_as_a_peer_sees_it() {
        use crate::catalog::claims::Rule;
        use crate::federation::consumer::session::RefusalRecord;
        let mut b = peer("mesh-b", true);
        b.api_version = ApiVersion::V1alpha1;
        let peers = [b, peer("mesh-c", true)];
        let cfg = crate::config::Config::from_yaml_str(
            "mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: c.pem, privateKey: k.pem }
advertise: { address: gw.mesh-a.example, port: 15443 }
exports:
  - { name: reviews, protocol: HTTP, backends: [\"10.0.0.1:9080\"], peers: [mesh-b] }
  - { name: secret, protocol: HTTP, backends: [\"10.0.0.1:9081\"], peers: [mesh-c] }
peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }
  - { name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem }
",
            std::path::Path::new("/"),
        )
        .unwrap();
        let id = elsinore_certs::SpiffeId::gateway("mesh-a.example".parse().unwrap());
        let exports = ExportCatalog::from_config(&cfg, &id);
        let shared = new_shared("mesh-a".into(), exports.clone(), &peers);
        let from_b = vec![
            svc("ratings", "ratings.global"),
            svc("details", "details.global"),
        ];
        let from_c = vec![svc("ratings", "ratings.global")];
        // mesh-c's ratings wins nothing: mesh-b is listed first.
        let view = crate::catalog::imports::merge(
            &exports,
            &[("mesh-b".into(), from_b.clone()), ("mesh-c".into(), from_c)],
            &Default::default(),
        );
        shared.imports.send_replace(Arc::new(view));
        shared.peers[0]
            .consumer
            .send_replace(Arc::new(ConsumerView {
                services: from_b,
                refusals: vec![RefusalRecord {
                    name: "k8s".into(),
                    fqdn: "kubernetes.default.svc.cluster.local".into(),
                    rule: Some(Rule::ClusterLocal),
                    message: "rejected service \"k8s\": fqdn ... cluster-local".into(),
                }],
                ..ConsumerView::default()
            }));

        let doc = peer_catalog_json(&shared, "mesh-b").unwrap();
        assert_eq!(doc["apiVersion"], "v1alpha1");
        let receives = doc["receives"].as_array().unwrap();
        assert_eq!(receives.len(), 1, "{doc:#}");
        assert_eq!(receives[0]["name"], "reviews");
        assert_eq!(receives[0]["fqdn"], "reviews.mesh-a.global");
        assert_eq!(receives[0]["sans"][0], id.to_string(), "{doc:#}");
        assert!(receives[0]["encodedBytes"].as_u64().unwrap() > 0);
        // As v1alpha1 carries it: protocols only, so no SNI or PORT.
        assert_eq!(receives[0]["instances"][0]["id"], "http", "{doc:#}");
        assert_eq!(receives[0]["instances"][0]["metadata"], json!({}));
        assert_eq!(doc["held"][0]["name"], "details");
        assert_eq!(doc["held"][0]["state"], "imported");
        assert_eq!(doc["held"][0]["registeredAs"], "details.global");
        assert_eq!(doc["held"][1]["name"], "ratings");
        assert_eq!(doc["held"][1]["state"], "imported");
        assert_eq!(doc["refused"][0]["name"], "k8s");
        assert_eq!(doc["refused"][0]["state"], "refused");
        assert_eq!(doc["refused"][0]["rule"], "cluster-local");
        assert_eq!(doc["refused"][0]["heldFromBefore"], false);

        shared.peers[1]
            .consumer
            .send_replace(Arc::new(ConsumerView {
                services: vec![svc("ratings", "ratings.global")],
                ..ConsumerView::default()
            }));
        let doc = peer_catalog_json(&shared, "mesh-c").unwrap();
        assert_eq!(doc["receives"][0]["name"], "secret", "{doc:#}");
        assert_eq!(doc["held"][0]["state"], "aliased", "{doc:#}");
        assert_eq!(doc["held"][0]["registeredAs"], "ratings.mesh-c.global");
        assert!(peer_catalog_json(&shared, "mesh-x").is_none());
    }

    /// Not ready until the listeners are bound and every dialed peer has
    /// synced or failed once; a peer we only serve is never waited for.
    #[test]
    fn ready_needs_bound_listeners_and_every_dialed_peer_attempted() {
        let peers = [
            peer("mesh-b", true),
            peer("mesh-c", false),
            peer("mesh-d", true),
        ];
        let shared = new_shared("mesh-a".into(), ExportCatalog::default(), &peers);
        assert_eq!(
            readiness(&shared),
            (
                false,
                vec![
                    "listeners".to_owned(),
                    "peer mesh-b".to_owned(),
                    "peer mesh-d".to_owned()
                ]
            )
        );
        shared.listeners_bound.store(true, Ordering::Release);
        let attempted = |i: usize, state: ConsumerState| {
            shared.peers[i]
                .consumer
                .send_replace(Arc::new(ConsumerView {
                    state,
                    attempted: true,
                    ..ConsumerView::default()
                }));
        };
        attempted(0, ConsumerState::Synced);
        assert_eq!(readiness(&shared), (false, vec!["peer mesh-d".to_owned()]));
        attempted(2, ConsumerState::Failed);
        assert_eq!(readiness(&shared), (true, vec![]));
    }
}
