//! Every metric name the gateway exposes, rendered in the Prometheus text
//! format for `/metrics`. Names are `elsinore_*`; labels are bounded (peer
//! names from config, refusal reasons, error sides), never addresses,
//! nonces or service names sent by peers.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::proxy::egress::EgressStats;
use crate::proxy::ingress::IngressStats;
use crate::state::{OwnerCounters, Shared};

/// Appends one metric family: `# HELP`, `# TYPE`, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn one(value: u64) -> Vec<(String, u64)> {
    vec![(String::new(), value)]
}

/// Renders all metrics of one gateway.
pub fn render(shared: &Shared, ingress: &IngressStats, egress: &EgressStats) -> String {
    let mut out = String::with_capacity(4096);
    let peers = &shared.peers;
    let per_peer = |f: &dyn Fn(&crate::state::PeerState) -> u64| -> Vec<(String, u64)> {
        peers
            .iter()
            .map(|p| (format!("peer=\"{}\"", p.config.name), f(p)))
            .collect()
    };
    family(
        &mut out,
        "elsinore_build_info",
        "gauge",
        "Always 1; the labels name the version and the commit it was built from.",
        &[(
            format!(
                "version=\"{}\",commit=\"{}\"",
                crate::cli::VERSION,
                crate::cli::COMMIT
            ),
            1,
        )],
    );
    family(
        &mut out,
        "elsinore_exports",
        "gauge",
        "Services exported by this gateway.",
        &one(shared.exports.borrow().len() as u64),
    );
    family(
        &mut out,
        "elsinore_imports",
        "gauge",
        "Imported services registered under a name (after aliasing).",
        &one(shared.imports.borrow().by_fqdn.len() as u64),
    );
    family(
        &mut out,
        "elsinore_import_collisions",
        "gauge",
        "Imports whose FQDN was taken (aliased or dropped).",
        &one(shared.imports.borrow().collisions.len() as u64),
    );
    family(
        &mut out,
        "elsinore_federation_consumer_connected",
        "gauge",
        "1 while our stream to the peer is open.",
        &per_peer(&|p| u64::from(p.consumer.borrow().connected)),
    );
    family(
        &mut out,
        "elsinore_federation_consumer_imported",
        "gauge",
        "Services held from the peer (including stale ones).",
        &per_peer(&|p| p.consumer.borrow().services.len() as u64),
    );
    for (name, help, f) in [
        (
            "elsinore_federation_consumer_messages_total",
            "Responses received from the peer.",
            (|p: &crate::state::PeerState| p.consumer.borrow().messages) as fn(&_) -> u64,
        ),
        (
            "elsinore_federation_consumer_acks_total",
            "Responses we ACKed.",
            |p| p.consumer.borrow().acks,
        ),
        (
            "elsinore_federation_consumer_nacks_total",
            "Responses we NACKed.",
            |p| p.consumer.borrow().nacks,
        ),
        (
            "elsinore_federation_consumer_reconnects_total",
            "Reconnects after a lost stream.",
            |p| p.consumer.borrow().reconnects,
        ),
        (
            "elsinore_federation_owner_streams_open",
            "Streams the peer has open to us.",
            |p| OwnerCounters::get(&p.owner.streams_open),
        ),
        (
            "elsinore_federation_owner_messages_sent_total",
            "Responses we sent the peer.",
            |p| OwnerCounters::get(&p.owner.sent),
        ),
        (
            "elsinore_federation_owner_acks_total",
            "ACKs the peer sent us.",
            |p| OwnerCounters::get(&p.owner.acks),
        ),
        (
            "elsinore_federation_owner_nacks_total",
            "NACKs the peer sent us.",
            |p| OwnerCounters::get(&p.owner.nacks),
        ),
    ] {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(&mut out, name, kind, help, &per_peer(&f));
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    family(
        &mut out,
        "elsinore_ingress_connections_total",
        "counter",
        "Connections accepted by the ingress listener.",
        &one(load(&ingress.accepted)),
    );
    family(
        &mut out,
        "elsinore_ingress_connections_active",
        "gauge",
        "Ingress connections open now.",
        &one(load(&ingress.active)),
    );
    family(
        &mut out,
        "elsinore_ingress_refused_total",
        "counter",
        "Ingress connections refused, by reason.",
        &ingress
            .refusals()
            .map(|(reason, n)| (format!("reason=\"{reason}\""), n))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "elsinore_ingress_http_requests_total",
        "counter",
        "HTTP requests received from peers.",
        &one(load(&ingress.http_requests)),
    );
    family(
        &mut out,
        "elsinore_ingress_misdirected_total",
        "counter",
        "HTTP requests answered 421 (Host does not match the SNI).",
        &one(load(&ingress.misdirected)),
    );
    family(
        &mut out,
        "elsinore_ingress_upstream_errors_total",
        "counter",
        "Ingress connections or requests that failed at the backend.",
        &one(load(&ingress.upstream_errors)),
    );
    let table = shared.vips.borrow().clone();
    family(
        &mut out,
        "elsinore_egress_port_collisions",
        "gauge",
        "Shared mode: imports left without a route because another import holds their port.",
        &one(table.port_collisions().len() as u64),
    );
    family(
        &mut out,
        "elsinore_egress_vip_unassigned",
        "gauge",
        "VIP mode: imports without an address because the VIP range is full.",
        &one(table.unassigned().len() as u64),
    );
    family(
        &mut out,
        "elsinore_egress_import_listeners",
        "gauge",
        "Import listeners bound (one per VIP, or per port in shared mode).",
        &one(load(&egress.listeners)),
    );
    family(
        &mut out,
        "elsinore_egress_import_listener_budget",
        "gauge",
        "Most import listeners egress may hold (from the open-file limit or proxy.vipListenerBudget).",
        &one(load(&egress.listener_budget)),
    );
    family(
        &mut out,
        "elsinore_egress_import_listener_bind_failures_total",
        "counter",
        "Failed binds of import listeners (each address retried with exponential backoff).",
        &one(load(&egress.bind_failures)),
    );
    let unbound = egress.unbound();
    let count = |reason: &str| unbound.iter().filter(|u| u.reason == reason).count() as u64;
    family(
        &mut out,
        "elsinore_egress_unbound_listeners",
        "gauge",
        "Import listeners wanted but not held, by reason (budget: beyond the listener budget; bind: bind failing, retried with backoff).",
        &[
            ("reason=\"budget\"".to_owned(), count("budget")),
            ("reason=\"bind\"".to_owned(), count("bind")),
        ],
    );
    let e = egress.snapshot();
    family(
        &mut out,
        "elsinore_egress_connections_total",
        "counter",
        "Connections accepted from local apps.",
        &one(e.connections),
    );
    family(
        &mut out,
        "elsinore_egress_refused_total",
        "counter",
        "Egress connections closed because the listener was at its connection cap.",
        &one(e.refused_over_cap),
    );
    family(
        &mut out,
        "elsinore_egress_upstream_connects_total",
        "counter",
        "New mTLS connections to remote gateways.",
        &one(e.upstream_connects),
    );
    family(
        &mut out,
        "elsinore_egress_upstream_handshake_failures_total",
        "counter",
        "mTLS handshakes to remote gateways that failed (including identity checks).",
        &one(e.upstream_handshake_failures),
    );
    family(
        &mut out,
        "elsinore_egress_http_requests_total",
        "counter",
        "HTTP requests carried across.",
        &one(e.requests),
    );
    family(
        &mut out,
        "elsinore_egress_errors_total",
        "counter",
        "Egress failures by the side that failed.",
        &[
            ("side=\"downstream\"".to_owned(), e.errors_downstream),
            ("side=\"upstream\"".to_owned(), e.errors_upstream),
            ("side=\"internal\"".to_owned(), e.errors_internal),
        ],
    );
    tls(&mut out, shared);
    family(
        &mut out,
        "elsinore_draining",
        "gauge",
        "1 once SIGTERM started the drain (/ready fails).",
        &one(u64::from(shared.draining.load(Ordering::Acquire))),
    );
    out
}

/// Certificate expiry and rotations (see `credentials`).
fn tls(out: &mut String, shared: &Shared) {
    use crate::credentials::{Kind, REFUSAL_REASONS};
    let status = shared.tls_status.snapshot();
    let expiry = |kind: Kind| status.expiry.iter().filter(move |e| e.0 == kind);
    family(
        out,
        "elsinore_tls_identity_expiry_timestamp_seconds",
        "gauge",
        "notAfter of the identity certificate in use, in seconds since the Unix epoch.",
        &one(expiry(Kind::Identity).map(|e| e.2).next().unwrap_or(0)),
    );
    family(
        out,
        "elsinore_tls_bundle_expiry_timestamp_seconds",
        "gauge",
        "notAfter of the earliest-expiring CA in the peer's trust bundle in use, in seconds since the Unix epoch.",
        &expiry(Kind::Bundle)
            .map(|(_, peer, at)| (format!("peer=\"{peer}\""), *at))
            .collect::<Vec<_>>(),
    );
    let kinds = [Kind::Identity, Kind::Bundle];
    family(
        out,
        "elsinore_tls_rotations_total",
        "counter",
        "New TLS material published without a restart, by what changed.",
        &kinds
            .iter()
            .map(|k| {
                let n = status.rotations.get(k).copied().unwrap_or(0);
                (format!("kind=\"{}\"", k.label()), n)
            })
            .collect::<Vec<_>>(),
    );
    family(
        out,
        "elsinore_tls_rotations_refused_total",
        "counter",
        "New certificate, key or bundle files refused (the old material stays in use), by what and why.",
        &kinds
            .iter()
            .flat_map(|k| REFUSAL_REASONS.iter().map(move |r| (*k, *r)))
            .map(|(k, r)| {
                let n = status.refused.get(&(k, r)).copied().unwrap_or(0);
                (format!("kind=\"{}\",cause=\"{r}\"", k.label()), n)
            })
            .collect::<Vec<_>>(),
    );
}

#[cfg(test)]
mod build_info_tests {
    #[test]
    fn build_info_names_version_and_commit() {
        let shared = crate::state::new_shared(
            "mesh-a".to_owned(),
            crate::catalog::ExportCatalog::default(),
            &[],
        );
        let text = super::render(&shared, &Default::default(), &Default::default());
        let line = format!(
            "elsinore_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("ELSINORE_COMMIT")
        );
        assert!(text.lines().any(|l| l == line), "{text}");
        assert!(text.contains("# TYPE elsinore_build_info gauge"));
    }
}
