//! HTTP/1.1, hand-written: the [`server`] loop the egress serves local apps
//! with, and the [`client`] the ingress sends to HTTP/1.1 backends with.
//! Both read and write the same wire format, and the rules they share
//! (framing, chunked bodies, trailers) are one copy. `differential_tests`
//! holds the server to hyper's reading of the same bytes; [`fuzzing`] gives
//! the fuzz targets in `fuzz/` the parsers and the body decoder.

pub mod client;
pub(crate) mod framing;
pub mod server;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod differential_tests;
