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
