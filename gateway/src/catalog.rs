//! The catalog: what this gateway exports (built from config, filtered per
//! peer), the merged view of what it imports from its peers with the
//! aliasing and collision rules, and the on-disk cache of imports. Pure data
//! and file I/O only: it knows nothing of streams, sockets or routing, and
//! the federation and proxy rooms read it, never the other way round.

pub(crate) mod cache;
pub mod claims;
pub(crate) mod exports;
pub mod imports;

pub use cache::CacheError;
pub use exports::{ExportCatalog, ExportedService};
pub use imports::{Collision, ImportsView, Owner, Resolution, Resolved};
