//! Elsinore's hand-written transport, walled off from the gateway: code
//! that stands on a security boundary between two organisations and
//! replaces a well-kept library for speed, with the proof it carries
//! (differential tests against rustls, an interoperability matrix against
//! OpenSSL, Python and tokio-rustls, fuzz targets in `fuzz/`, tlsfuzzer
//! results in `docs/transport.md`).
//!
//! Today it holds the TLS record layer ([`tls`]): rustls runs the
//! handshake, this crate seals and opens the records after it. It knows
//! nothing of catalogs, peers or config files: callers pass rustls configs
//! and sockets. It also holds the one accept loop every listener runs
//! ([`accept`]: connection cap, back-off on a failed accept, drain). The
//! HTTP/1.1 and HTTP/2 loops and splice are still in the gateway's `proxy`
//! module and are to follow (issue 16, item 1).

pub mod accept;
pub mod tls;

#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_support;
