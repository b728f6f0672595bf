//! `peers[]`: each peer's name, trust domain, bundle, address and API
//! version, and the keys of what it may do — who may speak for it
//! (`identities`), whether we follow its bundle, which side dials, the
//! names it may claim and how much it may make us hold. Its own room
//! because every rule of catalog trust is a key here.

use std::collections::HashMap;
use std::str::FromStr;

use elsinore_certs::{SpiffeId, TrustDomain};

use super::Validator;
use crate::config::names::{is_dns_label, is_dns_name, parse_host_port, reserved_zone};
use crate::config::raw::{RawLimits, RawPeer};
use crate::config::{ApiVersion, DialMode, Imports, Peer, PeerIdentities, PeerLimits, defaults};

impl Validator<'_> {
    pub(super) fn peers(&mut self, raw: &[RawPeer], own: Option<&TrustDomain>) -> Vec<Peer> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut domains: HashMap<TrustDomain, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let at = format!("peers[{i}]");
            let errors_before = self.errors.len();
            self.item_name("peers", "peer", i, &p.name, &mut names);
            let trust_domain = self.trust_domain(&format!("{at}.trustDomain"), &p.trust_domain);
            if let Some(td) = &trust_domain {
                if own == Some(td) {
                    self.error(
                        format!("{at}.trustDomain"),
                        format!("{:?} is our own trust domain (mesh.trustDomain); a peer must have its own", td.as_str()),
                    );
                } else if let Some(&first) = domains.get(td) {
                    self.error(
                        format!("{at}.trustDomain"),
                        format!(
                            "duplicate trust domain {:?} (also peers[{first}])",
                            td.as_str()
                        ),
                    );
                } else {
                    domains.insert(td.clone(), i);
                }
            }
            let trust_bundle = self.path(&format!("{at}.trustBundle"), &p.trust_bundle);
            let federation = match &p.federation {
                None => None,
                Some(s) => match parse_host_port(s) {
                    Ok(hp) => Some(hp),
                    Err(msg) => {
                        self.error(format!("{at}.federation"), msg);
                        None
                    }
                },
            };
            let api_version = match p.api_version.as_deref() {
                None => defaults::API_VERSION,
                Some("v1alpha2") => ApiVersion::V1alpha2,
                Some("v1alpha1") => ApiVersion::V1alpha1,
                Some(other) => {
                    self.error(
                        format!("{at}.apiVersion"),
                        format!(
                            "unknown API version {other:?} (expected one of v1alpha2, v1alpha1)"
                        ),
                    );
                    defaults::API_VERSION
                }
            };
            let dial = self.dial(&at, p.dial.as_deref(), api_version);
            let allowed_names = self.allowed_names(&at, p.allowed_names.as_deref());
            let limits = self.limits(&at, &p.limits);
            let identities = trust_domain
                .as_ref()
                .map(|td| self.peer_identities(&at, td, p.identities.as_deref()));
            if let (Some(trust_domain), Some(identities), true) =
                (trust_domain, identities, self.errors.len() == errors_before)
            {
                out.push(Peer {
                    name: p.name.clone(),
                    trust_domain,
                    trust_bundle,
                    federation,
                    api_version,
                    identities,
                    follow_trust_bundle: p.follow_trust_bundle.unwrap_or(false),
                    dial,
                    allowed_names,
                    limits,
                });
            }
        }
        out
    }

    /// A learned bundle must survive a restart: after the peer's rollover
    /// the file bundle no longer admits it, so `followTrustBundle` needs
    /// `imports.cacheDir`, where the learned bundle is kept.
    pub(super) fn followed_bundles_need_a_cache(&mut self, peers: &[RawPeer], imports: &Imports) {
        if imports.cache_dir.is_some() {
            return;
        }
        for (i, p) in peers.iter().enumerate() {
            if p.follow_trust_bundle == Some(true) {
                self.error(
                    format!("peers[{i}].followTrustBundle"),
                    "requires imports.cacheDir: the bundle learned from the peer is kept there, so a restart after the peer's CA rollover still trusts it",
                );
            }
        }
    }

    /// `peers[i].identities`: absent means the peer's Elsinore gateway ID;
    /// each entry is a SPIFFE ID of the peer's trust domain, or
    /// `spiffe://<trustDomain>/*` alone for any of its identities.
    pub(super) fn peer_identities(
        &mut self,
        at: &str,
        td: &TrustDomain,
        raw: Option<&[String]>,
    ) -> PeerIdentities {
        let Some(raw) = raw else {
            return PeerIdentities::gateway_of(td);
        };
        if raw.is_empty() {
            self.error(
                format!("{at}.identities"),
                "must not be empty: leave the key out for the default (the peer's gateway, spiffe://<trustDomain>/ns/elsinore/sa/gateway), or list spiffe://<trustDomain>/* to allow any identity of the peer",
            );
            return PeerIdentities::Only(Vec::new());
        }
        let wildcard = format!("spiffe://{td}/*");
        let mut any = false;
        let mut ids: Vec<SpiffeId> = Vec::new();
        for (j, entry) in raw.iter().enumerate() {
            let path = format!("{at}.identities[{j}]");
            if *entry == wildcard {
                any = true;
                continue;
            }
            if entry.ends_with("/*") {
                self.error(
                    path,
                    format!("{entry:?}: the only wildcard is {wildcard:?} (any identity of the peer's trust domain); a path prefix cannot be matched"),
                );
                continue;
            }
            match SpiffeId::from_str(entry) {
                Err(e) => self.error(path, e.to_string()),
                Ok(id) if id.trust_domain() != td => self.error(
                    path,
                    format!(
                        "{entry:?} is in trust domain {:?}, not the peer's ({:?}, peers[].trustDomain)",
                        id.trust_domain().as_str(),
                        td.as_str()
                    ),
                ),
                Ok(id) if ids.contains(&id) => {
                    self.error(path, format!("{entry:?} is listed twice"));
                }
                Ok(id) => ids.push(id),
            }
        }
        if any {
            PeerIdentities::AnyInTrustDomain
        } else {
            PeerIdentities::Only(ids)
        }
    }

    /// `peers[i].dial`: v1alpha1 cannot carry an owner's push (its stream
    /// has a request type and a response type, not one wrapper for both).
    pub(super) fn dial(
        &mut self,
        at: &str,
        raw: Option<&str>,
        api_version: ApiVersion,
    ) -> DialMode {
        let dial = match raw {
            None => defaults::DIAL,
            Some("consumer") => DialMode::Consumer,
            Some("owner") => DialMode::Owner,
            Some(other) => {
                self.error(
                    format!("{at}.dial"),
                    format!("unknown dial direction {other:?} (expected one of consumer, owner)"),
                );
                return defaults::DIAL;
            }
        };
        if dial == DialMode::Owner && api_version == ApiVersion::V1alpha1 {
            self.error(
                format!("{at}.dial"),
                "owner needs apiVersion v1alpha2: a v1alpha1 stream cannot carry an owner's push (the consumer always dials)".to_owned(),
            );
        }
        dial
    }

    /// `peers[i].allowedNames`: DNS suffixes, written with or without a
    /// leading or trailing dot, in any case; stored in lower case without
    /// them. A suffix in a zone no peer may claim is refused, since every
    /// name under it would be refused anyway.
    pub(super) fn allowed_names(&mut self, at: &str, raw: Option<&[String]>) -> Vec<String> {
        let Some(raw) = raw else {
            return defaults::ALLOWED_NAMES
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        };
        let mut out: Vec<String> = Vec::new();
        for (j, name) in raw.iter().enumerate() {
            let path = format!("{at}.allowedNames[{j}]");
            let lower = name.to_ascii_lowercase();
            let trimmed = lower.strip_prefix('.').unwrap_or(&lower);
            let suffix = trimmed.strip_suffix('.').unwrap_or(trimmed).to_owned();
            if let Some(zone) = reserved_zone(&suffix) {
                self.error(
                    path,
                    format!("{name:?} is {}, which no peer may claim", zone.describe()),
                );
            } else if !is_dns_label(&suffix) && !is_dns_name(&suffix) {
                self.error(
                    path,
                    format!("{name:?} is not a DNS name or label (e.g. global, mesh-b.global)"),
                );
            } else if let Some(first) = out.iter().position(|s| *s == suffix) {
                self.error(
                    path,
                    format!("{suffix:?} is listed twice (also {at}.allowedNames[{first}])"),
                );
            } else {
                out.push(suffix);
            }
        }
        out
    }

    /// `peers[i].limits`: each a count of at least 1 (`messageBytes` within
    /// its own range).
    pub(super) fn limits(&mut self, at: &str, raw: &RawLimits) -> PeerLimits {
        let mut count = |key: &str, v: Option<i64>, default: usize, min: usize, max: usize| {
            let Some(n) = v else { return default };
            match usize::try_from(n) {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    self.error(
                        format!("{at}.limits.{key}"),
                        format!("{n} is out of range {min}..={max}"),
                    );
                    default
                }
            }
        };
        const MAX_COUNT: usize = 10_000_000;
        PeerLimits {
            services: count(
                "services",
                raw.services,
                defaults::LIMIT_SERVICES,
                1,
                MAX_COUNT,
            ),
            instances_per_service: count(
                "instancesPerService",
                raw.instances_per_service,
                defaults::LIMIT_INSTANCES_PER_SERVICE,
                1,
                MAX_COUNT,
            ),
            endpoints_per_service: count(
                "endpointsPerService",
                raw.endpoints_per_service,
                defaults::LIMIT_ENDPOINTS_PER_SERVICE,
                1,
                MAX_COUNT,
            ),
            message_bytes: count(
                "messageBytes",
                raw.message_bytes,
                defaults::LIMIT_MESSAGE_BYTES,
                defaults::MIN_MESSAGE_BYTES,
                defaults::MAX_MESSAGE_BYTES,
            ),
            metadata_entries: count(
                "metadataEntries",
                raw.metadata_entries,
                defaults::LIMIT_METADATA_ENTRIES,
                1,
                MAX_COUNT,
            ),
            metadata_bytes: count(
                "metadataBytes",
                raw.metadata_bytes,
                defaults::LIMIT_METADATA_BYTES,
                1,
                defaults::MAX_MESSAGE_BYTES,
            ),
        }
    }
}
