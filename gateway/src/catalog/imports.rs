//! The merged view of everything imported from peers, with the aliasing and
//! collision rules (docs/aliasing.md). [`resolve`] is a pure function of the
//! local export names, the peers in config order and each peer's services,
//! so the same inputs always give the same names whatever order messages
//! arrived in, and a restart never renames anything. It owns no state: the
//! runtime's merger task calls [`merge`] again after every change and
//! publishes the result whole ([`resolve_reusing`] shares the unchanged
//! entries of the previous view, so a rebuild allocates only for what
//! changed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use elsinore_federation_api::FederatedService;

use super::{ExportCatalog, normalized};

/// An imported service as registered under a name in this mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub peer: String,
    pub name: String,
    /// The FQDN the owner sent, unchanged.
    pub original_fqdn: String,
    /// Whether it is registered under an alias rather than its own FQDN.
    pub alias: bool,
    pub service: Arc<FederatedService>,
}

/// Who already held a name an import asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// One of our own exports.
    Local,
    /// An import of that peer (possibly the same peer as the claimant).
    Peer(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Local => f.write_str("a local export"),
            Owner::Peer(p) => write!(f, "peer {p}"),
        }
    }
}

/// What became of an import whose FQDN was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Registered under this alias instead.
    Aliased(String),
    /// Not registered at all: its alias was taken too (or is not a valid
    /// DNS name).
    Dropped,
}

/// An import that could not have its own FQDN, reported on /catalog and in
/// the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    pub peer: String,
    pub name: String,
    /// The FQDN the owner sent.
    pub fqdn: String,
    /// Who holds that FQDN.
    pub with: Owner,
    pub resolution: Resolution,
}

impl fmt::Display for Collision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {:?} of peer {} claims {} which belongs to {}; ",
            self.name, self.peer, self.fqdn, self.with
        )?;
        match &self.resolution {
            Resolution::Aliased(alias) => write!(f, "registered as {alias}"),
            Resolution::Dropped => write!(
                f,
                "dropped: its alias {} is taken or not a valid name",
                alias_for(&self.name, &self.peer)
            ),
        }
    }
}

/// The resolved names of all imports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportsView {
    /// Registered name (lower case, no trailing dot) → import. Both are
    /// shared with the VIP table and with the next view, not copied.
    pub by_fqdn: BTreeMap<Arc<str>, Arc<Resolved>>,
    /// In priority order (peer config order, then service name).
    pub collisions: Vec<Collision>,
    /// Local export names (normalized), kept so that lookups never let an
    /// instance name of an import shadow a local name.
    #[cfg(test)]
    local: BTreeSet<String>,
}

impl ImportsView {
    /// The import registered under `fqdn` (case-insensitive, trailing dot
    /// ignored), or whose instance name `<instance id>.<registered fqdn>`
    /// it is. An exact registered name wins over an instance name. Only the
    /// tests ask: the data plane looks names up in the VIP table.
    #[cfg(test)]
    pub fn lookup(&self, fqdn: &str) -> Option<&Resolved> {
        let key = normalized(fqdn);
        if let Some(r) = self.by_fqdn.get(key.as_ref()) {
            return Some(r);
        }
        if self.local.contains(key.as_ref()) {
            return None;
        }
        let (first, rest) = key.split_once('.')?;
        let r = self.by_fqdn.get(rest)?;
        r.service
            .instances
            .iter()
            .any(|i| i.id.eq_ignore_ascii_case(first))
            .then_some(r)
    }

    /// The registered names (and imports) that came from `peer`.
    pub fn for_peer<'a>(
        &'a self,
        peer: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Arc<Resolved>)> {
        self.by_fqdn
            .iter()
            .filter(move |(_, r)| r.peer == peer)
            .map(|(k, r)| (&**k, r))
    }
}

/// The alias an import is registered under when its FQDN is taken:
/// `<service name>.<peer name>.global`, lower case.
pub fn alias_for(service_name: &str, peer: &str) -> String {
    format!(
        "{}.{}.global",
        service_name.to_ascii_lowercase(),
        peer.to_ascii_lowercase()
    )
}

/// Resolves every import to the name it is registered under.
///
/// `local_fqdns` are our own exports' FQDNs; `peers` lists each peer with
/// its services, peers in config order (earlier = higher priority). Rules:
/// 1. local exports always keep their names;
/// 2. each import claims its own FQDN, in priority order: peer config order,
///    then service name within a peer; the first claimant keeps it;
/// 3. only after every own FQDN is settled, each import that lost its claim
///    is registered under `<service name>.<peer name>.global`, in the same
///    order, unless that alias is already taken (or not a valid DNS name),
///    in which case it is dropped. Every loser is reported in `collisions`.
///
/// Own names go before any alias so that a service's real FQDN can only be
/// taken by a local export or a higher-priority peer, never by someone
/// else's alias.
pub fn resolve(
    local_fqdns: &BTreeSet<String>,
    peers: &[(String, Vec<Arc<FederatedService>>)],
) -> ImportsView {
    resolve_reusing(local_fqdns, peers, &ImportsView::default())
}

/// [`resolve`], sharing with `previous` every entry that comes out the
/// same (same registered name, peer, alias flag and service object), so
/// that republishing 100,000 imports after one change copies none of them.
/// The result equals `resolve(local_fqdns, peers)` whatever `previous` is.
pub fn resolve_reusing(
    local_fqdns: &BTreeSet<String>,
    peers: &[(String, Vec<Arc<FederatedService>>)],
    previous: &ImportsView,
) -> ImportsView {
    let local: BTreeSet<String> = local_fqdns
        .iter()
        .map(|f| normalized(f).into_owned())
        .collect();
    let mut by_fqdn: BTreeMap<Arc<str>, Arc<Resolved>> = BTreeMap::new();
    let mut losers = Vec::new();
    // A name is taken by a local export or by whatever is registered under
    // it so far; `by_fqdn` doubles as the record of the latter.
    let holder = |by_fqdn: &BTreeMap<Arc<str>, Arc<Resolved>>, key: &str| {
        if local.contains(key) {
            Some(Owner::Local)
        } else {
            by_fqdn.get(key).map(|r| Owner::Peer(r.peer.clone()))
        }
    };

    for (peer, services) in peers {
        // Arrival order must not matter, so sort; ties on name (which an
        // owner should never send) fall back to the FQDN.
        let mut services: Vec<&Arc<FederatedService>> = services.iter().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.fqdn.cmp(&b.fqdn)));
        for service in services {
            let key = normalized(&service.fqdn);
            if let Some(owner) = holder(&by_fqdn, &key) {
                losers.push((peer, service, owner));
                continue;
            }
            let (key, r) = registered(previous, &key, peer, service, false);
            by_fqdn.insert(key, r);
        }
    }

    let mut collisions = Vec::with_capacity(losers.len());
    for (peer, service, with) in losers {
        let alias = alias_for(&service.name, peer);
        // Service names come from foreign peers: an alias built from one is checked.
        let resolution =
            if elsinore_federation_api::is_dns_name(&alias) && holder(&by_fqdn, &alias).is_none() {
                let (key, r) = registered(previous, &alias, peer, service, true);
                by_fqdn.insert(key, r);
                Resolution::Aliased(alias)
            } else {
                Resolution::Dropped
            };
        collisions.push(Collision {
            peer: peer.clone(),
            name: service.name.clone(),
            fqdn: service.fqdn.clone(),
            with,
            resolution,
        });
    }

    ImportsView {
        by_fqdn,
        collisions,
        #[cfg(test)]
        local,
    }
}

/// The merge of imports: the view to publish next, from our exports (whose
/// names win over imported ones), each peer's services (peers in config
/// order) and the view published last. Entries that did not change are
/// shared with `previous` rather than rebuilt: during a snapshot of 100,000
/// entries the old and new views are alive together, and copies of both
/// would be the gateway's peak memory.
pub fn merge(
    exports: &ExportCatalog,
    peers: &[(String, Vec<Arc<FederatedService>>)],
    previous: &ImportsView,
) -> ImportsView {
    resolve_reusing(&exports.fqdns(), peers, previous)
}

/// The entry registering `service` under `key`: the previous view's one if
/// it is the same, else a new one.
fn registered(
    previous: &ImportsView,
    key: &str,
    peer: &str,
    service: &Arc<FederatedService>,
    alias: bool,
) -> (Arc<str>, Arc<Resolved>) {
    if let Some((k, r)) = previous.by_fqdn.get_key_value(key)
        && r.peer == peer
        && r.alias == alias
        && Arc::ptr_eq(&r.service, service)
    {
        return (Arc::clone(k), Arc::clone(r));
    }
    let r = Resolved {
        peer: peer.to_owned(),
        name: service.name.clone(),
        original_fqdn: service.fqdn.clone(),
        alias,
        service: Arc::clone(service),
    };
    (Arc::from(key), Arc::new(r))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use elsinore_federation_api::{Instance, Protocol, StringMap};

    fn svc(name: &str, fqdn: &str) -> Arc<FederatedService> {
        Arc::new(FederatedService {
            name: name.to_owned(),
            description: String::new(),
            tags: vec![],
            labels: StringMap::new(),
            fqdn: fqdn.to_owned(),
            endpoints: vec![],
            sans: vec![],
            instances: vec![Instance {
                id: "east".to_owned(),
                protocol: Protocol::Http,
                metadata: StringMap::new(),
                endpoint_selector: vec![],
                description: String::new(),
            }],
        })
    }

    fn local(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn peer(
        name: &str,
        services: Vec<Arc<FederatedService>>,
    ) -> (String, Vec<Arc<FederatedService>>) {
        (name.to_owned(), services)
    }

    /// (registered name, peer, service name, alias) for compact asserts.
    fn names(view: &ImportsView) -> Vec<(String, String, String, bool)> {
        view.by_fqdn
            .iter()
            .map(|(k, r)| (k.to_string(), r.peer.clone(), r.name.clone(), r.alias))
            .collect()
    }

    fn row(k: &str, p: &str, n: &str, alias: bool) -> (String, String, String, bool) {
        (k.to_owned(), p.to_owned(), n.to_owned(), alias)
    }

    #[test]
    fn no_collision_keeps_own_names() {
        let view = resolve(
            &local(&["reviews.mesh-a.global"]),
            &[peer(
                "mesh-b",
                vec![svc("ratings", "ratings.mesh-b.global")],
            )],
        );
        assert_eq!(
            names(&view),
            [row("ratings.mesh-b.global", "mesh-b", "ratings", false)]
        );
        assert!(view.collisions.is_empty());
        let r = view.lookup("ratings.mesh-b.global").unwrap();
        assert_eq!(r.original_fqdn, "ratings.mesh-b.global");
    }

    #[test]
    fn local_export_keeps_its_name() {
        let view = resolve(
            &local(&["reviews.global"]),
            &[peer("mesh-b", vec![svc("reviews", "reviews.global")])],
        );
        assert_eq!(
            names(&view),
            [row("reviews.mesh-b.global", "mesh-b", "reviews", true)]
        );
        assert_eq!(
            view.collisions,
            [Collision {
                peer: "mesh-b".to_owned(),
                name: "reviews".to_owned(),
                fqdn: "reviews.global".to_owned(),
                with: Owner::Local,
                resolution: Resolution::Aliased("reviews.mesh-b.global".to_owned()),
            }]
        );
        // The local name is never answered from imports.
        assert!(view.lookup("reviews.global").is_none());
        let r = view.lookup("reviews.mesh-b.global").unwrap();
        assert!(r.alias);
        assert_eq!(r.original_fqdn, "reviews.global");
        assert!(
            view.collisions[0]
                .to_string()
                .contains("registered as reviews.mesh-b.global")
        );
    }

    #[test]
    fn earlier_peer_wins_whatever_the_arrival_order() {
        let b = vec![
            svc("reviews", "reviews.global"),
            svc("details", "details.mesh-b.global"),
        ];
        let c = vec![
            svc("zeta", "zeta.mesh-c.global"),
            svc("reviews", "reviews.global"),
        ];
        let expected = vec![
            row("details.mesh-b.global", "mesh-b", "details", false),
            row("reviews.global", "mesh-b", "reviews", false),
            row("reviews.mesh-c.global", "mesh-c", "reviews", true),
            row("zeta.mesh-c.global", "mesh-c", "zeta", false),
        ];
        let mut rev_b = b.clone();
        rev_b.reverse();
        let mut rev_c = c.clone();
        rev_c.reverse();
        let first = resolve(
            &local(&[]),
            &[peer("mesh-b", b.clone()), peer("mesh-c", c.clone())],
        );
        let second = resolve(&local(&[]), &[peer("mesh-b", rev_b), peer("mesh-c", rev_c)]);
        assert_eq!(names(&first), expected);
        assert_eq!(first, second);
        assert_eq!(first.collisions.len(), 1);
        assert_eq!(first.collisions[0].with, Owner::Peer("mesh-b".to_owned()));

        // Config order is the priority: swap the peers, and mesh-c keeps it.
        let swapped = resolve(&local(&[]), &[peer("mesh-c", c), peer("mesh-b", b)]);
        assert_eq!(swapped.lookup("reviews.global").unwrap().peer, "mesh-c");
        assert_eq!(
            swapped.lookup("reviews.mesh-b.global").unwrap().peer,
            "mesh-b"
        );
    }

    #[test]
    fn within_one_peer_the_smaller_name_keeps_the_fqdn() {
        for services in [
            vec![svc("web-v2", "web.global"), svc("web", "web.global")],
            vec![svc("web", "web.global"), svc("web-v2", "web.global")],
        ] {
            let view = resolve(&local(&[]), &[peer("mesh-b", services)]);
            assert_eq!(
                names(&view),
                [
                    row("web-v2.mesh-b.global", "mesh-b", "web-v2", true),
                    row("web.global", "mesh-b", "web", false),
                ]
            );
            assert_eq!(view.collisions[0].with, Owner::Peer("mesh-b".to_owned()));
        }
    }

    #[test]
    fn alias_taken_means_dropped() {
        // mesh-c's reviews loses reviews.global to mesh-b, and its alias
        // reviews.mesh-c.global is a real FQDN that mesh-b exports.
        let view = resolve(
            &local(&[]),
            &[
                peer(
                    "mesh-b",
                    vec![
                        svc("reviews", "reviews.global"),
                        svc("imposter", "reviews.mesh-c.global"),
                    ],
                ),
                peer("mesh-c", vec![svc("reviews", "reviews.global")]),
            ],
        );
        assert_eq!(view.by_fqdn.len(), 2);
        assert!(view.for_peer("mesh-c").next().is_none());
        assert_eq!(
            view.collisions,
            [Collision {
                peer: "mesh-c".to_owned(),
                name: "reviews".to_owned(),
                fqdn: "reviews.global".to_owned(),
                with: Owner::Peer("mesh-b".to_owned()),
                resolution: Resolution::Dropped,
            }]
        );
        assert!(view.collisions[0].to_string().contains("dropped"));

        // An alias that equals a local name is dropped too.
        let view = resolve(
            &local(&["reviews.global", "reviews.mesh-b.global"]),
            &[peer("mesh-b", vec![svc("reviews", "reviews.global")])],
        );
        assert!(view.by_fqdn.is_empty());
        assert_eq!(view.collisions[0].resolution, Resolution::Dropped);

        // Two aliases that coincide: the earlier peer gets it.
        let view = resolve(
            &local(&["a.global", "b.global"]),
            &[
                peer("mesh-b", vec![svc("x", "a.global")]),
                peer("mesh-b", vec![svc("x", "b.global")]),
            ],
        );
        assert_eq!(view.by_fqdn["x.mesh-b.global"].original_fqdn, "a.global");
        assert_eq!(view.collisions[1].resolution, Resolution::Dropped);
    }

    #[test]
    fn own_names_beat_aliases() {
        // mesh-b (higher priority) is aliased to reviews.mesh-b.global, but
        // mesh-c's service really has that FQDN: the real name wins.
        let view = resolve(
            &local(&["reviews.global"]),
            &[
                peer("mesh-b", vec![svc("reviews", "reviews.global")]),
                peer("mesh-c", vec![svc("copy", "reviews.mesh-b.global")]),
            ],
        );
        assert_eq!(
            names(&view),
            [row("reviews.mesh-b.global", "mesh-c", "copy", false)]
        );
        assert_eq!(view.collisions[0].resolution, Resolution::Dropped);
    }

    #[test]
    fn names_are_compared_case_insensitively() {
        let view = resolve(
            &local(&["Reviews.Mesh-A.Global"]),
            &[
                peer("mesh-b", vec![svc("Reviews", "REVIEWS.mesh-a.global.")]),
                peer("mesh-c", vec![svc("ratings", "Ratings.Global")]),
                peer("mesh-d", vec![svc("ratings", "ratings.global")]),
            ],
        );
        assert_eq!(
            names(&view),
            [
                row("ratings.global", "mesh-c", "ratings", false),
                row("ratings.mesh-d.global", "mesh-d", "ratings", true),
                row("reviews.mesh-b.global", "mesh-b", "Reviews", true),
            ]
        );
        assert_eq!(view.collisions[0].with, Owner::Local);
        assert_eq!(
            view.lookup("RATINGS.GLOBAL").unwrap().original_fqdn,
            "Ratings.Global"
        );
    }

    #[test]
    fn lookup_ignores_trailing_dot_and_case_and_knows_instances() {
        let view = resolve(
            &local(&["reviews.mesh-a.global"]),
            &[peer(
                "mesh-b",
                vec![svc("ratings", "ratings.mesh-b.global")],
            )],
        );
        assert_eq!(
            view.lookup("ratings.mesh-b.global.").unwrap().name,
            "ratings"
        );
        assert_eq!(
            view.lookup("Ratings.Mesh-B.Global.").unwrap().name,
            "ratings"
        );
        // `<instance id>.<registered fqdn>` belongs to the registered name.
        assert_eq!(
            view.lookup("EAST.ratings.mesh-b.global.").unwrap().name,
            "ratings"
        );
        assert!(view.lookup("west.ratings.mesh-b.global").is_none());
        assert!(view.lookup("mesh-b.global").is_none());
        assert!(view.lookup("reviews.mesh-a.global").is_none());
        assert!(view.lookup("").is_none());
    }

    #[test]
    fn for_peer_lists_only_that_peer() {
        let view = resolve(
            &local(&[]),
            &[
                peer("mesh-b", vec![svc("a", "a.global"), svc("b", "b.global")]),
                peer("mesh-c", vec![svc("a", "a.global")]),
            ],
        );
        let b: Vec<_> = view.for_peer("mesh-b").map(|(k, _)| k).collect();
        assert_eq!(b, ["a.global", "b.global"]);
        let c: Vec<_> = view.for_peer("mesh-c").map(|(k, _)| k).collect();
        assert_eq!(c, ["a.mesh-c.global"]);
    }

    /// The example of docs/aliasing.md, both peer orders.
    #[test]
    fn documented_example() {
        let b = || {
            peer(
                "mesh-b",
                vec![
                    svc("reviews", "reviews.global"),
                    svc("ratings", "ratings.global"),
                    svc("details", "details.mesh-c.global"),
                ],
            )
        };
        let c = || {
            peer(
                "mesh-c",
                vec![
                    svc("ratings", "Ratings.Global."),
                    svc("details", "details.global"),
                    svc("web", "details.mesh-c.global"),
                ],
            )
        };
        let view = resolve(&local(&["reviews.global"]), &[b(), c()]);
        assert_eq!(
            names(&view),
            [
                row("details.global", "mesh-c", "details", false),
                row("details.mesh-c.global", "mesh-b", "details", false),
                row("ratings.global", "mesh-b", "ratings", false),
                row("ratings.mesh-c.global", "mesh-c", "ratings", true),
                row("reviews.mesh-b.global", "mesh-b", "reviews", true),
                row("web.mesh-c.global", "mesh-c", "web", true),
            ]
        );
        let reported: Vec<_> = view
            .collisions
            .iter()
            .map(|c| {
                (
                    c.peer.as_str(),
                    c.name.as_str(),
                    c.with.clone(),
                    c.resolution.clone(),
                )
            })
            .collect();
        let aliased = |s: &str| Resolution::Aliased(s.to_owned());
        let by = |s: &str| Owner::Peer(s.to_owned());
        assert_eq!(
            reported,
            [
                (
                    "mesh-b",
                    "reviews",
                    Owner::Local,
                    aliased("reviews.mesh-b.global")
                ),
                (
                    "mesh-c",
                    "ratings",
                    by("mesh-b"),
                    aliased("ratings.mesh-c.global")
                ),
                ("mesh-c", "web", by("mesh-b"), aliased("web.mesh-c.global")),
            ]
        );

        let swapped = resolve(&local(&["reviews.global"]), &[c(), b()]);
        assert_eq!(swapped.lookup("ratings.global").unwrap().peer, "mesh-c");
        assert_eq!(swapped.lookup("details.mesh-c.global").unwrap().name, "web");
        assert_eq!(
            swapped.lookup("ratings.mesh-b.global").unwrap().name,
            "ratings"
        );
        assert_eq!(
            swapped.lookup("details.mesh-b.global").unwrap().name,
            "details"
        );
    }

    /// Reusing a previous view gives the same result as resolving afresh,
    /// shares the entries that did not change and rebuilds those that did.
    #[test]
    fn reusing_shares_unchanged_entries_only() {
        let reviews = svc("reviews", "reviews.global");
        let ratings = svc("ratings", "ratings.global");
        let details = svc("details", "details.global");
        let first = resolve(
            &local(&[]),
            &[
                peer("mesh-b", vec![reviews.clone(), ratings.clone()]),
                peer("mesh-c", vec![svc("reviews", "reviews.global")]),
            ],
        );
        // ratings is replaced by a new object with the same content, details
        // is new, and mesh-c's reviews (an alias) keeps its object.
        let ratings_again = svc("ratings", "ratings.global");
        let mesh_c_reviews = first.by_fqdn["reviews.mesh-c.global"].service.clone();
        let peers = [
            peer("mesh-b", vec![reviews.clone(), ratings_again, details]),
            peer("mesh-c", vec![mesh_c_reviews]),
        ];
        let second = resolve_reusing(&local(&[]), &peers, &first);
        assert_eq!(second, resolve(&local(&[]), &peers));
        let shared = |k: &str| Arc::ptr_eq(&first.by_fqdn[k], &second.by_fqdn[k]);
        assert!(shared("reviews.global"));
        assert!(shared("reviews.mesh-c.global"));
        assert!(!shared("ratings.global"));
        assert!(second.by_fqdn.contains_key("details.global"));

        // The same object under another peer, or no longer aliased, is a
        // different registration and is rebuilt.
        let third = resolve_reusing(
            &local(&["reviews.global"]),
            &[peer("mesh-d", vec![reviews.clone()])],
            &second,
        );
        assert_eq!(
            names(&third),
            [row("reviews.mesh-d.global", "mesh-d", "reviews", true)]
        );
        let fourth = resolve_reusing(&local(&[]), &[peer("mesh-b", vec![reviews])], &first);
        assert!(Arc::ptr_eq(
            &first.by_fqdn["reviews.global"],
            &fourth.by_fqdn["reviews.global"]
        ));
        let fifth = resolve_reusing(
            &local(&[]),
            &[peer(
                "mesh-c",
                vec![first.by_fqdn["reviews.global"].service.clone()],
            )],
            &first,
        );
        assert_eq!(fifth.by_fqdn["reviews.global"].peer, "mesh-c");
    }

    #[test]
    fn invalid_alias_is_dropped() {
        let view = resolve(
            &local(&["x.global"]),
            &[peer("mesh-b", vec![svc("bad_name", "x.global")])],
        );
        assert!(view.by_fqdn.is_empty());
        assert_eq!(view.collisions[0].resolution, Resolution::Dropped);
    }
}
