//! The catalog: what this gateway exports (built from config, filtered per
//! peer), the merged view of what it imports from its peers with the
//! aliasing and collision rules, the route table computed from those imports
//! (which address and name reach which owner endpoint, with the SNI, pool
//! key and identity egress uses: [`routes`]), and the on-disk cache of
//! imports. Pure data and file I/O only: it knows nothing of streams or
//! sockets, and the federation, DNS and proxy rooms read it, never the other
//! way round.

pub(crate) mod cache;
pub mod claims;
pub(crate) mod exports;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod imports;
pub mod routes;

pub use cache::CacheError;
pub use exports::{ExportCatalog, ExportedService};
pub use imports::{Collision, ImportsView, Owner, Resolution, Resolved};

use std::borrow::Cow;

/// A name as the catalog compares it: lower case, without a trailing dot.
/// Borrowed when already so (the wire's validation guarantees that for
/// every FQDN a peer sends), so this rarely allocates.
pub(crate) fn normalized(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}
