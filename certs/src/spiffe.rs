//! SPIFFE IDs and trust domains as validated newtypes, compared as types and
//! never by string prefix.

use std::fmt;
use std::str::FromStr;

/// A SPIFFE trust domain, e.g. `mesh-a.example` (lower case letters, digits,
/// `.`, `-`, `_`; at most 255 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://<trust domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Either empty or starting with `/`.
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain {0:?} is too long (at most 255 bytes)")]
    TrustDomainTooLong(String),
    #[error(
        "trust domain {0:?} has a character other than lower-case letters, digits, '.', '-' or '_'"
    )]
    BadTrustDomainChar(String),
    #[error("SPIFFE ID {0:?} does not start with spiffe://")]
    MissingScheme(String),
    #[error(
        "SPIFFE ID {0:?} has an invalid path (segments must be non-empty, not '.' or '..', of letters, digits, '.', '-', '_')"
    )]
    BadPath(String),
    #[error("SPIFFE ID {0:?} must not have a query, fragment, port or user info")]
    Extra(String),
}

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain);
        }
        if s.len() > 255 {
            return Err(SpiffeError::TrustDomainTooLong(s.to_owned()));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(SpiffeError::BadTrustDomainChar(s.to_owned()));
        }
        Ok(TrustDomain(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, path: &str) -> Result<Self, SpiffeError> {
        let id = SpiffeId {
            trust_domain,
            path: path.to_owned(),
        };
        validate_path(&id.path).map_err(|()| SpiffeError::BadPath(id.to_string()))?;
        Ok(id)
    }

    /// The gateway identity Elsinore mints: `spiffe://TD/ns/elsinore/sa/gateway`.
    pub fn gateway(trust_domain: TrustDomain) -> Self {
        SpiffeId {
            trust_domain,
            path: "/ns/elsinore/sa/gateway".to_owned(),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

fn validate_path(path: &str) -> Result<(), ()> {
    if path.is_empty() {
        return Ok(());
    }
    let rest = path.strip_prefix('/').ok_or(())?;
    for seg in rest.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(());
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(());
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::MissingScheme(s.to_owned()))?;
        if rest.contains(['?', '#', '@', ':']) {
            return Err(SpiffeError::Extra(s.to_owned()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain: TrustDomain = td.parse()?;
        validate_path(path).map_err(|()| SpiffeError::BadPath(s.to_owned()))?;
        Ok(SpiffeId {
            trust_domain,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://mesh-a.example/ns/elsinore/sa/gateway"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain().as_str(), "mesh-a.example");
        assert_eq!(id.path(), "/ns/elsinore/sa/gateway");
        assert_eq!(
            id.to_string(),
            "spiffe://mesh-a.example/ns/elsinore/sa/gateway"
        );
        assert_eq!(id, SpiffeId::gateway("mesh-a.example".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "http://mesh-a/x",
            "spiffe://",
            "spiffe://Mesh-A/x",
            "spiffe://mesh-a/x//y",
            "spiffe://mesh-a/../y",
            "spiffe://mesh-a:443/x",
            "spiffe://mesh-a/x?q=1",
            "spiffe://mesh-a/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn trust_domain_is_compared_as_a_type() {
        let a: SpiffeId = "spiffe://mesh-a/x".parse().unwrap();
        let b: SpiffeId = "spiffe://mesh-a.evil/x".parse().unwrap();
        assert_ne!(a.trust_domain(), b.trust_domain());
    }
}
