//! The Elsinore gateway: config, catalog, federation (owner and consumer
//! sides of the Hamlet stream), the data plane (`dns`: the responder for
//! imported names and the resolver; `proxy`: egress and ingress),
//! credentials, admin and metrics, and the CLI behind the `elsinore`
//! binary. Data flows one way: config → catalog → federation → catalog →
//! dns/proxy. `state` holds the handles the rooms share; `runtime` starts
//! and owns every task.

mod admin;
pub mod catalog;
pub mod cli;
pub mod config;
mod credentials;
mod demo;
pub mod dns;
pub mod federation;
mod metrics;
pub mod proxy;
mod reload;
pub mod runtime;
mod state;
#[cfg(test)]
pub(crate) use elsinore_transport::test_support;

pub use runtime::{Gateway, Listeners, StartError, StartOptions};

/// Parser entry points for the cargo-fuzz targets in `fuzz/`: the same
/// functions the data plane calls, fed from memory. Not an API; hidden
/// from the docs and free to change with the code it wraps.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::dns::responder::fuzzing as dns;
}
