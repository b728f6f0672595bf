//! mTLS between gateways: rustls runs the handshake, our own TLS 1.3 record
//! layer carries the traffic.
//!
//! rustls's buffered connection copies every record it decrypts into a
//! fresh buffer, and the reader copies it out once more: on a bulk transfer
//! those two copies were the biggest item of the ingress profile after the
//! cipher. Here a record is read into the connection's buffer, opened in
//! place and handed out with the one copy into the caller's buffer; records
//! are sealed in place in the outgoing buffer, with no allocation per record.
//!
//! rustls's unbuffered connection drives the handshake; once it completes,
//! [`rustls::kernel::KernelConnection`] keeps what TLS 1.3 still needs after
//! it: new traffic secrets on a key update, and the session tickets a server
//! sends (so resumption keeps working). Both TLS 1.3 and TLS 1.2 (which
//! Envoy clients offer by default) are spoken, with the AEADs rustls
//! negotiates: AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305. A TLS 1.2
//! connection cannot replace its keys, so it closes (close_notify) and
//! fails its writes before its key has sealed more records than is safe; a
//! TLS 1.3 one updates its key.
//!
//! The peer is held to what rustls holds it to (RFC 8446 §5-6): records
//! and inner plaintexts within their limits, no empty handshake records,
//! nothing between the fragments of a handshake message, at most 32 empty
//! records in a row, at most 4 warning alerts, and at most 32 KeyUpdates or
//! tickets without application data between them. Requests for a key update
//! that arrive together are answered with one. A fault of the peer's ends
//! the connection with a fatal alert sealed under the current key, as
//! rustls would send it.
//!
//! Buffers: a connection holds incoming bytes only while a record is
//! incomplete or not yet handed out, and outgoing bytes only while the socket
//! refuses them; both are freed when drained, so an idle connection holds
//! neither. One that waits for the rest of a record holds it in a buffer of
//! one record's size, whatever size its reads had before.
//!
//! The rooms: `handshake` (rustls's unbuffered handshake and the handover
//! to a [`TlsStream`]), `keys` (each direction's key and sealing one
//! record), `inbound` (the rules for the peer's records, without I/O),
//! `read` and `write` (the two halves of the stream), `relay` (the egress's
//! direct path from a plain socket into records), `spare` (buffers kept per
//! thread), `fuzz` (entry points for the fuzz targets).

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// Most plaintext one record carries (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most ciphertext one record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Reserved per read while data flows: 32 full records per syscall. Fewer,
/// larger reads and writes are what makes bulk transfers cheap: each syscall
/// on a socket wakes the peer, and on loopback also runs its receive path.
const READ_BIG: usize = 512 * 1024;
/// Reserved per read on a connection whose buffer was empty: one record.
const READ_SMALL: usize = HEADER + MAX_CIPHERTEXT;
/// Sealed bytes a writer may queue before its writes wait for the socket;
/// one write seals up to this much, so a bulk sender writes 512 KiB at once.
const OUT_HIGH: usize = 512 * 1024;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const USER_CANCELED: u8 = 90;

/// Alert levels (RFC 5246 §7.2; TLS 1.3 keeps the field).
const WARNING: u8 = 1;
const FATAL: u8 = 2;

/// KeyUpdates and tickets accepted without application data between them:
/// each costs a key derivation (and a ticket, memory), so a peer may not
/// send them for free. rustls and BoringSSL allow 32 KeyUpdates.
const MAX_POST_HANDSHAKE: u8 = 32;
/// Empty application data records accepted in a row (rustls and OpenSSL: 32):
/// each costs a decryption and carries nothing.
const MAX_EMPTY_RECORDS: u8 = 32;
/// Warning alerts accepted over a connection's life (rustls and BoringSSL: 4).
const MAX_WARNINGS: u8 = 4;

/// Records sealed under one key before we replace it. Below the AES-GCM
/// confidentiality limit (2^24.5 records, RFC 8446 §5.5) with room to spare;
/// ChaCha20-Poly1305's is far higher, so one figure serves all three suites.
const TX_RECORDS_PER_KEY: u64 = 1 << 23;

/// An mTLS connection to or from another gateway after its handshake.
pub struct TlsStream {
    io: TcpStream,
    kernel: Kernel,
    /// The peer's key and what its records told us.
    inbound: Inbound,
    tx: Keys,
    tx_limit: u64,
    alpn: Option<Vec<u8>>,
    /// Bytes read from `io`: an opened record of `record` bytes at the front
    /// (its unread plaintext at `plain`), then ciphertext not yet opened.
    inbuf: BytesMut,
    record: usize,
    plain: Range<usize>,
    /// Sealed records the socket has not taken yet.
    outbuf: BytesMut,
    /// The last read filled what was reserved: read more per syscall.
    flowing: bool,
    /// `inbuf` was cut to one record's size while waiting for the rest of
    /// a record (see [`TlsStream::shrink_waiting`]).
    in_small: bool,
    write_closed: bool,
    key_updates_sent: u64,
    /// Why the connection failed: later reads and writes fail the same way.
    failed: Option<String>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("buffered_in", &self.inbuf.len())
            .field("buffered_out", &self.outbuf.len())
            .field("read_closed", &self.inbound.closed)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

/// What the server side learns in the handshake, for authorization.
#[derive(Debug)]
pub struct Accepted {
    /// The client's chain, end entity first.
    pub peer_certificates: Option<Vec<CertificateDer<'static>>>,
    /// The SNI the client sent, as rustls validated it.
    pub server_name: Option<String>,
    /// The session was resumed: the chain was verified in an earlier
    /// handshake, not in this one.
    pub resumed: bool,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {what}"))
}

/// The client config for the data plane: `config` with secret extraction on,
/// which our record layer needs.
pub fn client_config(mut config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// The server config for the data plane: `config` with secret extraction on
/// and the client's SNI recorded for [`Accepted`].
pub fn server_config(mut config: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    config.enable_secret_extraction = true;
    config.cert_resolver = Arc::new(RecordSni(Arc::clone(&config.cert_resolver)));
    Arc::new(config)
}

impl TlsStream {
    /// The protocol agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// Test support: replace the key (TLS 1.3) or end (TLS 1.2) after
    /// `records` sealed records instead of at the cipher's limit.
    #[cfg(any(test, feature = "test-support"))]
    #[doc(hidden)]
    pub fn set_tx_limit(&mut self, records: u64) {
        self.tx_limit = records;
    }
}

mod handshake;
mod inbound;
mod keys;
mod read;
mod relay;
mod spare;
mod write;

#[doc(hidden)]
pub mod fuzz;

pub use handshake::{accept, connect};
pub use relay::{RELAY_RECORDS, RelayError, Relayed};

use handshake::RecordSni;
use inbound::{Inbound, Refused, alert_name};
use keys::{Framing, Kernel, Keys, Schedule};

#[cfg(test)]
mod interop_tests;

#[cfg(test)]
pub(crate) mod tests;
