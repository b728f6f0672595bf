//! The Hamlet federation API: protos for `v1alpha2` and `v1alpha1`, the
//! generated tonic/prost code, the catalog domain types and conversions in
//! both directions with validation. This crate does no I/O and knows nothing
//! of the gateway.

pub mod domain;

pub use domain::{ApiVersion, Endpoint, FederatedService, Instance, Protocol, UnknownProtocol};
