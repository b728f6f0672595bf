//! The Elsinore gateway: config, catalog, federation (owner and consumer
//! sides of the Hamlet stream), admin, and the CLI behind the `elsinore`
//! binary. Data flows one way: config → catalog → federation → catalog.

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod dns;
pub mod federation;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod state;
#[cfg(test)]
pub(crate) mod test_support;

pub use runtime::{Gateway, Listeners, StartError, StartOptions};
