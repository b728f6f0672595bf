//! Turning samples into the results: per-round ratios (to direct and to the
//! best peer of the SAME round, so machine drift between rounds cancels),
//! medians over rounds, the targets from the issue with a met/missed verdict,
//! and the markdown written into BENCHMARKS.md.

use std::fmt::Write as _;

use crate::contenders::Contender;
pub use elsinore_bench::median;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Sample {
    pub round: usize,
    pub contender: Contender,
    pub key: String,
    pub value: f64,
}

#[derive(Clone, Copy)]
pub enum Target {
    /// Elsinore ÷ best peer (median of per-round ratios) at least this.
    MinVsPeer(f64),
    /// Elsinore ÷ best peer at most this.
    MaxVsPeer(f64),
    /// Elsinore's median value at most this (in the metric's unit).
    Max(f64),
}

pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Whether ratios mean anything (not for error counts).
    pub ratios: bool,
    pub target: Option<Target>,
}

const fn m(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    target: Option<Target>,
) -> Metric {
    Metric {
        key,
        label,
        unit,
        higher_is_better,
        ratios: true,
        target,
    }
}

const fn count(key: &'static str, label: &'static str) -> Metric {
    Metric {
        key,
        label,
        unit: "",
        higher_is_better: false,
        ratios: false,
        target: None,
    }
}

pub const METRICS: &[Metric] = &[
    m(
        "http1.rps",
        "HTTP/1.1 requests/s",
        "req/s",
        true,
        Some(Target::MinVsPeer(1.4)),
    ),
    m("http1.p50", "HTTP/1.1 p50 latency", "ms", false, None),
    m(
        "http1.p99",
        "HTTP/1.1 p99 latency",
        "ms",
        false,
        Some(Target::MaxVsPeer(1.0)),
    ),
    m(
        "http1.cpu",
        "HTTP/1.1 CPU per request (both gateways)",
        "µs",
        false,
        Some(Target::MaxVsPeer(0.7)),
    ),
    m(
        "http1.cpu_kernel",
        "HTTP/1.1 kernel CPU per request (both gateways)",
        "µs",
        false,
        None,
    ),
    m(
        "http1.cpu_egress",
        "HTTP/1.1 CPU per request, egress",
        "µs",
        false,
        None,
    ),
    m(
        "http1.cpu_ingress",
        "HTTP/1.1 CPU per request, ingress",
        "µs",
        false,
        None,
    ),
    m(
        "http1.hwm_egress",
        "HTTP/1.1 peak RSS, egress",
        "MiB",
        false,
        Some(Target::Max(20.0)),
    ),
    m(
        "http1.hwm_ingress",
        "HTTP/1.1 peak RSS, ingress",
        "MiB",
        false,
        Some(Target::Max(20.0)),
    ),
    count("http1.errors", "HTTP/1.1 errors (non-2xx + socket)"),
    m(
        "http1.busy_client_core",
        "HTTP/1.1 client core busy (wrk + egress)",
        "%",
        false,
        None,
    ),
    m(
        "http1.busy_server_core",
        "HTTP/1.1 server core busy (ingress + backend)",
        "%",
        false,
        None,
    ),
    m(
        "http2.rps",
        "HTTP/2 requests/s",
        "req/s",
        true,
        Some(Target::MinVsPeer(1.3)),
    ),
    m(
        "http2.cpu",
        "HTTP/2 CPU per request (both gateways)",
        "µs",
        false,
        Some(Target::MaxVsPeer(0.7)),
    ),
    m(
        "http2.cpu_egress",
        "HTTP/2 CPU per request, egress",
        "µs",
        false,
        None,
    ),
    m(
        "http2.cpu_ingress",
        "HTTP/2 CPU per request, ingress",
        "µs",
        false,
        None,
    ),
    m(
        "http2.hwm_egress",
        "HTTP/2 peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "http2.hwm_ingress",
        "HTTP/2 peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    count("http2.errors", "HTTP/2 failed requests"),
    m(
        "connect.cps",
        "new connections/s, peers without TLS resumption",
        "conn/s",
        true,
        Some(Target::MinVsPeer(1.5)),
    ),
    m(
        "connect.cpu",
        "CPU per connection (both gateways)",
        "µs",
        false,
        None,
    ),
    m(
        "connect.cpu_egress",
        "CPU per connection, egress",
        "µs",
        false,
        None,
    ),
    m(
        "connect.cpu_ingress",
        "CPU per connection, ingress",
        "µs",
        false,
        None,
    ),
    m(
        "connect.hwm_egress",
        "new connections: peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "connect.hwm_ingress",
        "new connections: peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    count("connect.errors", "new connections: errors"),
    m(
        "connect_resume.cps",
        "new connections/s, every gateway resuming TLS sessions",
        "conn/s",
        true,
        Some(Target::MinVsPeer(1.5)),
    ),
    m(
        "connect_resume.cpu",
        "CPU per connection, resuming (both gateways)",
        "µs",
        false,
        None,
    ),
    m(
        "connect_resume.cpu_egress",
        "CPU per connection, resuming, egress",
        "µs",
        false,
        None,
    ),
    m(
        "connect_resume.cpu_ingress",
        "CPU per connection, resuming, ingress",
        "µs",
        false,
        None,
    ),
    count("connect_resume.errors", "new connections, resuming: errors"),
    m(
        "bulk.gbps",
        "bulk TCP throughput",
        "Gbit/s",
        true,
        Some(Target::MinVsPeer(1.3)),
    ),
    m(
        "bulk.cpu",
        "bulk TCP CPU per GB (both gateways)",
        "ms",
        false,
        Some(Target::MaxVsPeer(0.7)),
    ),
    m(
        "bulk.cpu_egress",
        "bulk TCP CPU per GB, egress",
        "ms",
        false,
        None,
    ),
    m(
        "bulk.cpu_ingress",
        "bulk TCP CPU per GB, ingress",
        "ms",
        false,
        None,
    ),
    m(
        "bulk.hwm_egress",
        "bulk TCP peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "bulk.hwm_ingress",
        "bulk TCP peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    m(
        "bulk_down.gbps",
        "bulk TCP download throughput (backend → client)",
        "Gbit/s",
        true,
        None,
    ),
    m(
        "bulk_down.cpu",
        "bulk TCP download CPU per GB (both gateways)",
        "ms",
        false,
        None,
    ),
    m(
        "bulk_down.cpu_egress",
        "bulk TCP download CPU per GB, egress",
        "ms",
        false,
        None,
    ),
    m(
        "bulk_down.cpu_ingress",
        "bulk TCP download CPU per GB, ingress",
        "ms",
        false,
        None,
    ),
    m(
        "bulk_down.hwm_egress",
        "bulk TCP download peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "bulk_down.hwm_ingress",
        "bulk TCP download peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    m(
        "idle_tcp.kib_egress",
        "RSS per held mTLS connection, egress",
        "KiB",
        false,
        Some(Target::Max(16.0)),
    ),
    m(
        "idle_tcp.kib_ingress",
        "RSS per held mTLS connection, ingress",
        "KiB",
        false,
        Some(Target::Max(16.0)),
    ),
    m(
        "idle_tcp.hwm_egress",
        "held connections: peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "idle_tcp.hwm_ingress",
        "held connections: peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    count("idle_tcp.failed", "held connections that failed to open"),
    m(
        "idle_http.kib_egress",
        "RSS per idle keep-alive client connection, egress",
        "KiB",
        false,
        Some(Target::Max(2.0)),
    ),
    m(
        "idle_http.kib_ingress",
        "idle keep-alive clients: RSS per client, ingress",
        "KiB",
        false,
        None,
    ),
    m(
        "idle_http.hwm_egress",
        "idle keep-alive clients: peak RSS, egress",
        "MiB",
        false,
        None,
    ),
    m(
        "idle_http.hwm_ingress",
        "idle keep-alive clients: peak RSS, ingress",
        "MiB",
        false,
        None,
    ),
    count(
        "idle_http.failed",
        "idle keep-alive connections that failed to open",
    ),
];

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 {
        // Thin grouping keeps large request rates readable.
        let s = format!("{v:.0}");
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn value(samples: &[Sample], round: usize, c: Contender, key: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.round == round && s.contender == c && s.key == key && s.value.is_finite())
        .map(|s| s.value)
}

/// Per-round ratios of `c` to direct and to the best peer of that round.
fn ratios(samples: &[Sample], rounds: usize, c: Contender, metric: &Metric) -> (f64, f64) {
    let mut to_direct = Vec::new();
    let mut to_peer = Vec::new();
    for r in 1..=rounds {
        let Some(v) = value(samples, r, c, metric.key) else {
            continue;
        };
        if let Some(d) = value(samples, r, Contender::Direct, metric.key).filter(|d| *d > 0.0) {
            to_direct.push(v / d);
        }
        let peers = Contender::ALL
            .into_iter()
            .filter(|p| p.is_peer())
            .filter_map(|p| value(samples, r, p, metric.key));
        let best = if metric.higher_is_better {
            peers.fold(f64::NAN, f64::max)
        } else {
            peers.fold(f64::NAN, f64::min)
        };
        if best.is_finite() && best != 0.0 {
            to_peer.push(v / best);
        }
    }
    (median(to_direct), median(to_peer))
}

fn medians(samples: &[Sample], c: Contender, key: &str) -> f64 {
    median(
        samples
            .iter()
            .filter(|s| s.contender == c && s.key == key)
            .map(|s| s.value)
            .collect(),
    )
}

pub struct Verdict {
    pub label: String,
    pub target: String,
    pub figure: String,
    pub met: Option<bool>,
}

/// The results table (medians; each gateway's cell also carries its
/// within-round ratios to direct `×d` and to the best peer `×p`) and the
/// verdict of every target.
pub fn tables(
    samples: &[Sample],
    rounds: usize,
    contenders: &[Contender],
) -> (String, Vec<Verdict>) {
    let mut t = String::new();
    let _ = write!(t, "| metric |");
    for c in contenders {
        let _ = write!(t, " {} |", c.title());
    }
    let _ = writeln!(t, " Elsinore ÷ best peer | target | verdict |");
    let _ = write!(t, "|---|");
    for _ in contenders {
        let _ = write!(t, "---:|");
    }
    let _ = writeln!(t, "---:|---|---|");
    let mut verdicts = Vec::new();
    for metric in METRICS {
        if !samples.iter().any(|s| s.key == metric.key) {
            continue;
        }
        let unit = if metric.unit.is_empty() {
            String::new()
        } else {
            format!(" ({})", metric.unit)
        };
        let _ = write!(t, "| {}{unit} |", metric.label);
        for &c in contenders {
            let v = medians(samples, c, metric.key);
            if !v.is_finite() {
                let _ = write!(t, " – |");
                continue;
            }
            let (d, p) = if metric.ratios && c != Contender::Direct {
                ratios(samples, rounds, c, metric)
            } else {
                (f64::NAN, f64::NAN)
            };
            let mut cell = fmt_num(v);
            let mut notes = Vec::new();
            if d.is_finite() {
                notes.push(format!("×d {d:.2}"));
            }
            if p.is_finite() {
                notes.push(format!("×p {p:.2}"));
            }
            if !notes.is_empty() {
                let _ = write!(cell, " ({})", notes.join(", "));
            }
            let _ = write!(t, " {cell} |");
        }
        let (_, vs_peer) = ratios(samples, rounds, Contender::Elsinore, metric);
        let els = medians(samples, Contender::Elsinore, metric.key);
        let (target, met, figure) = match metric.target {
            Some(Target::MinVsPeer(x)) => (
                format!("≥ {x}× best peer"),
                vs_peer.is_finite().then_some(vs_peer >= x),
                format!("{vs_peer:.2}× best peer"),
            ),
            Some(Target::MaxVsPeer(x)) => (
                format!("≤ {x}× best peer"),
                vs_peer.is_finite().then_some(vs_peer <= x),
                format!("{vs_peer:.2}× best peer"),
            ),
            Some(Target::Max(x)) => (
                format!("≤ {x} {}", metric.unit),
                els.is_finite().then_some(els <= x),
                format!("{} {}", fmt_num(els), metric.unit),
            ),
            None => (String::new(), None, String::new()),
        };
        let verdict = match (metric.target.is_some(), met) {
            (false, _) => "",
            (true, Some(true)) => "**met**",
            (true, Some(false)) => "**missed**",
            (true, None) => "not measured",
        };
        let _ = writeln!(
            t,
            " {} | {target} | {verdict} |",
            if vs_peer.is_finite() && metric.ratios {
                format!("{vs_peer:.2}")
            } else {
                "–".to_owned()
            }
        );
        if metric.target.is_some() {
            verdicts.push(Verdict {
                label: metric.label.to_owned(),
                target,
                figure,
                met,
            });
        }
    }
    (t, verdicts)
}

/// Per-round figures of the headline metrics, to show the spread behind
/// each median.
pub fn per_round(samples: &[Sample], rounds: usize, contenders: &[Contender]) -> String {
    let mut t = String::new();
    let _ = write!(t, "| metric | round |");
    for c in contenders {
        let _ = write!(t, " {} |", c.title());
    }
    let _ = writeln!(t);
    let _ = write!(t, "|---|---:|");
    for _ in contenders {
        let _ = write!(t, "---:|");
    }
    let _ = writeln!(t);
    for metric in METRICS
        .iter()
        .filter(|m| m.target.is_some() || m.key.ends_with(".cpu") || m.key.ends_with(".gbps"))
    {
        for r in 1..=rounds {
            if !samples.iter().any(|s| s.key == metric.key && s.round == r) {
                continue;
            }
            let _ = write!(t, "| {} ({}) | {r} |", metric.label, metric.unit);
            for &c in contenders {
                let v = value(samples, r, c, metric.key).map_or("–".to_owned(), fmt_num);
                let _ = write!(t, " {v} |");
            }
            let _ = writeln!(t);
        }
    }
    t
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn s(round: usize, c: Contender, key: &str, value: f64) -> Sample {
        Sample {
            round,
            contender: c,
            key: key.to_owned(),
            value,
        }
    }

    #[test]
    fn ratios_use_the_best_peer_of_each_round() {
        let metric = &METRICS[0]; // http1.rps, higher is better
        let samples = vec![
            s(1, Contender::Direct, "http1.rps", 100.0),
            s(1, Contender::Elsinore, "http1.rps", 50.0),
            s(1, Contender::Nginx, "http1.rps", 40.0),
            s(1, Contender::Envoy, "http1.rps", 25.0),
            // Round 2 ran slower across the board: ratios stay the same.
            s(2, Contender::Direct, "http1.rps", 50.0),
            s(2, Contender::Elsinore, "http1.rps", 25.0),
            s(2, Contender::Nginx, "http1.rps", 10.0),
            s(2, Contender::Envoy, "http1.rps", 20.0),
        ];
        let (d, p) = ratios(&samples, 2, Contender::Elsinore, metric);
        assert!((d - 0.5).abs() < 1e-9);
        assert!((p - 1.25).abs() < 1e-9);
    }

    #[test]
    fn lower_is_better_picks_the_smallest_peer() {
        let metric = METRICS.iter().find(|m| m.key == "http1.cpu").unwrap();
        let samples = vec![
            s(1, Contender::Elsinore, "http1.cpu", 30.0),
            s(1, Contender::Nginx, "http1.cpu", 60.0),
            s(1, Contender::Haproxy, "http1.cpu", 40.0),
        ];
        let (_, p) = ratios(&samples, 1, Contender::Elsinore, metric);
        assert!((p - 0.75).abs() < 1e-9);
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(f64::NAN), "–");
    }
}
