//! Every metric name the gateway exposes, rendered in the Prometheus text
//! format for `/metrics`. Names are `elsinore_*`; labels are bounded (peer
//! names from config, refusal reasons, error sides), never addresses or
//! nonces. The one label from the catalogs is `service` of the request
//! histograms ([`RouteLatency`]): its series live only while their route is
//! in the catalog, so there are never more than the imports or exports.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::federation::status::OwnerCounters;
use crate::proxy::egress::EgressStats;
use crate::proxy::ingress::IngressStats;
use crate::state::Shared;

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

/// Upper bounds of the latency buckets, in seconds (`le` labels).
const BUCKETS: [(&str, u64); 13] = [
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
];

/// A latency histogram with fixed buckets. Observing costs two relaxed
/// atomic additions (the bucket and the sum); the count is the sum of the
/// buckets, added up when `/metrics` is rendered.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS
            .iter()
            .position(|(_, bound)| nanos <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Appends the `_bucket`, `_sum` and `_count` series of one label set
    /// (`labels` empty or `k="v",...`).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf", |(le, _)| le);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Appends one histogram family: `# HELP`, `# TYPE histogram`, then the
/// series of each label set.
fn histograms(out: &mut String, name: &str, help: &str, series: &[(String, Arc<Histogram>)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, h) in series {
        h.render(out, name, labels);
    }
}

/// Request latency histograms by (peer, service). A connection or a route
/// looks its handle up once ([`RouteLatency::handle`]) and observes without
/// a lock; the series of a route that left the catalog are dropped when
/// `/metrics` is rendered, so their number stays bounded by the catalog.
#[derive(Debug, Default)]
pub struct RouteLatency(Mutex<HashMap<RouteKey, Arc<Histogram>>>);

/// (peer, service).
type RouteKey = (Box<str>, Box<str>);

impl RouteLatency {
    /// The histogram of `peer` and `service`, created on first use.
    pub fn handle(&self, peer: &str, service: &str) -> Arc<Histogram> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry((peer.into(), service.into())).or_default())
    }

    /// The series of the routes `live` still holds (dropping the others),
    /// sorted, with their labels.
    fn series(&self, live: impl Fn(&str, &str) -> bool) -> Vec<(String, Arc<Histogram>)> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(peer, service), _| live(peer, service));
        let mut out: Vec<_> = map
            .iter()
            .map(|((peer, service), h)| {
                (
                    format!("peer=\"{peer}\",service=\"{service}\""),
                    Arc::clone(h),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Latency histograms of the data plane, shared by ingress, egress and
/// `/metrics`.
#[derive(Debug, Default)]
pub struct Latency {
    /// Egress: (import's peer, imported FQDN).
    pub egress: RouteLatency,
    /// Ingress: (calling peer, export name).
    pub ingress: RouteLatency,
    /// Completed mTLS handshakes, by side.
    pub handshake_ingress: Histogram,
    pub handshake_egress: Histogram,
}

fn one(value: u64) -> Vec<(String, u64)> {
    vec![(String::new(), value)]
}

/// Renders all metrics of one gateway.
/// Long because it is the one list of every metric family in exposition
/// order (see docs/metrics.md); each family is a few independent lines.
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
    family(
        &mut out,
        "elsinore_federation_refused_total",
        "counter",
        "Federation streams refused before any catalog moved, by reason.",
        &shared
            .stream_refusals
            .all()
            .map(|(reason, n)| (format!("reason=\"{reason}\""), n))
            .collect::<Vec<_>>(),
    );
    let refused: Vec<(String, u64)> = peers
        .iter()
        .flat_map(|p| {
            let view = p.consumer.borrow().clone();
            crate::catalog::claims::Rule::ALL.map(|rule| {
                (
                    format!("peer=\"{}\",rule=\"{rule}\"", p.config.name),
                    view.refused.get(&rule).copied().unwrap_or(0),
                )
            })
        })
        .collect();
    family(
        &mut out,
        "elsinore_imports_refused_total",
        "counter",
        "Entries a peer sent that a claim rule refused (NACKed, or the stream ended for limits.messageBytes), by rule.",
        &refused,
    );
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
    latency(&mut out, shared);
    family(
        &mut out,
        "elsinore_draining",
        "gauge",
        "1 once SIGTERM started the drain (/ready fails).",
        &one(u64::from(shared.draining.load(Ordering::Acquire))),
    );
    out
}

/// Request and handshake latencies, and how old each peer's imports are.
fn latency(out: &mut String, shared: &Shared) {
    let latency = &shared.latency;
    let imports = shared.imports.borrow().clone();
    histograms(
        out,
        "elsinore_egress_request_duration_seconds",
        "HTTP requests from local apps, from the request to the response headers, by import.",
        &latency
            .egress
            .series(|peer, service| imports.by_fqdn.get(service).is_some_and(|i| i.peer == peer)),
    );
    let exports = shared.exports.borrow().clone();
    histograms(
        out,
        "elsinore_ingress_request_duration_seconds",
        "HTTP requests from peers, from the request to the response headers, by peer and export.",
        &latency
            .ingress
            .series(|peer, service| exports.get(service).is_some_and(|e| e.is_visible_to(peer))),
    );
    let _ = writeln!(
        out,
        "# HELP elsinore_tls_handshake_duration_seconds Completed mTLS handshakes of the data plane, by side."
    );
    let _ = writeln!(
        out,
        "# TYPE elsinore_tls_handshake_duration_seconds histogram"
    );
    for (side, h) in [
        ("ingress", &latency.handshake_ingress),
        ("egress", &latency.handshake_egress),
    ] {
        h.render(
            out,
            "elsinore_tls_handshake_duration_seconds",
            &format!("side=\"{side}\""),
        );
    }
    let now = std::time::SystemTime::now();
    family(
        out,
        "elsinore_federation_consumer_import_age_seconds",
        "gauge",
        "Seconds since the peer's imports were last known current: 0 while the stream is open and synced (and before the first sync), else the time since the synced stream ended.",
        &shared
            .peers
            .iter()
            .map(|p| {
                let view = p.consumer.borrow();
                let age = match view.synced_until {
                    _ if view.connected && view.snapshot_complete => 0,
                    Some(t) => now.duration_since(t).map_or(0, |d| d.as_secs()),
                    None => 0,
                };
                (format!("peer=\"{}\"", p.config.name), age)
            })
            .collect::<Vec<_>>(),
    );
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod histogram_tests {
    use std::time::Duration;

    use super::{Histogram, RouteLatency};

    #[test]
    fn buckets_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(11));
        let mut out = String::new();
        h.render(&mut out, "x", "side=\"a\"");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 16, "{out}");
        assert_eq!(lines[0], "x_bucket{side=\"a\",le=\"0.001\"} 2");
        assert_eq!(lines[4], "x_bucket{side=\"a\",le=\"0.025\"} 2");
        assert_eq!(lines[5], "x_bucket{side=\"a\",le=\"0.05\"} 3");
        assert_eq!(lines[12], "x_bucket{side=\"a\",le=\"10\"} 3");
        assert_eq!(lines[13], "x_bucket{side=\"a\",le=\"+Inf\"} 4");
        assert_eq!(lines[14], "x_sum{side=\"a\"} 11.0315");
        assert_eq!(lines[15], "x_count{side=\"a\"} 4");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn routes_that_left_the_catalog_are_dropped() {
        let routes = RouteLatency::default();
        let kept = routes.handle("mesh-a", "reviews.mesh-a.global");
        routes.handle("mesh-a", "gone.mesh-a.global");
        // One handle per route: a second lookup gives the same histogram.
        assert!(std::sync::Arc::ptr_eq(
            &kept,
            &routes.handle("mesh-a", "reviews.mesh-a.global")
        ));
        let live = |_: &str, service: &str| service != "gone.mesh-a.global";
        let labels: Vec<String> = routes.series(live).into_iter().map(|s| s.0).collect();
        assert_eq!(
            labels,
            ["peer=\"mesh-a\",service=\"reviews.mesh-a.global\""]
        );
        assert_eq!(
            routes.0.lock().unwrap().len(),
            1,
            "the old series stays gone"
        );
    }
}
