//! `/metrics` against its documentation (docs/metrics.md): every family the
//! docs list is exposed with the documented type and labels and nothing
//! undocumented is exposed; and every family moves as documented when real
//! traffic crosses real gateways (federation streams, the egress VIPs, the
//! ingress, refusals, failures on either side).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use elsinore_certs::Identity;
use elsinore_tests::foreign::{self, ConsumerV2, dial, upsert_v2};
use elsinore_tests::scripted::Advertised;
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, MeshFixture, PeerSpec, WAIT, get, h2_send_over, http1_connect,
    http1_exchange, http1_send, peer_client_config, run_test, tls_connect_sni, wait_for,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const A: &str = "mesh-a";
const REVIEWS: &str = "reviews.mesh-a.global";
const EGRESS_DURATION: &str = "elsinore_egress_request_duration_seconds";
const INGRESS_DURATION: &str = "elsinore_ingress_request_duration_seconds";
const B: &str = "mesh-b";

// ---------------------------------------------------------------------------
// Reading the exposition and the docs.
// ---------------------------------------------------------------------------

/// One family of a scrape: its `# TYPE` and its samples (labels → value).
/// A histogram's samples are its `_count` series; its `_sum` series are
/// kept apart, and its `_bucket` series are checked as they are parsed
/// (cumulative, `+Inf` last and equal to the count).
#[derive(Debug, Default, Clone)]
struct Family {
    kind: String,
    samples: Vec<(BTreeMap<String, String>, u64)>,
    sums: Vec<(BTreeMap<String, String>, f64)>,
}

/// The buckets of one histogram series while they are parsed: (labels
/// without `le`, last `le`, cumulative count so far).
type OpenBuckets = Option<(BTreeMap<String, String>, String, u64)>;

/// A parsed `/metrics` answer, by family name.
#[derive(Debug, Clone)]
struct Scrape(BTreeMap<String, Family>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut buckets: OpenBuckets = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("`# TYPE name kind`");
                families.entry(name.to_owned()).or_default().kind = kind.to_owned();
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, text_value) = line.rsplit_once(' ').expect("`series value`");
            let (name, mut labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with `}`");
                    (name, parse_labels(body))
                }
            };
            // A histogram's series: `<family>_bucket`, `_sum`, `_count`.
            let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (families.get(base)?.kind == "histogram").then_some((base, *suffix))
            });
            if let Some((base, "_sum")) = histogram {
                let sum: f64 = text_value
                    .parse()
                    .unwrap_or_else(|e| panic!("sum in {line:?}: {e}"));
                assert!(sum >= 0.0 && sum.is_finite(), "{line:?}");
                let family = families.get_mut(base).unwrap();
                family.sums.push((labels, sum));
                continue;
            }
            let value: u64 = text_value
                .parse()
                .unwrap_or_else(|e| panic!("sample value in {line:?}: {e}"));
            if let Some((_, "_bucket")) = histogram {
                let le = labels
                    .remove("le")
                    .unwrap_or_else(|| panic!("no le: {line:?}"));
                if let Some((open, last, so_far)) = &buckets
                    && *open == labels
                    && last != "+Inf"
                {
                    let bound = |le: &str| le.parse::<f64>().unwrap();
                    assert!(
                        le == "+Inf" || bound(&le) > bound(last),
                        "le order: {line:?}"
                    );
                    assert!(value >= *so_far, "buckets are cumulative: {line:?}");
                } else if let Some((_, last, _)) = &buckets {
                    assert_eq!(last, "+Inf", "series ended before +Inf: {line:?}");
                }
                buckets = Some((labels, le, value));
                continue;
            }
            let name = match histogram {
                Some((base, _)) => {
                    // `_count`: the `+Inf` bucket just before holds as many.
                    let open = buckets.take();
                    assert_eq!(
                        open,
                        Some((labels.clone(), "+Inf".to_owned(), value)),
                        "+Inf bucket before {line:?}"
                    );
                    base
                }
                None => name,
            };
            let family = families
                .get_mut(name)
                .unwrap_or_else(|| panic!("sample {line:?} before its # TYPE"));
            family.samples.push((labels, value));
        }
        Scrape(families)
    }

    /// The value of the sample of `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let family = self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in the scrape"));
        family
            .samples
            .iter()
            .find(|(l, _)| *l == want)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} has no sample {want:?}: {:?}", family.samples))
    }

    /// The `_sum` of the histogram series of `name` with exactly `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let family = &self.0[name];
        family
            .sums
            .iter()
            .find(|(l, _)| *l == want)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} has no sum {want:?}: {:?}", family.sums))
    }

    fn plain(&self, name: &str) -> u64 {
        self.value(name, &[])
    }
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label `key=\"value\"`");
        let end = after.find('"').expect("closing quote of a label value");
        out.insert(key.to_owned(), after[..end].to_owned());
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

/// `GET /metrics` on a gateway's admin listener, parsed.
async fn scrape(addr: SocketAddr) -> Scrape {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect to admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .expect("send GET /metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read /metrics");
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("/metrics answered in time");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    // The admin server may frame the body by chunks or by length; the
    // Prometheus text never contains a line that is a bare hex number.
    let body: String = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Scrape::parse(&body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// One documented family: type and label names.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Documented {
    kind: String,
    labels: BTreeSet<String>,
}

/// The family table and the label-value table of docs/metrics.md.
fn documented() -> (
    BTreeMap<String, Documented>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let code = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let mut families = BTreeMap::new();
    let mut values = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let first = code(cells[0]);
        // A label row may name its family when the label's values differ
        // from one family to another: `reason` of `elsinore_x`.
        assert!(
            first.len() == 1 || (first.len() == 2 && !first[0].starts_with("elsinore_")),
            "first cell of {line:?}"
        );
        let name = match first.as_slice() {
            [label, family] => format!("{family}/{label}"),
            _ => first[0].clone(),
        };
        if first.len() == 1 && name.starts_with("elsinore_") {
            assert_eq!(cells.len(), 4, "a family row has 4 cells: {line:?}");
            let doc = Documented {
                kind: cells[1].to_owned(),
                labels: code(cells[2]).into_iter().collect(),
            };
            assert!(
                families.insert(name.clone(), doc).is_none(),
                "{name} documented twice"
            );
        } else if name != "peer" {
            // `peer` values come from the config; the others are closed sets.
            values.insert(name, code(cells[1]).into_iter().collect());
        }
    }
    assert!(
        families.len() >= 20,
        "docs/metrics.md lists only {} families: is the table still there?",
        families.len()
    );
    (families, values)
}

// ---------------------------------------------------------------------------
// The docs and the exposition agree.
// ---------------------------------------------------------------------------

/// Families that describe the gateway itself and are not 0 before any
/// traffic; each has its own assertion below.
const NOT_ZERO_AT_START: &[&str] = &[
    "elsinore_exports",
    "elsinore_egress_import_listener_budget",
    "elsinore_build_info",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_families_are_exactly_the_exposed_ones() {
    run_test(async {
        let (docs, values) = documented();
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let c = MeshFixture::new("mesh-c").await;
        // Two peers, neither ever connecting: per-peer families must still
        // have one sample per configured peer.
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &[B]))
                    .peer(b.peer())
                    .peer(c.peer()),
            )
            .await;
        let scrape = scrape(ga.admin_addr).await;
        let exposed: BTreeSet<&String> = scrape.0.keys().collect();
        let listed: BTreeSet<&String> = docs.keys().collect();
        assert_eq!(
            exposed.difference(&listed).collect::<Vec<_>>(),
            Vec::<&&String>::new(),
            "exposed but not in docs/metrics.md"
        );
        assert_eq!(
            listed.difference(&exposed).collect::<Vec<_>>(),
            Vec::<&&String>::new(),
            "in docs/metrics.md but not exposed"
        );
        for (name, doc) in &docs {
            let family = &scrape.0[name];
            assert_eq!(family.kind, doc.kind, "type of {name}");
            if doc.labels.contains("service") {
                // Per-route histograms: a series per (peer, service) comes
                // with the route's first request; this gateway saw none.
                assert_eq!(family.samples, vec![], "{name} before any request");
                continue;
            }
            assert!(!family.samples.is_empty(), "{name} has no sample");
            assert_eq!(
                name.ends_with("_total"),
                doc.kind == "counter",
                "{name}: counters and only counters end in _total"
            );
            for (labels, _) in &family.samples {
                let keys: BTreeSet<String> = labels.keys().cloned().collect();
                assert_eq!(keys, doc.labels, "label names of {name}");
            }
            // A family with several labels has one sample per combination.
            let mut combinations = 1;
            for label in &doc.labels {
                let seen: BTreeSet<String> = family
                    .samples
                    .iter()
                    .map(|(l, _)| l[label].clone())
                    .collect();
                let want = match label.as_str() {
                    "peer" => [B, "mesh-c"].iter().map(|s| (*s).to_owned()).collect(),
                    // This build's own: the binary's version and commit.
                    "version" => [elsinore_gateway::cli::VERSION.to_owned()].into(),
                    "commit" => [elsinore_gateway::cli::COMMIT.to_owned()].into(),
                    other => values
                        .get(&format!("{name}/{other}"))
                        .or_else(|| values.get(other))
                        .unwrap_or_else(|| panic!("docs give no values for label {other}"))
                        .clone(),
                };
                assert_eq!(seen, want, "values of label {label} of {name}");
                combinations *= want.len();
            }
            assert_eq!(
                family.samples.len(),
                combinations,
                "{name}: one sample per value (combination) of {:?}",
                doc.labels
            );
        }
        // A fresh gateway: the one export, nothing else moved yet. The
        // gauges in NOT_ZERO_AT_START describe the gateway itself, not
        // traffic.
        assert_eq!(scrape.plain("elsinore_exports"), 1);
        assert!(scrape.plain("elsinore_egress_import_listener_budget") >= 256);
        assert_eq!(
            scrape.value(
                "elsinore_build_info",
                &[
                    ("version", elsinore_gateway::cli::VERSION),
                    ("commit", elsinore_gateway::cli::COMMIT)
                ]
            ),
            1
        );
        for (name, family) in &scrape.0 {
            if name.ends_with("_timestamp_seconds") {
                // Certificate expiry: a time, and a future one.
                for (labels, value) in &family.samples {
                    assert!(*value > 0, "{name}{labels:?} is not a time");
                }
            } else if !NOT_ZERO_AT_START.contains(&name.as_str()) {
                for (labels, value) in &family.samples {
                    assert_eq!(*value, 0, "{name}{labels:?} on a gateway that saw nothing");
                }
            }
        }
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Every family moves with real traffic.
// ---------------------------------------------------------------------------

/// Waits until `check` holds on a fresh scrape of `addr`; returns that scrape.
async fn wait_scrape(
    addr: SocketAddr,
    desc: &str,
    check: impl Fn(&Scrape) -> Result<(), String>,
) -> Scrape {
    wait_for(desc, WAIT, || async {
        let s = scrape(addr).await;
        check(&s).map(|()| s)
    })
    .await
}

/// Label pairs of one sample.
type Labels<'a> = &'a [(&'a str, &'a str)];

/// (family, labels, expected value) with the labels owned.
type OwnedSample<'a> = (&'a str, Vec<(&'a str, &'a str)>, u64);

/// `Ok` when every (family, labels, expected) matches.
fn expect(s: &Scrape, want: &[(&str, Labels<'_>, u64)]) -> Result<(), String> {
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(name, labels, value)| {
            let got = s.value(name, labels);
            (got != *value).then(|| format!("{name}{labels:?} = {got}, want {value}"))
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_moves_with_federation_and_data_plane_traffic() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let reviews = Backend::http1("reviews").await;
        // A port nothing listens on: the `broken` export's backend.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let a_spec = ConfigSpec::new()
            .export(
                ExportSpec::new("reviews", &[B])
                    .port(9080)
                    .backend(&reviews.host_port()),
            )
            .export(
                ExportSpec::new("broken", &[B])
                    .port(9081)
                    .backend(&dead.to_string()),
            )
            .export(
                ExportSpec::new("ratings", &[B])
                    .fqdn("ratings.shared.global")
                    .port(9082)
                    .backend(&reviews.host_port()),
            )
            .export(
                ExportSpec::new("capped", &[B])
                    .port(9083)
                    .backend(&reviews.host_port()),
            )
            .peer(b.peer());
        let ga = a.start(&a_spec).await;
        // B then exports a local service with the FQDN of A's `ratings`,
        // which is therefore aliased (a collision; sent after the export
        // exists it would be refused); its egress listeners take two
        // connections each.
        let mut gb = b
            .start(
                &ConfigSpec::new()
                    .peer(a.dial())
                    .proxy("maxConnections", "2"),
            )
            .await;
        gb.wait_imported(A, &["broken", "capped", "ratings", "reviews"])
            .await;
        gb.rewrite_exports(vec![
            ExportSpec::new("ratings", &[]).fqdn("ratings.shared.global"),
        ]);

        // Catalog gauges and the federation stream, both ends.
        let sb = wait_scrape(gb.admin_addr, "B's federation metrics", |s| {
            let messages = s.value(
                "elsinore_federation_consumer_messages_total",
                &[("peer", A)],
            );
            if messages < 4 {
                return Err(format!("{messages} messages"));
            }
            expect(
                s,
                &[
                    ("elsinore_exports", &[], 1),
                    ("elsinore_imports", &[], 4),
                    ("elsinore_import_collisions", &[], 1),
                    ("elsinore_federation_consumer_connected", &[("peer", A)], 1),
                    ("elsinore_federation_consumer_imported", &[("peer", A)], 4),
                    (
                        "elsinore_federation_consumer_acks_total",
                        &[("peer", A)],
                        messages,
                    ),
                    (
                        "elsinore_federation_consumer_nacks_total",
                        &[("peer", A)],
                        0,
                    ),
                    (
                        "elsinore_federation_consumer_reconnects_total",
                        &[("peer", A)],
                        0,
                    ),
                    ("elsinore_federation_owner_streams_open", &[("peer", A)], 0),
                    // Synced and connected: the imports are current.
                    (
                        "elsinore_federation_consumer_import_age_seconds",
                        &[("peer", A)],
                        0,
                    ),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "egress")],
                        0,
                    ),
                ],
            )
        })
        .await;
        let messages = sb.value(
            "elsinore_federation_consumer_messages_total",
            &[("peer", A)],
        );
        wait_scrape(ga.admin_addr, "A's federation metrics", |s| {
            expect(
                s,
                &[
                    ("elsinore_exports", &[], 4),
                    ("elsinore_imports", &[], 0),
                    ("elsinore_federation_consumer_connected", &[("peer", B)], 0),
                    ("elsinore_federation_owner_streams_open", &[("peer", B)], 1),
                    (
                        "elsinore_federation_owner_messages_sent_total",
                        &[("peer", B)],
                        messages,
                    ),
                    (
                        "elsinore_federation_owner_acks_total",
                        &[("peer", B)],
                        messages,
                    ),
                    ("elsinore_federation_owner_nacks_total", &[("peer", B)], 0),
                ],
            )
        })
        .await;

        // One app connection to the `reviews` VIP carries three requests.
        let vip = gb.wait_vip("reviews.mesh-a.global").await;
        let broken_vip = gb.wait_vip("broken.mesh-a.global").await;
        let capped_vip = gb.wait_vip("capped.mesh-a.global").await;
        // wait_vip's probes count as egress connections: one accepted
        // connection per VIP (refused connects are not counted).
        wait_scrape(gb.admin_addr, "B to count the three probes", |s| {
            expect(s, &[("elsinore_egress_connections_total", &[], 3)])
        })
        .await;
        let mut app = http1_connect(vip).await.unwrap();
        let ok = http1_exchange(&mut app, get("reviews.mesh-a.global", "/ok"))
            .await
            .unwrap();
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        wait_scrape(gb.admin_addr, "B's egress after one request", |s| {
            expect(
                s,
                &[
                    ("elsinore_egress_connections_total", &[], 4),
                    ("elsinore_egress_http_requests_total", &[], 1),
                    ("elsinore_egress_upstream_connects_total", &[], 1),
                    ("elsinore_egress_upstream_handshake_failures_total", &[], 0),
                    (EGRESS_DURATION, &[("peer", A), ("service", REVIEWS)], 1),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "egress")],
                        1,
                    ),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "ingress")],
                        0,
                    ),
                ],
            )
        })
        .await;
        wait_scrape(ga.admin_addr, "A's ingress after one request", |s| {
            expect(
                s,
                &[
                    ("elsinore_ingress_connections_total", &[], 1),
                    ("elsinore_ingress_connections_active", &[], 1),
                    ("elsinore_ingress_http_requests_total", &[], 1),
                    ("elsinore_ingress_misdirected_total", &[], 0),
                    ("elsinore_ingress_upstream_errors_total", &[], 0),
                    (INGRESS_DURATION, &[("peer", B), ("service", "reviews")], 1),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "ingress")],
                        1,
                    ),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "egress")],
                        0,
                    ),
                ],
            )
        })
        .await;
        // Only the routes that carried a request have series, and they
        // took some time.
        for (gw, name, peer, service) in [
            (gb.admin_addr, EGRESS_DURATION, A, REVIEWS),
            (ga.admin_addr, INGRESS_DURATION, B, "reviews"),
        ] {
            let s = scrape(gw).await;
            assert_eq!(s.0[name].samples.len(), 1, "{name}: {:?}", s.0[name]);
            let sum = s.sum(name, &[("peer", peer), ("service", service)]);
            assert!(sum > 0.0 && sum < WAIT.as_secs_f64(), "{name} sum {sum}");
        }

        // A Host naming another service: A answers 421.
        let wrong = http1_exchange(&mut app, get("elsewhere.example", "/x"))
            .await
            .unwrap();
        assert_eq!(
            wrong.status,
            StatusCode::MISDIRECTED_REQUEST,
            "{}",
            wrong.text()
        );
        // The `broken` export's backend refuses: A answers 502.
        let bad = http1_send(broken_vip, get("broken.mesh-a.global", "/x"))
            .await
            .unwrap();
        assert_eq!(bad.status, StatusCode::BAD_GATEWAY, "{}", bad.text());
        wait_scrape(ga.admin_addr, "A's misdirected and upstream errors", |s| {
            expect(
                s,
                &[
                    ("elsinore_ingress_http_requests_total", &[], 3),
                    ("elsinore_ingress_misdirected_total", &[], 1),
                    ("elsinore_ingress_upstream_errors_total", &[], 1),
                    // The 421 went over the `reviews` connection.
                    (INGRESS_DURATION, &[("peer", B), ("service", "reviews")], 2),
                    (INGRESS_DURATION, &[("peer", B), ("service", "broken")], 1),
                    // `broken` has its own SNI, so its own connection.
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "ingress")],
                        2,
                    ),
                ],
            )
        })
        .await;
        wait_scrape(gb.admin_addr, "B's egress request count", |s| {
            expect(
                s,
                &[
                    ("elsinore_egress_http_requests_total", &[], 3),
                    (EGRESS_DURATION, &[("peer", A), ("service", REVIEWS)], 2),
                    (
                        EGRESS_DURATION,
                        &[("peer", A), ("service", "broken.mesh-a.global")],
                        1,
                    ),
                    ("elsinore_egress_upstream_connects_total", &[], 2),
                    (
                        "elsinore_tls_handshake_duration_seconds",
                        &[("side", "egress")],
                        2,
                    ),
                ],
            )
        })
        .await;

        // A connection refused at A's ingress by reason, all other reasons
        // unchanged.
        let before = scrape(ga.admin_addr).await;
        let as_b = peer_client_config(&b.issue(&b.gateway_id()), &a, &[b"h2"]);
        let refused = match tls_connect_sni(ga.ingress_addr(), as_b, "nothing.mesh-a.global").await
        {
            Ok(tls) => h2_send_over(tls, get("nothing.mesh-a.global", "/")).await,
            Err(e) => Err(e.to_string()),
        };
        assert!(refused.is_err(), "an unknown SNI was served: {refused:?}");
        let mut owned: Vec<OwnedSample<'_>> = elsinore_gateway::proxy::ingress::Refusal::ALL
            .iter()
            .map(|r| {
                let label = r.label();
                let add = u64::from(label == "unknown_sni");
                (
                    "elsinore_ingress_refused_total",
                    vec![("reason", label)],
                    before.value("elsinore_ingress_refused_total", &[("reason", label)]) + add,
                )
            })
            .collect();
        owned.push((
            "elsinore_ingress_connections_total",
            vec![],
            before.plain("elsinore_ingress_connections_total") + 1,
        ));
        let want: Vec<(&str, Labels<'_>, u64)> = owned
            .iter()
            .map(|(n, l, v)| (*n, l.as_slice(), *v))
            .collect();
        wait_scrape(ga.admin_addr, "the unknown_sni refusal", |s| {
            expect(s, &want)
        })
        .await;

        // A name nothing routes, on the catch-all: a downstream error.
        let catch_all = gb.gateway.egress_addr.expect("B's catch-all listener");
        let nope = http1_send(catch_all, get("nope.example", "/"))
            .await
            .unwrap();
        assert_eq!(nope.status, StatusCode::NOT_FOUND, "{}", nope.text());
        wait_scrape(gb.admin_addr, "B's downstream error", |s| {
            expect(
                s,
                &[
                    ("elsinore_egress_errors_total", &[("side", "downstream")], 1),
                    ("elsinore_egress_errors_total", &[("side", "upstream")], 0),
                    ("elsinore_egress_errors_total", &[("side", "internal")], 0),
                ],
            )
        })
        .await;

        // The connection cap of one VIP listener (maxConnections 2): two
        // app connections that got an answer hold both slots; a third is
        // closed at once and counted.
        let mut held = Vec::new();
        for i in 0..2 {
            let sender = wait_for(&format!("capped connection {i} admitted"), WAIT, || async {
                let mut sender = http1_connect(capped_vip).await?;
                let reply = http1_exchange(&mut sender, get("capped.mesh-a.global", "/")).await?;
                (reply.status == StatusCode::OK)
                    .then_some(sender)
                    .ok_or(format!("status {}", reply.status))
            })
            .await;
            held.push(sender);
        }
        let refused_before = scrape(gb.admin_addr)
            .await
            .plain("elsinore_egress_refused_total");
        let mut third = TcpStream::connect(capped_vip).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, third.read(&mut buf))
            .await
            .expect("the connection over the cap is closed at once");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the third connection was served: {read:?}"
        );
        wait_scrape(gb.admin_addr, "B's refused_over_cap", |s| {
            expect(
                s,
                &[("elsinore_egress_refused_total", &[], refused_before + 1)],
            )
        })
        .await;
        drop(held);

        // The owner goes away: the stale import still routes, the dial
        // fails upstream; the stream is lost and, once A is back, re-opened.
        ga.stop().await;
        wait_scrape(gb.admin_addr, "B to see the stream lost", |s| {
            expect(
                s,
                &[("elsinore_federation_consumer_connected", &[("peer", A)], 0)],
            )
        })
        .await;
        // With the stream gone, the imports age: by whole seconds, from 0.
        wait_scrape(gb.admin_addr, "B's imports from A to age", |s| {
            let age = s.value(
                "elsinore_federation_consumer_import_age_seconds",
                &[("peer", A)],
            );
            if age == 0 {
                return Err("import age still 0".to_owned());
            }
            assert!(age < WAIT.as_secs() + 5, "imports {age} s old");
            Ok(())
        })
        .await;
        let gone = http1_exchange(&mut app, get("reviews.mesh-a.global", "/again"))
            .await
            .unwrap();
        assert_eq!(gone.status, StatusCode::BAD_GATEWAY, "{}", gone.text());
        wait_scrape(gb.admin_addr, "B's upstream error", |s| {
            expect(
                s,
                &[
                    ("elsinore_egress_errors_total", &[("side", "upstream")], 1),
                    // A 502 is a response too: timed with the others.
                    (EGRESS_DURATION, &[("peer", A), ("service", REVIEWS)], 3),
                ],
            )
        })
        .await;
        let ga = a.start(&a_spec).await;
        wait_scrape(gb.admin_addr, "B to reconnect", |s| {
            let reconnects = s.value(
                "elsinore_federation_consumer_reconnects_total",
                &[("peer", A)],
            );
            if reconnects == 0 {
                return Err("no reconnect counted".to_owned());
            }
            expect(
                s,
                &[
                    ("elsinore_federation_consumer_connected", &[("peer", A)], 1),
                    (
                        "elsinore_federation_consumer_import_age_seconds",
                        &[("peer", A)],
                        0,
                    ),
                ],
            )
        })
        .await;
        wait_scrape(ga.admin_addr, "the restarted A to serve B's stream", |s| {
            expect(
                s,
                &[("elsinore_federation_owner_streams_open", &[("peer", B)], 1)],
            )
        })
        .await;
        // B goes away: A's open-stream gauge and active connections fall.
        gb.stop().await;
        wait_scrape(ga.admin_addr, "A to see B's stream closed", |s| {
            expect(
                s,
                &[
                    ("elsinore_federation_owner_streams_open", &[("peer", B)], 0),
                    ("elsinore_ingress_connections_active", &[], 0),
                ],
            )
        })
        .await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// NACKs both ways, and handshakes egress refuses.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_and_refused_upstream_certificates_are_counted() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let foreign = MeshFixture::new("foreign").await;
        let reviews = Backend::http1("reviews").await;
        // A: a real owner, exporting `reviews` to B and to a foreign peer.
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("reviews", &[B, "foreign"])
                            .port(9080)
                            .backend(&reviews.host_port()),
                    )
                    .peer(b.peer())
                    .peer(foreign.peer().any_identity()),
            )
            .await;

        // A foreign consumer NACKs what A sends it.
        let id = MeshFixture::spiffe_id("foreign.test", "/ns/hamlet/sa/scripted-peer");
        let issued = foreign.issue(&id);
        let identity =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let channel = dial(ga.federation_addr, &identity, &a.bundle())
            .await
            .unwrap();
        let mut consumer = ConsumerV2::open(channel, "ctx").await.unwrap();
        let first = consumer.next().await.unwrap();
        consumer.nack(&first.nonce, "not today").await.unwrap();
        wait_scrape(ga.admin_addr, "A to count the foreign NACK", |s| {
            expect(
                s,
                &[
                    (
                        "elsinore_federation_owner_nacks_total",
                        &[("peer", "foreign")],
                        1,
                    ),
                    (
                        "elsinore_federation_owner_acks_total",
                        &[("peer", "foreign")],
                        0,
                    ),
                    (
                        "elsinore_federation_owner_streams_open",
                        &[("peer", "foreign")],
                        1,
                    ),
                    ("elsinore_federation_owner_nacks_total", &[("peer", B)], 0),
                ],
            )
        })
        .await;

        // B imports from a scripted owner speaking for mesh-a: one service
        // it cannot accept (NACK), one that points at A's ingress but
        // expects another SPIFFE ID there (refused certificate).
        let owner_id = MeshFixture::spiffe_id("mesh-a.test", "/ns/hamlet/sa/scripted-owner");
        let issued = a.issue(&owner_id);
        let owner_identity =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let (_server, mut streams) = foreign::serve_v2(&owner_identity, &b.bundle())
            .await
            .unwrap();
        let gb = b
            .start(
                &ConfigSpec::new().snapshot_quiet_period("300ms").peer(
                    PeerSpec::new(A, "mesh-a.test", &a.ca_pem)
                        .federation(_server.addr)
                        .any_identity(),
                ),
            )
            .await;
        let mut stream = tokio::time::timeout(WAIT, streams.recv())
            .await
            .expect("B opened a stream")
            .unwrap();
        let first = stream.recv().await.unwrap();
        let context = first.context;
        let mut invalid = foreign::service_v2("invalid", "not a dns name", 9080);
        invalid.sans = vec![a.gateway_id().to_string()];
        stream
            .send(upsert_v2("n1", &context, &invalid))
            .await
            .unwrap();
        let reply = stream.recv().await.unwrap();
        assert_eq!(reply.response_nonce, "n1");
        assert!(
            reply.status.as_ref().is_some_and(|s| s.code != 0),
            "B accepted an invalid service: {reply:?}"
        );
        let wrong_san = MeshFixture::spiffe_id("mesh-a.test", "/ns/other/sa/impostor");
        let advertised = Advertised {
            name: "reviews",
            fqdn: "reviews.mesh-a.global",
            endpoint: ga.ingress_addr(),
            sni: "reviews.mesh-a.global",
            sans: vec![wrong_san.to_string()],
            port: 9080,
            protocol: "HTTP",
        };
        stream
            .send(upsert_v2("n2", &context, &advertised.to_wire()))
            .await
            .unwrap();
        let reply = stream.recv().await.unwrap();
        assert_eq!(reply.response_nonce, "n2");
        assert!(
            reply.status.as_ref().is_none_or(|s| s.code == 0),
            "{reply:?}"
        );
        wait_scrape(gb.admin_addr, "B to count its NACK", |s| {
            expect(
                s,
                &[
                    (
                        "elsinore_federation_consumer_messages_total",
                        &[("peer", A)],
                        2,
                    ),
                    (
                        "elsinore_federation_consumer_nacks_total",
                        &[("peer", A)],
                        1,
                    ),
                    ("elsinore_federation_consumer_acks_total", &[("peer", A)], 1),
                    ("elsinore_federation_consumer_imported", &[("peer", A)], 1),
                ],
            )
        })
        .await;

        let vip = gb.wait_vip("reviews.mesh-a.global").await;
        let reply = http1_send(vip, get("reviews.mesh-a.global", "/"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert!(
            reply.text().contains(&wrong_san.to_string()),
            "{}",
            reply.text()
        );
        wait_scrape(gb.admin_addr, "B to count the refused certificate", |s| {
            expect(
                s,
                &[
                    ("elsinore_egress_upstream_handshake_failures_total", &[], 1),
                    ("elsinore_egress_errors_total", &[("side", "upstream")], 1),
                    ("elsinore_egress_errors_total", &[("side", "downstream")], 0),
                    ("elsinore_egress_http_requests_total", &[], 1),
                ],
            )
        })
        .await;
        assert_eq!(reviews.hits(), 0, "the backend was reached");
        drop(consumer);
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
