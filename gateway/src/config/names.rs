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
