//! Raw config → typed [`Config`]: applies the defaults, parses addresses,
//! durations and trust domains, resolves relative paths, and checks every
//! rule. It keeps going after an error so one run reports them all; each
//! error names the YAML path and the offending value. No filesystem access.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use elsinore_certs::TrustDomain;
use elsinore_federation_api::Protocol;

use super::names::{is_dns_label, is_dns_name, is_host, parse_host_port};
use super::raw::{
    RawAdvertise, RawConfig, RawDrain, RawExport, RawFederation, RawImports, RawListeners, RawProxy,
};
use super::{
    Advertise, Config, ConfigError, ConfigErrors, Drain, EgressMode, Export, FederationTuning,
    IdentityFiles, Imports, Listeners, Mesh, ProxyTuning, SharedAnswer, defaults,
};

mod peers;

const LABEL_RULE: &str =
    "lower-case letters, digits and '-', 1 to 63 long, not starting or ending with '-'";

/// Validates `raw`, resolving relative paths against `base_dir`.
pub(super) fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        base_dir,
        errors: Vec::new(),
    };
    let mesh = v.mesh(&raw.mesh.name, &raw.mesh.trust_domain);
    let identity = IdentityFiles {
        certificate: v.path("identity.certificate", &raw.identity.certificate),
        private_key: v.path("identity.privateKey", &raw.identity.private_key),
        trust_bundle: raw
            .identity
            .trust_bundle
            .as_deref()
            .map(|p| v.path("identity.trustBundle", p)),
    };
    let listeners = v.listeners(&raw.listeners);
    let advertise = v.advertise(raw.advertise.as_ref(), &raw.exports, &listeners);
    let peer_names: Vec<&str> = raw.peers.iter().map(|p| p.name.as_str()).collect();
    let exports = v.exports(&raw.exports, &raw.mesh.name, &peer_names);
    let peers = v.peers(&raw.peers, mesh.as_ref().map(|m| &m.trust_domain));
    let imports = v.imports(&raw.imports);
    v.followed_bundles_need_a_cache(&raw.peers, &imports);
    let federation = v.federation(&raw.federation);
    let proxy = v.proxy(&raw.proxy);
    let drain = v.drain(&raw.drain);
    match mesh {
        Some(mesh) if v.errors.is_empty() => Ok(Config {
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
        }),
        _ => Err(ConfigErrors(v.errors)),
    }
}

struct Validator<'a> {
    base_dir: &'a Path,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    fn mesh(&mut self, name: &str, trust_domain: &str) -> Option<Mesh> {
        if !is_dns_label(name) {
            self.error(
                "mesh.name",
                format!("{name:?} is not a DNS label ({LABEL_RULE})"),
            );
        }
        let trust_domain = self.trust_domain("mesh.trustDomain", trust_domain)?;
        Some(Mesh {
            name: name.to_owned(),
            trust_domain,
        })
    }

    fn trust_domain(&mut self, path: &str, s: &str) -> Option<TrustDomain> {
        match TrustDomain::from_str(s) {
            Ok(td) => Some(td),
            Err(e) => {
                self.error(path, e.to_string());
                None
            }
        }
    }

    /// A file or directory path: non-empty, resolved against the config's
    /// directory when relative.
    fn path(&mut self, path: &str, s: &str) -> PathBuf {
        if s.is_empty() {
            self.error(path, "must not be empty");
        }
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn socket_addr(&mut self, path: &str, s: Option<&str>, default: SocketAddr) -> SocketAddr {
        let Some(s) = s else { return default };
        match s.parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.error(
                    path,
                    format!("{s:?} is not a socket address (expected ip:port, e.g. {default})"),
                );
                default
            }
        }
    }

    fn listeners(&mut self, raw: &RawListeners) -> Listeners {
        let federation = self.socket_addr(
            "listeners.federation",
            raw.federation.as_deref(),
            defaults::FEDERATION_LISTENER,
        );
        let admin = self.socket_addr(
            "listeners.admin",
            raw.admin.as_deref(),
            defaults::ADMIN_LISTENER,
        );
        // The data-plane listeners may be switched off ("off"): a gateway
        // that only federates catalogs, or whose imports are reached some
        // other way, then binds no ingress, no egress VIPs, no DNS.
        let ingress = self.optional_socket_addr(
            "listeners.ingress",
            raw.ingress.as_deref(),
            defaults::INGRESS_LISTENER,
        );
        let egress = self.optional_socket_addr(
            "listeners.egress",
            raw.egress.as_deref(),
            defaults::EGRESS_LISTENER,
        );
        let dns =
            self.optional_socket_addr("listeners.dns", raw.dns.as_deref(), defaults::DNS_LISTENER);
        // Two listeners on one fixed address would fail at bind time with a
        // less helpful message. Port 0 (any free port) never collides, and a
        // listener that is off binds nothing.
        let all = [
            ("federation", Some(federation)),
            ("admin", Some(admin)),
            ("ingress", ingress),
            ("egress", egress),
            ("dns", dns),
        ];
        let bound: Vec<(&str, SocketAddr)> = all
            .iter()
            .filter_map(|&(name, addr)| addr.map(|a| (name, a)))
            .collect();
        for (i, (name, addr)) in bound.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = bound[..i].iter().find(|(_, a)| a == addr) {
                self.error(
                    format!("listeners.{name}"),
                    format!("{addr} is already used by listeners.{other}"),
                );
            }
        }
        Listeners {
            federation,
            admin,
            ingress,
            egress,
            dns,
        }
    }

    /// A listener that may be `off`: `None` then, else as [`Self::socket_addr`].
    fn optional_socket_addr(
        &mut self,
        path: &str,
        raw: Option<&str>,
        default: SocketAddr,
    ) -> Option<SocketAddr> {
        (raw != Some("off")).then(|| self.socket_addr(path, raw, default))
    }

    fn port(&mut self, path: &str, p: i64) -> u16 {
        match u16::try_from(p) {
            Ok(port) if port != 0 => port,
            _ => {
                self.error(path, format!("{p} is not a port in 1..=65535"));
                0
            }
        }
    }

    fn advertise(
        &mut self,
        raw: Option<&RawAdvertise>,
        exports: &[RawExport],
        listeners: &Listeners,
    ) -> Advertise {
        let ingress = listeners.ingress.unwrap_or(defaults::INGRESS_LISTENER);
        let Some(raw) = raw else {
            if let Some(first) = exports.first() {
                self.error(
                    "advertise",
                    format!(
                        "required when there are exports (exports[0] is {:?}): peers must be told where to send traffic",
                        first.name
                    ),
                );
            }
            // Never shown to a peer: without exports nothing is advertised.
            let address = if ingress.ip().is_unspecified() {
                defaults::ADVERTISE_ADDRESS.to_owned()
            } else {
                ingress.ip().to_string()
            };
            return Advertise {
                address,
                port: ingress.port(),
            };
        };
        if !is_host(&raw.address) {
            self.error(
                "advertise.address",
                format!("{:?} is not an IP address or DNS name", raw.address),
            );
        }
        let port = match raw.port {
            Some(p) => self.port("advertise.port", p),
            None if ingress.port() == 0 => {
                self.error(
                    "advertise.port",
                    "required when listeners.ingress has port 0 (the default is the ingress port)",
                );
                0
            }
            None => ingress.port(),
        };
        Advertise {
            address: raw.address.clone(),
            port,
        }
    }

    /// `<list>[i].name`, for a list whose items are named (exports, peers):
    /// a DNS label that no earlier item has. `item` is what an item is
    /// called in the message; `seen` maps each name so far to its index.
    fn item_name<'r>(
        &mut self,
        list: &str,
        item: &str,
        i: usize,
        name: &'r str,
        seen: &mut HashMap<&'r str, usize>,
    ) {
        let path = format!("{list}[{i}].name");
        if !is_dns_label(name) {
            self.error(path, format!("{name:?} is not a DNS label ({LABEL_RULE})"));
        } else if let Some(first) = seen.get(name) {
            self.error(
                path,
                format!("duplicate {item} name {name:?} (also {list}[{first}])"),
            );
        } else {
            seen.insert(name, i);
        }
    }

    /// Long because it checks each field of each export in file order, so
    /// every error names its YAML path; the checks are independent.
    fn exports(&mut self, raw: &[RawExport], mesh_name: &str, peer_names: &[&str]) -> Vec<Export> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut fqdns: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, e) in raw.iter().enumerate() {
            let at = format!("exports[{i}]");
            let errors_before = self.errors.len();
            self.item_name("exports", "export", i, &e.name, &mut names);
            let fqdn = match &e.fqdn {
                Some(f) => {
                    let lower = f.to_ascii_lowercase();
                    let fqdn = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
                    if is_dns_name(&fqdn) {
                        Some(fqdn)
                    } else {
                        self.error(
                            format!("{at}.fqdn"),
                            format!("{f:?} is not a valid DNS name"),
                        );
                        None
                    }
                }
                // An invalid name or mesh name is already reported; a
                // default built from it would only add noise.
                None if is_dns_label(&e.name) && is_dns_label(mesh_name) => {
                    Some(format!("{}.{mesh_name}.{}", e.name, defaults::FQDN_SUFFIX))
                }
                None => None,
            };
            if let Some(fqdn) = &fqdn {
                if let Some(&first) = fqdns.get(fqdn) {
                    let how = if e.fqdn.is_none() {
                        " (the default for this name)"
                    } else {
                        ""
                    };
                    self.error(
                        format!("{at}.fqdn"),
                        format!("duplicate fqdn {fqdn:?}{how} (also exports[{first}])"),
                    );
                } else {
                    fqdns.insert(fqdn.clone(), i);
                }
            }
            let protocol = match Protocol::from_str(&e.protocol) {
                Ok(p) => Some(p),
                Err(err) => {
                    self.error(format!("{at}.protocol"), err.to_string());
                    None
                }
            };
            if e.backends.is_empty() {
                self.error(format!("{at}.backends"), "at least one backend is required");
            }
            let mut backends = Vec::new();
            for (j, b) in e.backends.iter().enumerate() {
                match parse_host_port(b) {
                    Ok(hp) => backends.push(hp),
                    Err(msg) => self.error(format!("{at}.backends[{j}]"), msg),
                }
            }
            let port = match e.port {
                Some(p) => self.port(&format!("{at}.port"), p),
                // Only a valid first backend gives a default; a bad one is
                // already reported at its own path.
                None => match e.backends.first().map(|b| parse_host_port(b)) {
                    Some(Ok(hp)) => hp.port,
                    _ => 0,
                },
            };
            let mut peers: Vec<String> = Vec::new();
            for (j, p) in e.peers.iter().enumerate() {
                if !peer_names.contains(&p.as_str()) {
                    let configured = if peer_names.is_empty() {
                        "none".to_owned()
                    } else {
                        peer_names.join(", ")
                    };
                    self.error(
                        format!("{at}.peers[{j}]"),
                        format!("unknown peer {p:?} (configured peers: {configured})"),
                    );
                } else if let Some(first) = peers.iter().position(|q| q == p) {
                    self.error(
                        format!("{at}.peers[{j}]"),
                        format!("peer {p:?} is listed twice (also {at}.peers[{first}])"),
                    );
                } else {
                    peers.push(p.clone());
                }
            }
            if let (Some(fqdn), Some(protocol), true) =
                (fqdn, protocol, self.errors.len() == errors_before)
            {
                out.push(Export {
                    name: e.name.clone(),
                    fqdn,
                    protocol,
                    port,
                    backends,
                    peers,
                });
            }
        }
        out
    }

    fn duration(&mut self, path: &str, s: Option<&str>, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s) {
            Ok(d) => d,
            Err(e) => {
                self.error(
                    path,
                    format!("{s:?} is not a duration (e.g. 30s, 5m, 1h30m): {e}"),
                );
                default
            }
        }
    }

    fn positive_duration(&mut self, path: &str, s: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(path, s, default);
        if d.is_zero() {
            self.error(
                path,
                format!("{:?} must be greater than 0", s.unwrap_or("0s")),
            );
        }
        d
    }

    fn drain(&mut self, raw: &RawDrain) -> Drain {
        Drain {
            // Zero is allowed: no load balancer in front, nothing to wait for.
            delay: self.duration("drain.delay", raw.delay.as_deref(), defaults::DRAIN_DELAY),
            timeout: self.positive_duration(
                "drain.timeout",
                raw.timeout.as_deref(),
                defaults::DRAIN_TIMEOUT,
            ),
        }
    }

    fn imports(&mut self, raw: &RawImports) -> Imports {
        Imports {
            stale_after: self.positive_duration(
                "imports.staleAfter",
                raw.stale_after.as_deref(),
                defaults::STALE_AFTER,
            ),
            cache_dir: raw
                .cache_dir
                .as_deref()
                .map(|dir| self.path("imports.cacheDir", dir)),
            port_overrides: self.port_overrides(&raw.port_overrides),
        }
    }

    fn port_overrides(
        &mut self,
        raw: &std::collections::BTreeMap<String, i64>,
    ) -> std::collections::BTreeMap<String, u16> {
        let mut out = std::collections::BTreeMap::new();
        for (name, port) in raw {
            let at = format!("imports.portOverrides.{name}");
            let lower = name.to_ascii_lowercase();
            let fqdn = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
            if !is_dns_name(&fqdn) {
                self.error(at, format!("{name:?} is not a valid DNS name"));
                continue;
            }
            let port = self.port(&at, *port);
            if out.insert(fqdn.clone(), port).is_some() {
                self.error(
                    at,
                    format!("{fqdn:?} is listed twice (names are case-insensitive)"),
                );
            }
        }
        out
    }

    fn federation(&mut self, raw: &RawFederation) -> FederationTuning {
        let window = match raw.window {
            None => defaults::WINDOW,
            Some(w) => match u32::try_from(w) {
                Ok(w) if (1..=defaults::MAX_WINDOW).contains(&w) => w,
                _ => {
                    self.error(
                        "federation.window",
                        format!("{w} is out of range 1..={}", defaults::MAX_WINDOW),
                    );
                    defaults::WINDOW
                }
            },
        };
        let ack_timeout = self.positive_duration(
            "federation.ackTimeout",
            raw.ack_timeout.as_deref(),
            defaults::ACK_TIMEOUT,
        );
        let snapshot_quiet_period = self.positive_duration(
            "federation.snapshotQuietPeriod",
            raw.snapshot_quiet_period.as_deref(),
            defaults::SNAPSHOT_QUIET_PERIOD,
        );
        let initial_raw = raw.backoff.initial.as_deref();
        let backoff_initial = self.duration(
            "federation.backoff.initial",
            initial_raw,
            defaults::BACKOFF_INITIAL,
        );
        if backoff_initial < defaults::MIN_BACKOFF_INITIAL {
            self.error(
                "federation.backoff.initial",
                format!(
                    "{:?} is below the minimum of {} (the Hamlet spec forbids faster reconnects)",
                    initial_raw.unwrap_or_default(),
                    humantime::format_duration(defaults::MIN_BACKOFF_INITIAL)
                ),
            );
        }
        let max_raw = raw.backoff.max.as_deref();
        let backoff_max = self.duration("federation.backoff.max", max_raw, defaults::BACKOFF_MAX);
        if backoff_max < backoff_initial {
            self.error(
                "federation.backoff.max",
                format!(
                    "{} is less than federation.backoff.initial ({})",
                    humantime::format_duration(backoff_max),
                    humantime::format_duration(backoff_initial)
                ),
            );
        }
        FederationTuning {
            window,
            ack_timeout,
            snapshot_quiet_period,
            backoff_initial,
            backoff_max,
        }
    }

    fn proxy(&mut self, raw: &RawProxy) -> ProxyTuning {
        let vip_range = match raw.vip_range.as_deref() {
            None => defaults::VIP_RANGE,
            Some(r) => match r.parse::<super::VipRange>() {
                Ok(range) => range,
                Err(msg) => {
                    self.error("proxy.vipRange", msg);
                    defaults::VIP_RANGE
                }
            },
        };
        let mut count = |path: &str, v: Option<i64>, default: u64, max: u64| -> u64 {
            match v {
                None => default,
                Some(n) if n >= 1 && (n as u64) <= max => n as u64,
                Some(n) => {
                    self.error(path, format!("{n} is out of range 1..={max}"));
                    default
                }
            }
        };
        let max_connections = count(
            "proxy.maxConnections",
            raw.max_connections,
            defaults::MAX_CONNECTIONS as u64,
            1_000_000,
        ) as usize;
        let http2_max_concurrent_streams = count(
            "proxy.http2MaxConcurrentStreams",
            raw.http2_max_concurrent_streams,
            u64::from(defaults::HTTP2_MAX_CONCURRENT_STREAMS),
            u64::from(u32::MAX),
        ) as u32;
        ProxyTuning {
            vip_range,
            connect_timeout: self.positive_duration(
                "proxy.connectTimeout",
                raw.connect_timeout.as_deref(),
                defaults::CONNECT_TIMEOUT,
            ),
            handshake_timeout: self.positive_duration(
                "proxy.handshakeTimeout",
                raw.handshake_timeout.as_deref(),
                defaults::HANDSHAKE_TIMEOUT,
            ),
            idle_timeout: self.positive_duration(
                "proxy.idleTimeout",
                raw.idle_timeout.as_deref(),
                defaults::IDLE_TIMEOUT,
            ),
            request_timeout: self.positive_duration(
                "proxy.requestTimeout",
                raw.request_timeout.as_deref(),
                defaults::REQUEST_TIMEOUT,
            ),
            max_connections,
            http2_max_concurrent_streams,
            tls_resumption: raw.tls_resumption.unwrap_or(true),
            yield_to_clients: raw.yield_to_clients.unwrap_or(false),
            mode: self.egress_mode(raw),
            vip_listener_budget: raw
                .vip_listener_budget
                .and_then(|n| match usize::try_from(n) {
                    Ok(n) if n <= 1_000_000 => Some(n),
                    _ => {
                        self.error(
                            "proxy.vipListenerBudget",
                            format!("{n} is out of range 0..=1000000"),
                        );
                        None
                    }
                }),
        }
    }

    fn egress_mode(&mut self, raw: &RawProxy) -> EgressMode {
        match (raw.mode.as_deref(), &raw.shared) {
            (None | Some("vip"), None) => EgressMode::Vip,
            (None | Some("vip"), Some(_)) => {
                self.error(
                    "proxy.shared",
                    "only meaningful with proxy.mode: shared (the mode is vip)",
                );
                EgressMode::Vip
            }
            (Some("shared"), None) => {
                self.error(
                    "proxy.shared",
                    "required with proxy.mode: shared (at least shared.answer: the address or name DNS answers for every import)",
                );
                EgressMode::Vip
            }
            (Some("shared"), Some(shared)) => {
                let answer = if let Ok(ip) = shared.answer.parse::<std::net::Ipv4Addr>() {
                    SharedAnswer::Address(ip)
                } else {
                    let lower = shared.answer.to_ascii_lowercase();
                    let name = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
                    if !is_dns_name(&name) || name.parse::<std::net::IpAddr>().is_ok() {
                        self.error(
                            "proxy.shared.answer",
                            format!(
                                "{:?} is neither an IPv4 address nor a DNS name",
                                shared.answer
                            ),
                        );
                    }
                    SharedAnswer::Cname(name)
                };
                let bind = match shared.bind.as_deref() {
                    None => defaults::SHARED_BIND,
                    Some(b) => b.parse().unwrap_or_else(|_| {
                        self.error(
                            "proxy.shared.bind",
                            format!("{b:?} is not an IP address (e.g. 0.0.0.0)"),
                        );
                        defaults::SHARED_BIND
                    }),
                };
                EgressMode::Shared { answer, bind }
            }
            (Some(other), _) => {
                self.error(
                    "proxy.mode",
                    format!("unknown mode {other:?} (expected vip or shared)"),
                );
                EgressMode::Vip
            }
        }
    }
}
