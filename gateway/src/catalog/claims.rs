//! What one peer may claim: the names its imports may take and how much it
//! may make us hold. A pure rule module (docs/federation.md, "Names a peer
//! may claim" and "Limits per peer"): given the peer's `allowedNames` and
//! `limits`, the other peers' `allowedNames` and this mesh's export names,
//! [`Claims::check`] says whether one service a peer sent may be imported,
//! or which rule refuses it, with a message naming the rule. The consumer
//! session applies it to every upsert and NACKs a refusal; nothing here
//! does I/O or keeps state beyond the rules themselves.
//!
//! The fixed zones no peer may claim whatever the config says (IP
//! literals, `localhost`, the cluster-local zones) are
//! [`crate::config::reserved_zone`]'s, which the config also applies to
//! `allowedNames` itself.

use std::collections::HashSet;
use std::fmt;

use elsinore_federation_api::{FederatedService, StringMap};

use super::normalized;

use crate::config::{Peer, PeerLimits, ReservedZone, defaults, reserved_zone};

/// The rule that refused an entry. [`Rule::as_str`] is the `rule` label of
/// `elsinore_imports_refused_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// A name a resolver would take for an IP address.
    IpLiteral,
    /// `localhost` or a name under it.
    Localhost,
    /// Under `cluster.local`, or a last label `svc`.
    ClusterLocal,
    /// The name of one of this mesh's own exports.
    LocalExport,
    /// Not under any of the peer's `allowedNames`.
    NotAllowed,
    /// Under another peer's allowed suffix that is more specific than the
    /// one this peer's name falls under: it would shadow that peer.
    OtherPeer,
    /// `limits.services`.
    Services,
    /// `limits.instancesPerService`.
    InstancesPerService,
    /// `limits.endpointsPerService`.
    EndpointsPerService,
    /// `limits.metadataEntries`.
    MetadataEntries,
    /// `limits.metadataBytes`.
    MetadataBytes,
    /// `limits.messageBytes` (enforced by the gRPC decoder; the stream ends
    /// with RESOURCE_EXHAUSTED since no NACK can name a message not read).
    MessageBytes,
}

impl Rule {
    pub const ALL: [Rule; 12] = [
        Rule::IpLiteral,
        Rule::Localhost,
        Rule::ClusterLocal,
        Rule::LocalExport,
        Rule::NotAllowed,
        Rule::OtherPeer,
        Rule::Services,
        Rule::InstancesPerService,
        Rule::EndpointsPerService,
        Rule::MetadataEntries,
        Rule::MetadataBytes,
        Rule::MessageBytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::IpLiteral => "ip-literal",
            Rule::Localhost => "localhost",
            Rule::ClusterLocal => "cluster-local",
            Rule::LocalExport => "local-export",
            Rule::NotAllowed => "allowed-names",
            Rule::OtherPeer => "other-peer",
            Rule::Services => "limits.services",
            Rule::InstancesPerService => "limits.instancesPerService",
            Rule::EndpointsPerService => "limits.endpointsPerService",
            Rule::MetadataEntries => "limits.metadataEntries",
            Rule::MetadataBytes => "limits.metadataBytes",
            Rule::MessageBytes => "limits.messageBytes",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an entry may not be imported: the rule, and a message naming the
/// offending value and the rule (what the NACK says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The claim rules for one peer. Cheap to check: a few suffix comparisons
/// and one hash lookup per name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    peer: String,
    /// The peer's allowed suffixes (lower case, no dots at either end).
    allowed: Vec<String>,
    /// Every other peer's allowed suffixes, with the peer's name.
    others: Vec<(String, String)>,
    /// This mesh's export FQDNs, lower case.
    local: HashSet<String>,
    limits: PeerLimits,
}

impl Default for Claims {
    /// The product defaults for a peer alone in the config with no exports
    /// of ours: names under `global`, default limits.
    fn default() -> Self {
        Claims::new(
            "",
            defaults::ALLOWED_NAMES.iter().map(|s| (*s).to_owned()),
            Vec::new(),
            PeerLimits::default(),
        )
    }
}

impl Claims {
    /// The rules for peer `peer` allowed `allowed`, beside `others` (other
    /// peers and their allowed suffixes). Suffixes are compared in lower
    /// case with dots at either end ignored.
    pub fn new(
        peer: &str,
        allowed: impl IntoIterator<Item = String>,
        others: Vec<(String, String)>,
        limits: PeerLimits,
    ) -> Self {
        Claims {
            peer: peer.to_owned(),
            allowed: allowed.into_iter().map(|s| suffix(&s)).collect(),
            others: others
                .into_iter()
                .map(|(peer, s)| (peer, suffix(&s)))
                .collect(),
            local: HashSet::new(),
            limits,
        }
    }

    /// The rules for `peer` as configured, beside every other peer of `all`.
    pub fn for_peer(peer: &Peer, all: &[Peer]) -> Self {
        let others = all
            .iter()
            .filter(|p| p.name != peer.name)
            .flat_map(|p| p.allowed_names.iter().map(|s| (p.name.clone(), s.clone())))
            .collect();
        Claims::new(
            &peer.name,
            peer.allowed_names.iter().cloned(),
            others,
            peer.limits,
        )
    }

    /// Replaces the set of this mesh's export FQDNs (they change on reload).
    pub fn set_local(&mut self, fqdns: impl IntoIterator<Item = String>) {
        self.local = fqdns
            .into_iter()
            .map(|f| normalized(&f).into_owned())
            .collect();
    }

    pub fn limits(&self) -> &PeerLimits {
        &self.limits
    }

    /// Whether `service` may be imported from this peer, which holds
    /// `held` services now; `replaces` says whether a service of that name
    /// is among them (an update never counts against `limits.services`;
    /// only read when `held` is at the limit, so a caller may spare the
    /// lookup below it).
    /// Names first (the FQDN, then each instance's `<id>.<fqdn>`), then the
    /// limits; the first broken rule is returned.
    pub fn check(
        &self,
        service: &FederatedService,
        held: usize,
        replaces: bool,
    ) -> Result<(), Refusal> {
        self.check_name("fqdn", &service.fqdn)?;
        // An instance name `<id>.<fqdn>` is in the FQDN's zones and under
        // its suffixes, so only two rules can still refuse it: it spells one
        // of our exports, or it is exactly another peer's more specific
        // suffix (a name under one would have refused the FQDN). Checked
        // without building the name: this runs for every entry of a
        // 100,000-service snapshot.
        let fqdn = normalized(&service.fqdn);
        for (i, instance) in service.instances.iter().enumerate() {
            let id = instance.id.as_str();
            let spells = |s: &str| {
                s.len() == id.len() + 1 + fqdn.len()
                    && s.as_bytes()[..id.len()].eq_ignore_ascii_case(id.as_bytes())
                    && s.as_bytes()[id.len()] == b'.'
                    && s.ends_with(fqdn.as_ref())
            };
            let refuse = |rule, why: String| {
                Err(Refusal {
                    rule,
                    message: format!(
                        "instances[{i}] name \"{}.{fqdn}\" is {why}",
                        id.to_ascii_lowercase()
                    ),
                })
            };
            if !self.local.is_empty()
                && self
                    .local
                    .contains(&format!("{}.{fqdn}", id.to_ascii_lowercase()))
            {
                return refuse(
                    Rule::LocalExport,
                    "the name of one of this mesh's own exports, which no peer may claim"
                        .to_owned(),
                );
            }
            if let Some((other, theirs)) = self.others.iter().find(|(_, s)| spells(s))
                && !self.allowed.iter().any(|s| spells(s))
            {
                let mine = self.most_specific(&fqdn).map_or("", String::as_str);
                return refuse(
                    Rule::OtherPeer,
                    format!(
                        "under {theirs}, which peer {other} may claim and is more specific than this peer's {mine}: no peer may shadow another"
                    ),
                );
            }
        }
        self.check_limits(service, held, replaces)
    }

    /// Whether this peer may claim `name`; `what` names the field in the
    /// refusal (`fqdn`, `instances[0] name`).
    pub fn check_name(&self, what: &str, name: &str) -> Result<(), Refusal> {
        match self.name_refusal(name) {
            None => Ok(()),
            Some((rule, why)) => Err(Refusal {
                rule,
                message: format!("{what} {:?} is {why}", normalized(name)),
            }),
        }
    }

    /// The rule `name` breaks and why (the end of the refusal's message),
    /// or `None` when this peer may claim it.
    fn name_refusal(&self, name: &str) -> Option<(Rule, String)> {
        let name = normalized(name);
        let refuse = |rule, why: String| Some((rule, why));
        if let Some(zone) = reserved_zone(&name) {
            let rule = match zone {
                ReservedZone::IpLiteral => Rule::IpLiteral,
                ReservedZone::Localhost => Rule::Localhost,
                ReservedZone::ClusterLocal(_) => Rule::ClusterLocal,
            };
            return refuse(
                rule,
                format!("{}, which no peer may claim", zone.describe()),
            );
        }
        if !self.local.is_empty() && self.local.contains(name.as_ref()) {
            return refuse(
                Rule::LocalExport,
                "the name of one of this mesh's own exports, which no peer may claim".to_owned(),
            );
        }
        let Some(mine) = self.most_specific(&name) else {
            let allowed = if self.allowed.is_empty() {
                "none".to_owned()
            } else {
                self.allowed.join(", ")
            };
            return refuse(
                Rule::NotAllowed,
                format!(
                    "not under any name peer {} may claim (allowedNames: {allowed})",
                    self.peer
                ),
            );
        };
        if let Some((other, theirs)) = self
            .others
            .iter()
            .find(|(_, s)| is_under(&name, s) && s.len() > mine.len())
        {
            return refuse(
                Rule::OtherPeer,
                format!(
                    "under {theirs}, which peer {other} may claim and is more specific than this peer's {mine}: no peer may shadow another"
                ),
            );
        }
        None
    }

    /// The most specific of the peer's suffixes `name` is under.
    fn most_specific(&self, name: &str) -> Option<&String> {
        self.allowed
            .iter()
            .filter(|s| is_under(name, s))
            .max_by_key(|s| s.len())
    }

    fn check_limits(
        &self,
        service: &FederatedService,
        held: usize,
        replaces: bool,
    ) -> Result<(), Refusal> {
        let l = &self.limits;
        let over = |rule: Rule, what: String, n: usize, max: usize| {
            Err(Refusal {
                rule,
                message: format!(
                    "{what} {n}, more than {rule} allows for peer {} ({max})",
                    self.peer
                ),
            })
        };
        if !replaces && held >= l.services {
            return over(
                Rule::Services,
                "a new service would make the services held".to_owned(),
                held + 1,
                l.services,
            );
        }
        let counts = [
            (
                Rule::InstancesPerService,
                "instances:",
                service.instances.len(),
                l.instances_per_service,
            ),
            (
                Rule::EndpointsPerService,
                "endpoints:",
                service.endpoints.len(),
                l.endpoints_per_service,
            ),
        ];
        for (rule, what, n, max) in counts {
            if n > max {
                return over(rule, what.to_owned(), n, max);
            }
        }
        let maps = std::iter::once(("labels".to_owned(), &service.labels)).chain(
            service
                .instances
                .iter()
                .enumerate()
                .map(|(i, inst)| (format!("instances[{i}].metadata"), &inst.metadata)),
        );
        for (what, map) in maps {
            if map.len() > l.metadata_entries {
                return over(
                    Rule::MetadataEntries,
                    format!("{what} entries:"),
                    map.len(),
                    l.metadata_entries,
                );
            }
            let bytes = map_bytes(map);
            if bytes > l.metadata_bytes {
                return over(
                    Rule::MetadataBytes,
                    format!("{what} bytes (keys and values):"),
                    bytes,
                    l.metadata_bytes,
                );
            }
        }
        Ok(())
    }
}

/// Whether `name` is `suffix` or under it, label-wise (`xglobal` is not
/// under `global`).
fn is_under(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

/// A suffix as compared: lower case, no dot at either end.
fn suffix(s: &str) -> String {
    let s = s.strip_prefix('.').unwrap_or(s);
    normalized(s).into_owned()
}

fn map_bytes(map: &StringMap) -> usize {
    map.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
