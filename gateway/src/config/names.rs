//! Syntax checks for the names and addresses a config holds: DNS labels and
//! names, and `host:port` pairs. Pure string rules, no resolution.
//!
//! The label rule is the one the wire uses
//! ([`elsinore_federation_api::is_dns_label`]); names here may be a single
//! label (`localhost`), which Hamlet FQDNs may not, hence our own
//! [`is_dns_name`].

use std::net::{IpAddr, Ipv6Addr};

use super::HostPort;

pub(super) use elsinore_federation_api::is_dns_label;

/// A DNS name of lower-case labels, at most 253 bytes, no trailing dot. The
/// last label must not be all digits, so a mistyped IPv4 address such as
/// `10.0.0.256` is not taken for a name.
pub(super) fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(is_dns_label)
        && s.rsplit('.')
            .next()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

/// An IP address or a DNS name, as written by an operator: case does not
/// matter and one trailing dot (an absolute name) is allowed.
pub(super) fn is_host(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    is_dns_name(&name.to_ascii_lowercase())
}

/// Parses `host:port`, where host is an IPv4 address, a DNS name, or an IPv6
/// address in brackets (`[::1]:9080`), and port is 1..=65535. The IPv6 host
/// is stored without its brackets; [`HostPort`]'s `Display` adds them back.
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(format!("{s:?} has '[' without a closing ']'"));
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "{host:?} in {s:?} is not an IPv6 address (only IPv6 addresses go in brackets)"
            ));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("{s:?} has no port (expected host:port)"));
        };
        (host, port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("{s:?} has no port (expected host:port)"));
        };
        if host.contains(':') {
            return Err(format!(
                "{s:?} looks like an IPv6 address without brackets (write [addr]:port)"
            ));
        }
        if !is_host(host) {
            return Err(format!(
                "host {host:?} in {s:?} is not an IP address or DNS name"
            ));
        }
        (host, port)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(format!(
                "port {port:?} in {s:?} is not a number in 1..=65535"
            ));
        }
    };
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// A zone no peer may claim whatever its `allowedNames` say
/// (docs/federation.md, "Names a peer may claim"). The rule lives here,
/// with the other pure name rules, because both the config (which refuses
/// such an `allowedNames` entry) and the consumer's claim check
/// (`catalog::claims`) apply it, and the config must not import the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservedZone {
    /// Something a resolver would take for an address: the last label is
    /// all digits (`10.0.0.1`, `1.2.3.4.5`) or a hex number (`0x7f`, as
    /// `inet_aton` reads it), a bracketed IPv6 literal, or anything that
    /// parses as an IP address.
    IpLiteral,
    /// `localhost` and names under it (RFC 6761).
    Localhost,
    /// Kubernetes' cluster-local names: `cluster.local` and names under it,
    /// and any name whose last label is `svc` (what `<svc>.<ns>.svc`
    /// becomes after the pod's search path).
    ClusterLocal(&'static str),
}

impl ReservedZone {
    /// Why no peer may claim a name in this zone, naming the zone.
    pub fn describe(self) -> &'static str {
        match self {
            ReservedZone::IpLiteral => "an IP literal",
            ReservedZone::Localhost => "under localhost",
            ReservedZone::ClusterLocal("svc") => "under the cluster-local zone svc",
            ReservedZone::ClusterLocal(_) => "under the cluster-local zone cluster.local",
        }
    }
}

/// The reserved zone `name` falls in, if any. `name` is compared in lower
/// case with one trailing dot ignored; it need not be a valid DNS name.
pub fn reserved_zone(name: &str) -> Option<ReservedZone> {
    // Borrowed in the usual case (the consumer checks every name it
    // imports): only a name with upper case is copied.
    let lower: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.to_ascii_lowercase().into()
    } else {
        name.into()
    };
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.starts_with('[') || name.parse::<IpAddr>().is_ok() {
        return Some(ReservedZone::IpLiteral);
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let digits = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if digits || hex {
        return Some(ReservedZone::IpLiteral);
    }
    if last == "localhost" {
        return Some(ReservedZone::Localhost);
    }
    if last == "svc" {
        return Some(ReservedZone::ClusterLocal("svc"));
    }
    if name == "cluster.local" || name.ends_with(".cluster.local") {
        return Some(ReservedZone::ClusterLocal("cluster.local"));
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(is_dns_label("mesh-a"));
        assert!(is_dns_label("a"));
        assert!(is_dns_label(&"a".repeat(63)));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("Mesh"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label("a.b"));
    }

    #[test]
    fn names() {
        assert!(is_dns_name("reviews.mesh-a.global"));
        assert!(is_dns_name("localhost"));
        assert!(!is_dns_name("reviews..global"));
        assert!(!is_dns_name("reviews.global."));
        assert!(!is_dns_name("10.0.0.256"));
        assert!(!is_dns_name(&format!("{}.x", "a.".repeat(126))));
        assert!(is_host("Reviews.Default.svc."));
        assert!(is_host("::1"));
    }

    #[test]
    fn reserved_zones() {
        use ReservedZone::*;
        for (name, zone) in [
            ("10.0.0.1", Some(IpLiteral)),
            ("1.2.3.4.5", Some(IpLiteral)),
            ("reviews.0x7f", Some(IpLiteral)),
            ("a.0X7F.", Some(IpLiteral)),
            ("[::1]", Some(IpLiteral)),
            ("::1", Some(IpLiteral)),
            ("reviews.1a", None),
            ("0x.global", None),
            ("localhost", Some(Localhost)),
            ("db.LOCALHOST.", Some(Localhost)),
            ("localhost.global", None),
            ("mylocalhost", None),
            (
                "kubernetes.default.svc.cluster.local",
                Some(ClusterLocal("cluster.local")),
            ),
            ("cluster.local", Some(ClusterLocal("cluster.local"))),
            ("Cluster.Local.", Some(ClusterLocal("cluster.local"))),
            ("mycluster.local", None),
            ("reviews.default.svc", Some(ClusterLocal("svc"))),
            ("svc", Some(ClusterLocal("svc"))),
            ("svc.global", None),
            ("reviews.mesh-a.global", None),
            ("global", None),
            ("", None),
        ] {
            assert_eq!(reserved_zone(name), zone, "{name:?}");
        }
    }

    #[test]
    fn host_ports() {
        let hp = |host: &str, port| HostPort {
            host: host.to_owned(),
            port,
        };
        assert_eq!(
            parse_host_port("reviews.default.svc.cluster.local:9080"),
            Ok(hp("reviews.default.svc.cluster.local", 9080))
        );
        assert_eq!(parse_host_port("10.0.0.1:80"), Ok(hp("10.0.0.1", 80)));
        assert_eq!(parse_host_port("[::1]:9080"), Ok(hp("::1", 9080)));
        assert_eq!(
            parse_host_port("[::1]:9080").map(|h| h.to_string()),
            Ok("[::1]:9080".to_owned())
        );
        for (bad, needle) in [
            ("reviews", "has no port"),
            ("reviews:0", "port \"0\""),
            ("reviews:65536", "port \"65536\""),
            ("reviews:http", "port \"http\""),
            ("reviews:", "port \"\""),
            (":80", "host \"\""),
            ("::1:80", "without brackets"),
            ("[::1]", "has no port"),
            ("[::1:80", "without a closing"),
            ("[10.0.0.1]:80", "not an IPv6 address"),
            ("bad_host:80", "host \"bad_host\""),
            ("10.0.0.256:80", "host \"10.0.0.256\""),
        ] {
            let err = parse_host_port(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
