//! Elsinore's hand-written transport, walled off from the gateway: code
//! that stands on a security boundary between two organisations and
//! replaces a well-kept library for speed, with the proof it carries
//! (differential tests against rustls, an interoperability matrix against
//! OpenSSL, Python and tokio-rustls, fuzz targets in `fuzz/`, tlsfuzzer
//! results in `docs/transport.md`).
//!
//! It holds:
//! - the TLS record layer ([`tls`]): rustls runs the handshake, this crate
//!   seals and opens the records after it;
//! - HTTP/1.1 ([`h1`]): the server loop the egress serves local apps with,
//!   the client the ingress sends to backends with, and one module for the
//!   framing rules both share; the yield to clients after a response
//!   ([`handoff`]);
//! - HTTP/2 ([`h2`]): the server and client loops on the `h2` crate;
//! - the TCP splice ([`splice`]) that carries opaque traffic, straight
//!   into TLS records on the way out;
//! - the one accept loop every listener runs ([`accept`]: connection cap,
//!   back-off on a failed accept, drain);
//! - what HTTP/1.1 and HTTP/2 share ([`http`]: the hop-by-hop fields, the
//!   body error type, and the body and request-handler traits the loops
//!   are generic over) and the data plane's error type ([`error`]:
//!   which side failed, and the HTTP status, gRPC code and
//!   `x-elsinore-error` kind it maps to).
//!
//! It knows nothing of catalogs, peers or config files: callers pass
//! rustls configs, sockets, settings structs, request handlers and a
//! backend connector ([`h1::client::Connect`]).

pub mod accept;
pub mod error;
pub mod h1;
pub mod h2;
pub mod handoff;
pub mod http;
pub mod splice;
pub mod tls;

/// Parser entry points for the cargo-fuzz targets in `fuzz/`: the same
/// functions the HTTP/1.1 server and client call, fed from memory. Not an
/// API; hidden from the docs and free to change with the code it wraps.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::h1::client::fuzzing as h1client;
    pub use crate::h1::fuzzing as h1;
}

#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_support;
