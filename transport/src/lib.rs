//! Elsinore's hand-written transport, walled off from the gateway: code
//! that stands on a security boundary between two organisations and
//! replaces a well-kept library for speed, with the proof it carries
//! (differential tests against rustls, an interoperability matrix against
//! OpenSSL, Python and tokio-rustls, fuzz targets in `fuzz/`, tlsfuzzer
//! results in `docs/transport.md`).
//!
//! It holds the TLS record layer ([`tls`]): rustls runs the handshake,
//! this crate seals and opens the records after it; the HTTP/2 server and
//! client loops on the `h2` crate ([`h2`]); the TCP splice ([`splice`])
//! that carries opaque traffic, straight into TLS records on the way out;
//! and the one accept loop every listener runs ([`accept`]: connection
//! cap, back-off on a failed accept, drain). It knows nothing of catalogs,
//! peers or config files: callers pass rustls configs, sockets, settings
//! structs and request handlers, and turn its plain errors into their own.
//! The HTTP/1.1 loops are still in the gateway's `proxy` module and are to
//! follow (issue 16, item 1).

pub mod accept;
pub mod h2;
pub mod splice;
pub mod tls;

#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_support;
