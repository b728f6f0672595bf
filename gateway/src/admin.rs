//! The admin HTTP listener: `/live`, `/ready`, `/catalog`, `/peers`,
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

/// The `/peers` document: both roles of every peer.
pub fn peers_json(shared: &Shared) -> Value {
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
                },
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
        Peer {
            name: name.to_owned(),
            trust_domain: format!("{name}.example").parse().unwrap(),
            trust_bundle: format!("certs/{name}/ca.pem").into(),
            federation: dialed.then(|| HostPort {
                host: "127.0.0.1".into(),
                port: 15001,
            }),
            api_version: ApiVersion::V1alpha2,
            allowed_names: vec!["global".to_owned()],
            limits: crate::config::PeerLimits::default(),
        }
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
