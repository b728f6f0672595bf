//! The Elsinore gateway: config, catalog, federation (owner and consumer
//! sides of the Hamlet stream), admin, and the CLI behind the `elsinore`
//! binary.

pub mod catalog;
pub mod config;
pub mod federation;
