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

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{Buf, BufMut, BytesMut};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
}

/// How records are framed and their nonces made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// RFC 8446 §5.2: the content type inside, outer type application data.
    Tls13,
    /// RFC 5246 §6.2.3.3: the content type outside; AES-GCM sends 8 bytes of
    /// explicit nonce before the ciphertext (RFC 5288), ChaCha20 does not
    /// (RFC 7905).
    Tls12 { explicit: bool },
}

/// One direction's key, IV, framing and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    framing: Framing,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets), tls13: bool) -> io::Result<Keys> {
        let (alg, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => {
                return Err(protocol(
                    "the negotiated cipher is not supported by the data plane",
                ));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| protocol("the negotiated traffic key has the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| protocol("the negotiated IV has the wrong length"))?;
        let framing = if tls13 {
            Framing::Tls13
        } else {
            Framing::Tls12 { explicit: gcm }
        };
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
            framing,
        })
    }

    /// Bytes of explicit nonce after the header.
    fn explicit_len(&self) -> usize {
        match self.framing {
            Framing::Tls12 { explicit: true } => 8,
            _ => 0,
        }
    }

    /// The next record's sequence number, consumed.
    fn take_seq(&mut self) -> io::Result<u64> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| protocol("record sequence number exhausted"))?;
        Ok(seq)
    }

    /// The IV with `seq` folded into its last 8 bytes (RFC 8446 §5.3; rustls
    /// and we use the same for TLS 1.2, sending the last 8 bytes as the
    /// explicit part of an AES-GCM nonce).
    fn nonce(&self, seq: u64) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(seq.to_be_bytes())
        {
            *n ^= s;
        }
        nonce
    }

    /// Seals the record laid out in `rec`: header, explicit nonce (TLS 1.2
    /// AES-GCM), plaintext (ending with its content type in TLS 1.3), and
    /// room for the tag. Fills in everything but the plaintext.
    fn seal_record(&mut self, rec: &mut [u8], outer: u8) -> io::Result<()> {
        let explicit = self.explicit_len();
        let body = HEADER + explicit;
        let plaintext = rec.len() - body - TAG;
        let len = explicit + plaintext + TAG;
        let header = [outer, 3, 3, (len >> 8) as u8, (len & 0xff) as u8];
        rec[..HEADER].copy_from_slice(&header);
        let seq = self.take_seq()?;
        let nonce = self.nonce(seq);
        rec[HEADER..body].copy_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
        let (aad, aad_len) = self.aad(seq, &header, plaintext);
        let (data, tag_room) = rec[body..].split_at_mut(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                data,
            )
            .map_err(|_| protocol("sealing a record failed"))?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// The additional data of a record: its header in TLS 1.3; sequence
    /// number, type, version and plaintext length in TLS 1.2.
    fn aad(&self, seq: u64, header: &[u8; HEADER], plaintext: usize) -> ([u8; 13], usize) {
        let mut aad = [0; 13];
        match self.framing {
            Framing::Tls13 => {
                aad[..HEADER].copy_from_slice(header);
                (aad, HEADER)
            }
            Framing::Tls12 { .. } => {
                aad[..8].copy_from_slice(&seq.to_be_bytes());
                aad[8..11].copy_from_slice(&header[..3]);
                aad[11..].copy_from_slice(&(plaintext as u16).to_be_bytes());
                (aad, 13)
            }
        }
    }
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

thread_local! {
    /// The SNI of the ClientHello rustls last handled on this thread. The
    /// unbuffered server connection does not expose it, but rustls hands it
    /// to the certificate resolver (for every ClientHello, resumed or not),
    /// synchronously inside `process_tls_records`: the handshake takes it
    /// right after that call, before anything else can run on the thread.
    static LAST_SNI: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[derive(Debug)]
struct RecordSni(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for RecordSni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_owned);
        LAST_SNI.with(|s| *s.borrow_mut() = sni);
        self.0.resolve(hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Buffers between uses. A connection gives its buffer back as soon as it
/// is drained, and request/response traffic drains it on every message:
/// taking a fresh 16-64 KiB block from malloc each time cost more than the
/// record layer itself (glibc consolidates its free lists for every block
/// that large). A few are kept per thread instead, so the memory stays with
/// the thread, not with the thousands of connections it serves.
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    /// Enough for the connections one thread moves data on at once.
    const KEEP: usize = 8;
    /// A buffer that grew past this (a burst) is not kept.
    const KEEP_CAPACITY: usize = 2 * super::READ_BIG;
    /// At most this much kept per thread: two bulk transfers' buffers, or
    /// all eight of request/response traffic. A bulk buffer given back to
    /// malloc each time costs page faults when it is taken again (glibc
    /// trims the heap top under it).
    pub(super) const KEEP_BYTES: usize = 2 * KEEP_CAPACITY;

    thread_local! {
        static SPARE: RefCell<(Vec<BytesMut>, usize)> = const { RefCell::new((Vec::new(), 0)) };
    }

    #[cfg(test)]
    pub(super) fn kept() -> (usize, usize) {
        SPARE.with(|s| {
            let s = s.borrow();
            (s.0.len(), s.1)
        })
    }

    pub(super) fn take() -> BytesMut {
        SPARE.with(|s| {
            let (list, bytes) = &mut *s.borrow_mut();
            let buf = list.pop().unwrap_or_default();
            *bytes -= buf.capacity();
            buf
        })
    }

    pub(super) fn give(mut buf: BytesMut) {
        // A drained buffer has been advanced to its end, which leaves it no
        // capacity until the space before it is reclaimed (no copy: it is
        // empty). One too small for a record is not worth keeping.
        buf.clear();
        if buf.capacity() > KEEP_CAPACITY || !buf.try_reclaim(super::READ_SMALL) {
            return;
        }
        SPARE.with(|s| {
            let (list, bytes) = &mut *s.borrow_mut();
            if list.len() < KEEP && *bytes + buf.capacity() <= KEEP_BYTES {
                *bytes += buf.capacity();
                list.push(buf);
            }
        });
    }
}

/// Connects as a client over `io`; the caller bounds the time.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut io: TcpStream,
) -> io::Result<TlsStream> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_err)?;
    let leftover = drive(
        &mut io,
        &mut conn,
        |c, b| c.process_tls_records(b),
        |c| c.is_handshaking(),
        || {},
    )
    .await?;
    // A resumed session skips chain verification: the server identity its
    // ticket carries must not outlive the certificate it came from.
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && let Some([leaf, ..]) = conn.peer_certificates()
    {
        elsinore_certs::check_not_expired(leaf, std::time::SystemTime::now()).map_err(|e| {
            protocol(&format!(
                "resumed a session whose server certificate has expired: {e}"
            ))
        })?;
    }
    let tls13 = is_tls13(conn.protocol_version())?;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
    let kernel = Kernel::Client(kernel);
    TlsStream::new(io, kernel, secrets, tls13, alpn, leftover)
}

/// Accepts a client over `io`; the caller bounds the time.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    mut io: TcpStream,
) -> io::Result<(TlsStream, Accepted)> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
    let mut server_name = None;
    let leftover = drive(
        &mut io,
        &mut conn,
        |c, b| c.process_tls_records(b),
        |c| c.is_handshaking(),
        || {
            if let Some(sni) = LAST_SNI.with(|s| s.borrow_mut().take()) {
                server_name = Some(sni);
            }
        },
    )
    .await?;
    let tls13 = is_tls13(conn.protocol_version())?;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let peer_certificates = conn
        .peer_certificates()
        .map(<[CertificateDer<'static>]>::to_vec);
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
    let kernel = Kernel::Server(kernel);
    let stream = TlsStream::new(io, kernel, secrets, tls13, alpn, leftover)?;
    let accepted = Accepted {
        peer_certificates,
        server_name,
        resumed,
    };
    Ok((stream, accepted))
}

fn is_tls13(version: Option<ProtocolVersion>) -> io::Result<bool> {
    match version {
        Some(ProtocolVersion::TLSv1_3) => Ok(true),
        Some(ProtocolVersion::TLSv1_2) => Ok(false),
        other => Err(protocol(&format!(
            "the handshake settled on {other:?}, which the data plane does not speak"
        ))),
    }
}

/// What the handshake leaves to the record layer, besides the secrets.
struct Leftover {
    /// Bytes read past the handshake, not yet processed.
    inbuf: BytesMut,
    /// Application data rustls already decrypted: a client may send it
    /// with its Finished.
    early: Vec<u8>,
    /// The peer's close_notify came with it.
    peer_closed: bool,
}

/// Runs rustls's unbuffered handshake over `io` until application data may
/// be written. On failure, the alert rustls queued is sent
/// before the error returns, so the peer learns why.
///
/// rustls is given one record at a time, and none once the handshake is
/// over: records that follow the peer's last handshake record in the same
/// read (data, a KeyUpdate sent with the client's Finished) are left to the
/// record layer. A KeyUpdate rustls read here would switch its sending key
/// and queue its answer where the handover to [`TlsStream`] drops it.
async fn drive<C, D>(
    io: &mut TcpStream,
    conn: &mut C,
    process: impl for<'c, 'i> Fn(&'c mut C, &'i mut [u8]) -> UnbufferedStatus<'c, 'i, D>,
    handshaking: impl Fn(&C) -> bool,
    mut after_step: impl FnMut(),
) -> io::Result<Leftover> {
    let mut out = Vec::new();
    let mut inbuf = BytesMut::new();
    let mut early = Vec::new();
    let mut peer_closed = false;
    // The front of `inbuf` offered to rustls: whole records only.
    let mut fed = 0;
    // Nothing sent yet: the peer reads plaintext records.
    let mut sent = false;
    loop {
        if !handshaking(conn) {
            fed = 0;
        }
        let UnbufferedStatus { mut discard, state } = process(conn, &mut inbuf[..fed]);
        after_step();
        let mut read = false;
        match state {
            Err(e) => {
                // Best effort: the records encoded but not yet sent (a
                // ServerHello flight: without it the peer cannot read an
                // alert encrypted under the handshake keys), then the alert
                // rustls queued for this error. Ask with the same buffer
                // (past what it discarded): rustls's deframer counts
                // progress in it, and an empty slice made it index out of
                // range when no alert was queued.
                inbuf.advance(discard);
                if let Ok(ConnectionState::EncodeTlsData(mut enc)) =
                    process(conn, &mut inbuf[..]).state
                {
                    let flight = out.len();
                    if encode(&mut out, |b| enc.encode(b)).is_err() {
                        out.truncate(flight);
                    }
                }
                // rustls's deframer refuses a record between the fragments
                // of a handshake message without queueing an alert. Before
                // anything was sent (a split ClientHello) the peer expects
                // a plaintext alert, which needs no key: send it ourselves.
                if out.is_empty()
                    && !sent
                    && e == rustls::Error::PeerMisbehaved(
                        rustls::PeerMisbehaved::MessageInterleavedWithHandshakeMessage,
                    )
                {
                    out.extend_from_slice(&[ALERT, 3, 3, 0, 2, FATAL, UNEXPECTED_MESSAGE]);
                }
                if !out.is_empty() {
                    let _ = io.write_all(&out).await;
                }
                return Err(tls_err(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(&mut out, |b| enc.encode(b))?,
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                io.write_all(&out).await?;
                sent |= !out.is_empty();
                out.clear();
                transmit.done();
            }
            Ok(ConnectionState::BlockedHandshake) => read = true,
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_err)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
            }
            // The client may close right after its first data.
            Ok(ConnectionState::PeerClosed) => peer_closed = true,
            Ok(ConnectionState::WriteTraffic(_)) => {
                inbuf.advance(discard);
                return Ok(Leftover {
                    inbuf,
                    early,
                    peer_closed,
                });
            }
            Ok(other) => {
                return Err(protocol(&format!(
                    "unexpected state {other:?} during the handshake"
                )));
            }
        }
        fed = fed.saturating_sub(discard);
        inbuf.advance(discard);
        // rustls has taken all it was offered and waits for more: offer the
        // next record, reading until it is whole.
        if read {
            fed = loop {
                // RFC 8446 §5.1: a plaintext record carries at most 2^14
                // bytes (rustls takes up to the TLS 1.2 ciphertext limit).
                // Before anything was sent the peer's records are plaintext
                // but for early data, and so is the alert.
                if let Some(&[typ, _, _, hi, lo]) = inbuf.get(fed..fed + HEADER) {
                    let len = usize::from(u16::from_be_bytes([hi, lo]));
                    if !sent && typ != APPLICATION_DATA && len > MAX_PLAINTEXT {
                        let _ = io
                            .write_all(&[ALERT, 3, 3, 0, 2, FATAL, RECORD_OVERFLOW])
                            .await;
                        return Err(protocol(&format!(
                            "a plaintext record of {len} bytes, over {MAX_PLAINTEXT}"
                        )));
                    }
                }
                if let Some(end) = record_end(&inbuf, fed) {
                    break end;
                }
                inbuf.reserve(READ_SMALL);
                if io.read_buf(&mut inbuf).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake: the peer closed the connection",
                    ));
                }
            };
        }
    }
}

/// Where the record that starts at `from` in `buf` ends, if it is whole.
fn record_end(buf: &[u8], from: usize) -> Option<usize> {
    let [_, _, _, hi, lo] = *buf.get(from..from + HEADER)? else {
        return None;
    };
    let end = from + HEADER + usize::from(u16::from_be_bytes([hi, lo]));
    (end <= buf.len()).then_some(end)
}

/// Appends one handshake record rustls has for us to `out`.
fn encode(
    out: &mut Vec<u8>,
    mut enc: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let at = out.len();
    let need = match enc(&mut []) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(s)) => s.required_size,
        Err(e) => return Err(protocol(&format!("encoding a handshake record: {e}"))),
    };
    out.resize(at + need, 0);
    let n = enc(&mut out[at..]).map_err(|e| protocol(&format!("encoding: {e}")))?;
    out.truncate(at + n);
    Ok(())
}

impl TlsStream {
    fn new(
        io: TcpStream,
        kernel: Kernel,
        secrets: rustls::ExtractedSecrets,
        tls13: bool,
        alpn: Option<Vec<u8>>,
        leftover: Leftover,
    ) -> io::Result<Self> {
        let Leftover {
            inbuf,
            early,
            peer_closed: read_closed,
        } = leftover;
        let inbuf = if inbuf.is_empty() {
            spare::give(inbuf);
            BytesMut::new()
        } else {
            inbuf
        };
        let mut stream = TlsStream {
            io,
            kernel,
            inbound: Inbound::new(Keys::new(secrets.rx, tls13)?, read_closed),
            tx: Keys::new(secrets.tx, tls13)?,
            tx_limit: TX_RECORDS_PER_KEY,
            alpn,
            inbuf,
            record: 0,
            plain: 0..0,
            outbuf: BytesMut::new(),
            flowing: false,
            in_small: false,
            write_closed: false,
            key_updates_sent: 0,
            failed: None,
        };
        if !early.is_empty() {
            // Rare: plaintext rustls decrypted before handing over. Put it
            // in front as an already opened record.
            let mut inbuf = BytesMut::with_capacity(early.len() + stream.inbuf.len());
            inbuf.extend_from_slice(&early);
            inbuf.extend_from_slice(&stream.inbuf);
            stream.record = early.len();
            stream.plain = 0..early.len();
            stream.inbuf = inbuf;
        }
        Ok(stream)
    }

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

    /// Seals `data` as one record of type `typ` onto `outbuf`.
    fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        let start = self.begin_record(data.len());
        self.outbuf.extend_from_slice(data);
        self.finish_record(start, typ).inspect_err(|_| {
            // Never leave an unsealed record to be sent.
            self.outbuf.truncate(start);
        })
    }

    /// Ends the connection for a fault of the peer's: the fatal `alert`
    /// (RFC 8446 §6.2) is sealed under the current key, nothing is sealed
    /// after it, and every later read or write fails with this error. The
    /// caller sends what is queued before returning the error.
    fn fatal(&mut self, alert: u8, what: &str) -> io::Error {
        let message = format!("tls: {what}");
        if !self.write_closed {
            // Sequence numbers exhausted: no alert can be sealed, the error stands.
            let _ = self.seal(ALERT, &[FATAL, alert]);
            self.write_closed = true;
        }
        self.failed = Some(message.clone());
        io::Error::new(io::ErrorKind::InvalidData, message)
    }

    /// The error an earlier failure left, if any.
    fn failed(&self) -> Option<io::Error> {
        let message = self.failed.as_ref()?;
        Some(io::Error::new(io::ErrorKind::InvalidData, message.clone()))
    }

    /// Starts a record of up to `len` bytes of plaintext on `outbuf`: room
    /// for the header and explicit nonce. Returns where it starts.
    fn begin_record(&mut self, len: usize) -> usize {
        let start = self.outbuf.len();
        let prefix = HEADER + self.tx.explicit_len();
        if self.outbuf.capacity() == 0 {
            self.outbuf = spare::take();
        }
        self.outbuf.reserve(prefix + len + 1 + TAG);
        self.outbuf.extend_from_slice(&[0; HEADER + 8][..prefix]);
        start
    }

    /// Seals the record begun at `start` of `outbuf` (its plaintext runs to
    /// the end): content type, header, nonce, encryption, tag.
    fn finish_record(&mut self, start: usize, typ: u8) -> io::Result<()> {
        let outer = if self.tx.framing == Framing::Tls13 {
            self.outbuf.extend_from_slice(&[typ]);
            APPLICATION_DATA
        } else {
            typ
        };
        self.outbuf.extend_from_slice(&[0; TAG]);
        self.tx.seal_record(&mut self.outbuf[start..], outer)
    }

    /// Before the next record: a key update if the peer asked for one or
    /// this key has sealed enough (RFC 8446 §4.6.3).
    fn update_tx_key(&mut self) -> io::Result<()> {
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        self.tx = Keys::new(self.kernel.update_tx().map_err(tls_err)?, true)?;
        self.key_updates_sent += 1;
        self.inbound.update_owed = false;
        Ok(())
    }

    /// A TLS 1.2 key that has sealed all it may cannot be replaced: the
    /// connection says close_notify (so the peer sees an orderly end, not a
    /// truncation) and takes no more writes.
    fn close_at_key_limit(&mut self) -> io::Error {
        if !self.write_closed {
            let _ = self.seal(ALERT, &[WARNING, CLOSE_NOTIFY]);
            self.write_closed = true;
        }
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "tls: this TLS 1.2 connection has sealed all the records its key may (TLS 1.2 cannot replace keys); it was closed with close_notify",
        )
    }

    /// Seals up to [`OUT_HIGH`] bytes of `bufs` as full records, copying
    /// straight into the outgoing buffer. Returns the bytes taken.
    fn seal_slices(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut left = total.min(
            OUT_HIGH
                .saturating_sub(self.outbuf.len())
                .max(MAX_PLAINTEXT),
        );
        let mut taken = left;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = &[];
        while left > 0 {
            if self.tx.framing != Framing::Tls13 && self.tx.seq >= self.tx_limit {
                if left < taken {
                    // What was sealed goes out; the next write ends it.
                    taken -= left;
                    break;
                }
                return Err(self.close_at_key_limit());
            }
            if self.inbound.update_owed || self.tx.seq >= self.tx_limit {
                self.update_tx_key()?;
            }
            let size = left.min(MAX_PLAINTEXT);
            let start = self.begin_record(size);
            let mut need = size;
            while need > 0 {
                if current.is_empty() {
                    current = slices.next().unwrap_or_default();
                }
                let n = need.min(current.len());
                self.outbuf.extend_from_slice(&current[..n]);
                current = &current[n..];
                need -= n;
            }
            self.finish_record(start, APPLICATION_DATA)?;
            left -= size;
        }
        Ok(taken)
    }
}

/// What [`TlsStream::poll_relay_from`] did.
#[derive(Debug)]
pub enum Relayed {
    /// This many bytes were read, sealed, and sent or queued.
    Moved(usize),
    /// The source reached EOF.
    Eof,
    /// The direct path cannot be taken now (a key must be replaced first):
    /// copy through `poll_write` instead.
    Unavailable,
}

/// Which side failed in [`TlsStream::poll_relay_from`].
#[derive(Debug)]
pub enum RelayError {
    Read(io::Error),
    Write(io::Error),
}

/// Records one relay read fills: as many as a write may queue.
pub const RELAY_RECORDS: usize = OUT_HIGH / MAX_PLAINTEXT;
/// The largest record slot: header, TLS 1.2 explicit nonce, plaintext,
/// TLS 1.3 content type, tag.
const RELAY_SLOT: usize = HEADER + 8 + MAX_PLAINTEXT + 1 + TAG;

thread_local! {
    /// Record slots the relay reads plaintext into and seals in place,
    /// shared by a thread's connections (used within one call only).
    static RELAY_SLAB: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl TlsStream {
    /// Moves what `src` holds to the peer without copying it between
    /// buffers: one vectored read puts the plaintext straight into record
    /// slots, each is sealed where it landed, and the records go out in one
    /// write. What the socket does not take is queued as by `poll_write`.
    /// Records queued earlier go first; until they are out this waits.
    pub fn poll_relay_from(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
    ) -> Poll<Result<Relayed, RelayError>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(RelayError::Write(e)));
        }
        if self.write_closed {
            return Poll::Ready(Err(RelayError::Write(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: write after close_notify",
            ))));
        }
        if !self.outbuf.is_empty() {
            ready!(self.poll_drain(cx)).map_err(RelayError::Write)?;
        }
        if self.inbound.update_owed {
            // Our answer to the peer's request goes before our next data.
            self.update_tx_key().map_err(RelayError::Write)?;
            ready!(self.poll_drain(cx)).map_err(RelayError::Write)?;
        }
        if self.tx.seq.saturating_add(RELAY_RECORDS as u64) >= self.tx_limit {
            return Poll::Ready(Ok(Relayed::Unavailable));
        }
        RELAY_SLAB.with(|cell| {
            let Ok(mut slab) = cell.try_borrow_mut() else {
                return Poll::Ready(Ok(Relayed::Unavailable));
            };
            if slab.is_empty() {
                *slab = vec![0; RELAY_RECORDS * RELAY_SLOT];
            }
            self.relay_through(cx, src, &mut slab)
        })
    }

    fn relay_through(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        slab: &mut [u8],
    ) -> Poll<Result<Relayed, RelayError>> {
        let tls13 = self.tx.framing == Framing::Tls13;
        let prefix = HEADER + self.tx.explicit_len();
        let suffix = usize::from(tls13) + TAG;
        // Full records lie back to back: the sealed bytes are contiguous.
        let stride = prefix + MAX_PLAINTEXT + suffix;
        let read = loop {
            ready!(src.poll_read_ready(cx)).map_err(RelayError::Read)?;
            let mut slots: Vec<io::IoSliceMut<'_>> = slab
                .chunks_mut(stride)
                .take(RELAY_RECORDS)
                .map(|slot| io::IoSliceMut::new(&mut slot[prefix..prefix + MAX_PLAINTEXT]))
                .collect();
            match src.try_read_vectored(&mut slots) {
                Ok(0) => return Poll::Ready(Ok(Relayed::Eof)),
                Ok(n) => break n,
                // Readiness was stale; poll_read_ready registers us again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(RelayError::Read(e))),
            }
        };
        let mut end = 0;
        let mut left = read;
        for slot in slab.chunks_mut(stride) {
            if left == 0 {
                break;
            }
            let len = left.min(MAX_PLAINTEXT);
            left -= len;
            let rec = &mut slot[..prefix + len + suffix];
            if tls13 {
                rec[prefix + len] = APPLICATION_DATA;
            }
            self.tx
                .seal_record(rec, APPLICATION_DATA)
                .map_err(RelayError::Write)?;
            end += rec.len();
        }
        let sealed = &slab[..end];
        let written = match self.io.try_write(sealed) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Poll::Ready(Err(RelayError::Write(e))),
        };
        if written < end {
            if self.outbuf.capacity() == 0 {
                self.outbuf = spare::take();
            }
            self.outbuf.extend_from_slice(&sealed[written..]);
            // Registers for room; the rest goes out first next time.
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Poll::Ready(Err(RelayError::Write(e)));
            }
        }
        Poll::Ready(Ok(Relayed::Moved(read)))
    }
}

impl TlsStream {
    /// Writes queued records until none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outbuf.advance(n);
        }
        // Drained: give the memory back; an idle connection holds none.
        spare::give(std::mem::take(&mut self.outbuf));
        Poll::Ready(Ok(()))
    }

    /// Opens the next whole record in `inbuf`, if there is one. Returns
    /// false when more bytes must be read first.
    fn open_record(&mut self) -> io::Result<bool> {
        match self.inbound.open(&mut self.inbuf, &mut self.kernel) {
            Ok(None) => Ok(false),
            Ok(Some((record, data))) => {
                self.record = record;
                self.plain = data;
                Ok(true)
            }
            Err(Refused::Alert(alert, what)) => Err(self.fatal(alert, &what)),
            Err(Refused::PeerAlert(message)) => {
                self.failed = Some(message.clone());
                // Nothing more is sent on a connection the peer ended.
                self.write_closed = true;
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, message))
            }
            Err(Refused::Io(e)) => Err(e),
        }
    }

    /// Sends what is queued: the answer to a key update the peer asked for
    /// (even if we never write) and anything before it.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.outbuf.is_empty() {
                ready!(self.poll_drain(cx))?;
            }
            if !self.inbound.update_owed || self.write_closed {
                return Poll::Ready(Ok(()));
            }
            self.update_tx_key()?;
        }
    }

    /// Waiting for the rest of a record (at most [`READ_SMALL`] bytes): what
    /// is held moves to a buffer of one record's size, so a peer that
    /// trickles partial records cannot keep a bulk buffer reserved per
    /// connection. Once bytes are there, the read takes a kept buffer again
    /// (at the cost of copying less than a record, twice per wait): a bulk
    /// transfer still reads [`READ_BIG`] per syscall.
    fn shrink_waiting(&mut self) {
        if self.inbuf.is_empty() || self.in_small {
            return;
        }
        let mut small = BytesMut::with_capacity(READ_SMALL);
        small.extend_from_slice(&self.inbuf);
        spare::give(std::mem::replace(&mut self.inbuf, small));
        self.in_small = true;
    }
}

/// Why the peer's records are refused.
enum Refused {
    /// A fault of the peer's, to be answered with this fatal alert.
    Alert(u8, String),
    /// The peer ended the connection with a fatal alert.
    PeerAlert(String),
    /// Our side cannot go on (sequence numbers exhausted, no next key).
    Io(io::Error),
}

fn refuse(alert: u8, what: &str) -> Refused {
    Refused::Alert(alert, what.to_owned())
}

/// What the receiving side needs of the key schedule after the handshake.
trait Schedule {
    /// The peer's next key, after its KeyUpdate.
    fn next_rx(&mut self) -> io::Result<Keys>;
    /// A NewSessionTicket; a refusal names its alert.
    fn ticket(&mut self, body: &[u8]) -> Result<(), (u8, String)>;
}

impl Schedule for Kernel {
    fn next_rx(&mut self) -> io::Result<Keys> {
        Keys::new(self.update_rx().map_err(tls_err)?, true)
    }

    fn ticket(&mut self, body: &[u8]) -> Result<(), (u8, String)> {
        match self {
            Kernel::Client(k) => k
                .handle_new_session_ticket(body)
                .map_err(|e| (DECODE_ERROR, format!("a NewSessionTicket: {e}"))),
            Kernel::Server(_) => Err((
                UNEXPECTED_MESSAGE,
                "the client sent a NewSessionTicket".to_owned(),
            )),
        }
    }
}

/// The receiving side of the record layer, without I/O: it opens records
/// in the caller's buffer and applies what they carry, holding the peer to
/// the limits in the module doc.
struct Inbound {
    rx: Keys,
    /// Handshake bytes of a message that spans records (rare).
    handshake: Vec<u8>,
    /// KeyUpdates and tickets since the last application data.
    post_handshake: u8,
    /// Empty application data records in a row.
    empty_records: u8,
    /// Warning alerts received.
    warnings: u8,
    /// close_notify received.
    closed: bool,
    /// The peer asked for a key update we have not sent yet: one answers
    /// every request received before it goes out (RFC 8446 §4.6.3).
    update_owed: bool,
}

impl Inbound {
    fn new(rx: Keys, closed: bool) -> Inbound {
        Inbound {
            rx,
            handshake: Vec::new(),
            post_handshake: 0,
            empty_records: 0,
            warnings: 0,
            closed,
            update_owed: false,
        }
    }

    /// Opens the record at the front of `buf` in place and applies what
    /// it carries. None: the record is not whole yet. Otherwise the
    /// record's length and where in `buf` the application data it carries
    /// lies (empty for alerts and handshake messages, handled here).
    fn open(
        &mut self,
        buf: &mut [u8],
        schedule: &mut impl Schedule,
    ) -> Result<Option<(usize, Range<usize>)>, Refused> {
        let Some(&[typ, major, minor, hi, lo]) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let header = [typ, major, minor, hi, lo];
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let tls13 = self.rx.framing == Framing::Tls13;
        let allowed = if tls13 {
            typ == APPLICATION_DATA
        } else {
            matches!(typ, APPLICATION_DATA | ALERT | HANDSHAKE)
        };
        if !allowed {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("record of type {typ} after the handshake"),
            ));
        }
        let explicit = self.rx.explicit_len();
        let shortest = explicit + TAG + usize::from(tls13);
        if len > MAX_CIPHERTEXT {
            return Err(refuse(
                RECORD_OVERFLOW,
                &format!("record length {len} outside {shortest}..={MAX_CIPHERTEXT}"),
            ));
        }
        if len < shortest {
            // Too short to carry a tag: it cannot be authenticated.
            return Err(refuse(
                BAD_RECORD_MAC,
                &format!("record length {len} outside {shortest}..={MAX_CIPHERTEXT}"),
            ));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let seq = self.rx.take_seq().map_err(Refused::Io)?;
        let mut nonce = self.rx.nonce(seq);
        if explicit > 0 {
            // The explicit part as the record carries it.
            nonce[aead::NONCE_LEN - explicit..].copy_from_slice(&buf[HEADER..HEADER + explicit]);
        }
        let body = HEADER + explicit..HEADER + len;
        let (aad, aad_len) = self.rx.aad(seq, &header, body.len() - TAG);
        let opened = match self.rx.key.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..aad_len]),
            &mut buf[body.clone()],
        ) {
            Ok(opened) => opened.len(),
            Err(_) => {
                return Err(refuse(
                    BAD_RECORD_MAC,
                    "a record failed to decrypt (bad_record_mac)",
                ));
            }
        };
        // TLS 1.3 counts the content type in (RFC 8446 §5.4), padding too.
        let most = MAX_PLAINTEXT + usize::from(tls13);
        if opened > most {
            return Err(refuse(
                RECORD_OVERFLOW,
                &format!("a record's plaintext is {opened} bytes, over {most}"),
            ));
        }
        let (typ, content_len) = if tls13 {
            // Inner plaintext: content, content type, zero padding.
            let inner = &buf[body.start..body.start + opened];
            match inner.iter().rposition(|&b| b != 0) {
                Some(at) => (inner[at], at),
                None => {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        "a record carries no content type",
                    ));
                }
            }
        } else {
            (typ, opened)
        };
        let record = HEADER + len;
        let content = body.start..body.start + content_len;
        // RFC 8446 §5.1: nothing between the fragments of a handshake message.
        if typ != HANDSHAKE && !self.handshake.is_empty() {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("a record of type {typ} between the fragments of a handshake message"),
            ));
        }
        if content_len > 0 {
            self.empty_records = 0;
        }
        match typ {
            APPLICATION_DATA if content_len == 0 => {
                self.empty_records += 1;
                if self.empty_records > MAX_EMPTY_RECORDS {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        &format!("more than {MAX_EMPTY_RECORDS} empty records in a row"),
                    ));
                }
            }
            APPLICATION_DATA => {
                self.post_handshake = 0;
                return Ok(Some((record, content)));
            }
            ALERT => self.alert(&buf[content])?,
            HANDSHAKE if content_len == 0 => {
                return Err(refuse(UNEXPECTED_MESSAGE, "an empty handshake record"));
            }
            HANDSHAKE if tls13 => self.handshake_messages(&buf[content], schedule)?,
            HANDSHAKE => {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    "the peer tried to renegotiate TLS 1.2",
                ));
            }
            other => {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    &format!("record of inner type {other}"),
                ));
            }
        }
        Ok(Some((record, 0..0)))
    }

    /// An alert from the peer, judged as rustls judges it: close_notify
    /// ends the stream, a fatal alert the connection; a warning is passed
    /// over (TLS 1.3 allows only user_canceled, which a close_notify is to
    /// follow), up to [`MAX_WARNINGS`].
    fn alert(&mut self, content: &[u8]) -> Result<(), Refused> {
        let &[level, description] = content else {
            return Err(refuse(DECODE_ERROR, "malformed alert"));
        };
        if !matches!(level, WARNING | FATAL) {
            return Err(refuse(
                ILLEGAL_PARAMETER,
                &format!("alert {description} of unknown level {level}"),
            ));
        }
        if description == CLOSE_NOTIFY {
            self.closed = true;
            return Ok(());
        }
        if level == FATAL {
            let message = format!(
                "tls: the peer sent fatal alert {description} ({})",
                alert_name(description)
            );
            return Err(Refused::PeerAlert(message));
        }
        self.warnings += 1;
        if self.warnings > MAX_WARNINGS {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("more than {MAX_WARNINGS} warning alerts"),
            ));
        }
        if self.rx.framing == Framing::Tls13 && description != USER_CANCELED {
            return Err(refuse(
                DECODE_ERROR,
                &format!(
                    "warning alert {description} ({}): TLS 1.3 has no warnings but user_canceled",
                    alert_name(description)
                ),
            ));
        }
        Ok(())
    }

    /// NewSessionTicket and KeyUpdate: the handshake messages TLS 1.3 sends
    /// after the handshake (RFC 8446 §4.6).
    fn handshake_messages(
        &mut self,
        content: &[u8],
        schedule: &mut impl Schedule,
    ) -> Result<(), Refused> {
        let mut messages = std::mem::take(&mut self.handshake);
        messages.extend_from_slice(content);
        let mut rest = &messages[..];
        while let [typ, a, b, c, body @ ..] = rest {
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            let Some((body, after)) = body.split_at_checked(len) else {
                break;
            };
            self.post_handshake += 1;
            if self.post_handshake > MAX_POST_HANDSHAKE {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    &format!(
                        "more than {MAX_POST_HANDSHAKE} KeyUpdate or NewSessionTicket messages without application data"
                    ),
                ));
            }
            match *typ {
                NEW_SESSION_TICKET => {
                    schedule
                        .ticket(body)
                        .map_err(|(alert, what)| Refused::Alert(alert, what))?;
                }
                KEY_UPDATE => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        [other] => {
                            return Err(refuse(
                                ILLEGAL_PARAMETER,
                                &format!("KeyUpdate with request_update {other}"),
                            ));
                        }
                        _ => return Err(refuse(DECODE_ERROR, "malformed KeyUpdate")),
                    };
                    if !after.is_empty() {
                        // RFC 8446 §5.1: a key change ends its record.
                        return Err(refuse(
                            UNEXPECTED_MESSAGE,
                            "a KeyUpdate does not end its record",
                        ));
                    }
                    self.rx = schedule.next_rx().map_err(Refused::Io)?;
                    // Answered before our next record (in `poll_read` if we
                    // do not write), once for all the requests before it.
                    self.update_owed |= requested;
                }
                other => {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        &format!("handshake message of type {other} after the handshake"),
                    ));
                }
            }
            rest = after;
        }
        if rest.len() > MAX_PLAINTEXT {
            return Err(refuse(DECODE_ERROR, "a handshake message is too long"));
        }
        self.handshake = rest.to_vec();
        Ok(())
    }
}

/// Entry points for fuzz targets, not an API: the receiving side of the
/// record layer ([`Inbound`], the code connections run) without sockets or
/// a handshake, under a fixed AES-256-GCM key.
#[doc(hidden)]
pub mod fuzz {
    use rustls::ConnectionTrafficSecrets;
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::{
        APPLICATION_DATA, Framing, HEADER, Inbound, Keys, Refused, Schedule, TAG, alert_name,
    };

    fn keys(key: [u8; 32], iv: [u8; 12], tls13: bool, seq: u64) -> Keys {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(key),
            iv: Iv::new(iv),
        };
        match Keys::new((seq, secrets), tls13) {
            Ok(keys) => keys,
            // A 32-byte key and 12-byte IV always fit AES-256-GCM.
            Err(e) => unreachable!("{e}"),
        }
    }

    /// Keeps the same key across a KeyUpdate; takes any ticket.
    struct Fixed([u8; 32], [u8; 12]);

    impl Schedule for Fixed {
        fn next_rx(&mut self) -> std::io::Result<Keys> {
            Ok(keys(self.0, self.1, true, 0))
        }

        fn ticket(&mut self, _: &[u8]) -> Result<(), (u8, String)> {
            Ok(())
        }
    }

    /// One record as our write path seals it: inner type `typ`, `content`
    /// and (TLS 1.3) `padding` zero bytes, under `key` and `iv` with
    /// sequence number `seq`. Content and padding together stay under
    /// 2^16 - 64 bytes (the length field is 16 bits).
    pub fn seal(
        key: [u8; 32],
        iv: [u8; 12],
        tls13: bool,
        seq: u64,
        typ: u8,
        content: &[u8],
        padding: usize,
    ) -> Vec<u8> {
        let mut keys = keys(key, iv, tls13, seq);
        let mut rec = vec![0; HEADER + keys.explicit_len()];
        rec.extend_from_slice(content);
        if keys.framing == Framing::Tls13 {
            rec.push(typ);
            rec.resize(rec.len() + padding, 0);
        }
        rec.resize(rec.len() + TAG, 0);
        let outer = if tls13 { APPLICATION_DATA } else { typ };
        match keys.seal_record(&mut rec, outer) {
            Ok(()) => rec,
            Err(e) => unreachable!("{e}"),
        }
    }

    /// Opens the records of `wire` in order, as a connection whose peer
    /// seals under `key` and `iv` from sequence number 0 would (a KeyUpdate
    /// keeps the key). Returns the application data handed out, and why it
    /// stopped: `None` when `wire` ran out or a close_notify came, else
    /// the error (naming the alert we would send, if any).
    pub fn open(
        key: [u8; 32],
        iv: [u8; 12],
        tls13: bool,
        wire: &[u8],
    ) -> (Vec<u8>, Option<String>) {
        let mut inbound = Inbound::new(keys(key, iv, tls13, 0), false);
        let mut schedule = Fixed(key, iv);
        let mut buf = wire.to_vec();
        let mut data = Vec::new();
        let mut at = 0;
        while !inbound.closed {
            let rest = &mut buf[at..];
            match inbound.open(rest, &mut schedule) {
                Ok(None) => break,
                Ok(Some((record, content))) => {
                    data.extend_from_slice(&rest[content]);
                    at += record;
                }
                Err(Refused::Alert(alert, what)) => {
                    let why = format!("alert {alert} ({}): {what}", alert_name(alert));
                    return (data, Some(why));
                }
                Err(Refused::PeerAlert(why)) => return (data, Some(why)),
                Err(Refused::Io(e)) => return (data, Some(e.to_string())),
            }
        }
        (data, None)
    }
}

/// The name RFC 8446 §6 gives alert `description`, for error messages.
fn alert_name(description: u8) -> &'static str {
    match description {
        CLOSE_NOTIFY => "close_notify",
        UNEXPECTED_MESSAGE => "unexpected_message",
        BAD_RECORD_MAC => "bad_record_mac",
        RECORD_OVERFLOW => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        ILLEGAL_PARAMETER => "illegal_parameter",
        DECODE_ERROR => "decode_error",
        51 => "decrypt_error",
        80 => "internal_error",
        USER_CANCELED => "user_canceled",
        _ => "other",
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failed() {
            return Poll::Ready(Err(e));
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let at = this.plain.start;
                buf.put_slice(&this.inbuf[at..at + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.release_record();
                    // A key update the peer asked for before this data is
                    // answered now, not at our next write or read: a reader
                    // that got what it wanted may not read again until the
                    // peer hears back. Requests that came together were
                    // already merged into one answer; a blocked socket
                    // leaves it owed (one flag, no queue), and an error
                    // shows on the next call.
                    if this.inbound.update_owed {
                        let _ = this.poll_owed(cx);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            this.release_record();
            if this.inbound.closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The fatal alert, if one was sealed; best effort.
                    if !this.outbuf.is_empty() {
                        let _ = this.poll_drain(cx);
                    }
                    return Poll::Ready(Err(e));
                }
            }
            if let Poll::Ready(Err(e)) = this.poll_owed(cx) {
                return Poll::Ready(Err(e));
            }
            // Wait for bytes before taking a buffer for them: a connection
            // waiting for its peer holds none, or one record's worth.
            if this.io.poll_read_ready(cx)?.is_pending() {
                this.shrink_waiting();
                return Poll::Pending;
            }
            // What is held is the start of one record, shorter than one.
            let want = if this.flowing || this.in_small {
                READ_BIG
            } else {
                READ_SMALL.saturating_sub(this.inbuf.len()).max(1)
            };
            if this.inbuf.capacity() == 0 {
                this.inbuf = spare::take();
                this.in_small = false;
            }
            if this.inbuf.capacity() - this.inbuf.len() < want {
                if this.in_small {
                    // Reading again: a kept buffer rather than a new one.
                    let mut big = spare::take();
                    big.reserve(this.inbuf.len() + want);
                    big.extend_from_slice(&this.inbuf);
                    this.inbuf = big;
                }
                this.in_small = false;
            }
            // At most `want`, however much room the buffer has: a reader
            // that is not flowing takes one record and leaves the rest in
            // the socket. Draining the socket at every read left it empty
            // at the next, so the reader slept and every write of a bulk
            // sender paid for waking it on the other core (measured with
            // `records --workloads bulk`: 1.6 context switches per sender
            // write, 11 Gbit/s; bounded, 0.35 and 28 Gbit/s).
            this.inbuf.reserve(want);
            let mut limited = BufMut::limit(&mut this.inbuf, want);
            match this.io.try_read_buf(&mut limited) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls: the peer closed the connection without sending close_notify",
                    )));
                }
                Ok(n) => this.flowing = n == want,
                // Readiness was stale; poll_read_ready registers us again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.release_record(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl TlsStream {
    /// Drops the record handed out (or handled) at the front of `inbuf`,
    /// and the buffer itself once nothing is left in it.
    fn release_record(&mut self) {
        if self.record > 0 {
            self.inbuf.advance(self.record);
            self.record = 0;
            self.plain = 0..0;
        }
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            spare::give(std::mem::take(&mut self.inbuf));
            self.flowing = false;
            self.in_small = false;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failed() {
            return Poll::Ready(Err(e));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: write after close_notify",
            )));
        }
        if this.outbuf.len() >= OUT_HIGH {
            // Full: make room first; what the socket took makes room.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            if this.outbuf.len() >= OUT_HIGH {
                return Poll::Pending;
            }
        }
        let taken = match this.seal_slices(bufs) {
            Ok(taken) => taken,
            Err(e) => {
                // The close_notify, if one was sealed; best effort.
                let _ = this.poll_drain(cx);
                return Poll::Ready(Err(e));
            }
        };
        // Send now; what the socket refuses waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.seal(ALERT, &[WARNING, CLOSE_NOTIFY])?;
            this.write_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod interop_tests;

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
    use rustls::HandshakeKind;
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Two gateways' identities, each trusting the other's CA; also the
    /// splice tests' PKI.
    pub(crate) struct Pki {
        pub(crate) server: Identity,
        pub(crate) client: Identity,
        pub(crate) server_bundle: TrustBundle,
        pub(crate) client_bundle: TrustBundle,
    }

    pub(crate) fn pki() -> Pki {
        let issue = |domain: &str| {
            let td: TrustDomain = domain.parse().unwrap();
            let ca = Ca::new(&td).unwrap();
            let id: SpiffeId = format!("spiffe://{domain}/gw").parse().unwrap();
            let issued = ca.issue(&id, &[], &[]).unwrap();
            let identity =
                Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
            (
                identity,
                TrustBundle::from_pem(td, ca.cert_pem().as_bytes()).unwrap(),
            )
        };
        let (server, server_bundle) = issue("a.example");
        let (client, client_bundle) = issue("b.example");
        Pki {
            server,
            client,
            server_bundle,
            client_bundle,
        }
    }

    impl Pki {
        fn server(&self) -> rustls::ServerConfig {
            let bundles = std::slice::from_ref(&self.client_bundle);
            (*elsinore_certs::server_config(&self.server, bundles, &[b"h2"]).unwrap()).clone()
        }

        fn client(&self) -> rustls::ClientConfig {
            (*elsinore_certs::client_config(&self.client, &self.server_bundle, None, &[b"h2"])
                .unwrap())
            .clone()
        }
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("svc.a.example").unwrap()
    }

    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Sends `bytes` to a fresh server and returns the client's end and
    /// the error the server's handshake ended with (within 10 s); panics
    /// with `completed` if the handshake succeeded.
    async fn refused_handshake(pki: &Pki, bytes: &[u8], completed: &str) -> (TcpStream, io::Error) {
        let (mut c, s) = pair().await;
        c.write_all(bytes).await.unwrap();
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            accept(server_config(pki.server()), s),
        )
        .await
        .expect("accept ends within 10s");
        let Err(err) = accepted else {
            panic!("{completed}");
        };
        (c, err)
    }

    /// A payload no two offsets of which look alike, so a lost, repeated or
    /// reordered chunk shows.
    fn payload(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
            .collect()
    }

    /// Writes `data` and a close, and reads to the end at the same time.
    async fn exchange<S: AsyncRead + AsyncWrite>(stream: S, data: &[u8]) -> io::Result<Vec<u8>> {
        let (mut r, mut w) = tokio::io::split(stream);
        let write = async {
            w.write_all(data).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let (written, read) = tokio::join!(write, r.read_to_end(&mut got));
        written?;
        read?;
        Ok(got)
    }

    /// Echoes until EOF, then closes.
    async fn echo<S: AsyncRead + AsyncWrite>(stream: S) -> io::Result<u64> {
        let (mut r, mut w) = tokio::io::split(stream);
        let n = tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await?;
        Ok(n)
    }

    /// Our server echoing one connection; the handle yields the bytes
    /// echoed and what the handshake learned.
    async fn our_echo_server(pki: &Pki) -> (TcpStream, tokio::task::JoinHandle<(u64, Accepted)>) {
        let (c, s) = pair().await;
        let config = server_config(pki.server());
        let server = tokio::spawn(async move {
            let (tls, accepted) = accept(config, s).await.unwrap();
            (echo(tls).await.unwrap(), accepted)
        });
        (c, server)
    }

    /// Our client connected to a rustls server that echoes one connection.
    async fn our_client_to_a_rustls_echo() -> (TlsStream, tokio::task::JoinHandle<io::Result<u64>>)
    {
        let pki = pki();
        let (c, s) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server()));
        let server = tokio::spawn(async move { echo(acceptor.accept(s).await.unwrap()).await });
        let tls = connect(client_config(pki.client()), name(), c)
            .await
            .unwrap();
        (tls, server)
    }

    #[tokio::test]
    async fn our_client_and_a_rustls_server_carry_megabytes_both_ways() {
        let _limit = crate::test_support::limit();
        let (tls, server) = our_client_to_a_rustls_echo().await;
        assert_eq!(tls.alpn_protocol(), Some(&b"h2"[..]));
        let data = payload(3 << 20);
        assert_eq!(exchange(tls, &data).await.unwrap(), data);
        assert_eq!(server.await.unwrap().unwrap(), 3 << 20);
    }

    #[tokio::test]
    async fn a_rustls_client_and_our_server_carry_megabytes_both_ways() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, server) = our_echo_server(&pki).await;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let tls = connector.connect(name(), c).await.unwrap();
        let data = payload(3 << 20);
        assert_eq!(exchange(tls, &data).await.unwrap(), data);
        let (echoed, accepted) = server.await.unwrap();
        assert_eq!(echoed, 3 << 20);
        assert_eq!(accepted.server_name.as_deref(), Some("svc.a.example"));
        let chain = accepted.peer_certificates.unwrap();
        let id = elsinore_certs::peer_spiffe_id(Some(&chain)).unwrap();
        assert_eq!(id.to_string(), "spiffe://b.example/gw");
    }

    #[tokio::test]
    async fn a_key_update_the_peer_requests_is_followed_and_answered() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, s) = pair().await;
        let config = server_config(pki.server());
        let server = tokio::spawn(async move {
            let (mut tls, _) = accept(config, s).await.unwrap();
            let mut buf = [0; 5];
            for _ in 0..2 {
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(&buf).await.unwrap();
            }
            tls.key_updates_sent
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let mut tls = connector.connect(name(), c).await.unwrap();
        let mut buf = [0; 5];
        for word in [b"first", b"again"] {
            // Ask for new keys both ways before each message.
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(word).await.unwrap();
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, word);
        }
        assert_eq!(server.await.unwrap(), 2, "each request must be answered");
    }

    /// A client may ask for new keys in the same flight as its Finished
    /// (here: one write holding Finished, a KeyUpdate asking for an answer,
    /// and data). The server's handshake must leave that KeyUpdate to the
    /// record layer: were rustls to read it during the handshake, it would
    /// switch its sending key and queue the answer where the handover never
    /// sends it, and the client could not decrypt anything after. This was
    /// the load-dependent failure of the test above.
    #[tokio::test]
    async fn a_key_update_in_the_flight_of_the_client_finished_is_answered() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, s) = pair().await;
        let config = server_config(pki.server());
        let server = tokio::spawn(async move {
            let (mut tls, _) = accept(config, s).await.unwrap();
            let mut buf = [0; 5];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(&buf).await.unwrap();
            tls.flush().await.unwrap();
            tls.key_updates_sent
        });
        let client_config = Arc::new(pki.client());
        let c = c.into_std().unwrap();
        c.set_nonblocking(false).unwrap();
        let echoed = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut sock = c;
            let mut conn = rustls::ClientConnection::new(client_config, name()).unwrap();
            // The handshake up to the client's Finished, which is queued
            // but not written yet.
            while conn.is_handshaking() {
                if conn.wants_write() {
                    conn.write_tls(&mut sock).unwrap();
                } else {
                    conn.read_tls(&mut sock).unwrap();
                    conn.process_new_packets().unwrap();
                }
            }
            conn.refresh_traffic_keys().unwrap();
            conn.writer().write_all(b"first").unwrap();
            // Finished, KeyUpdate and data in one write.
            conn.write_tls(&mut sock).unwrap();
            assert!(!conn.wants_write(), "the flight took more than one write");
            let mut got = Vec::new();
            while got.len() < 5 {
                if conn.read_tls(&mut sock).unwrap() == 0 {
                    break;
                }
                conn.process_new_packets()
                    .unwrap_or_else(|e| panic!("the client cannot read the answer: {e}"));
                let mut buf = [0; 16];
                match conn.reader().read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            got
        })
        .await
        .unwrap();
        assert_eq!(echoed, b"first");
        assert_eq!(
            server.await.unwrap(),
            1,
            "the request for new keys is answered"
        );
    }

    #[tokio::test]
    async fn our_keys_are_replaced_before_their_limit() {
        let _limit = crate::test_support::limit();
        let (mut tls, server) = our_client_to_a_rustls_echo().await;
        tls.set_tx_limit(2);
        let data = payload(10 * MAX_PLAINTEXT);
        let mut got = vec![0; data.len()];
        let (written, read) = {
            let (mut r, mut w) = tokio::io::split(&mut tls);
            tokio::join!(
                async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                },
                r.read_exact(&mut got)
            )
        };
        written.unwrap();
        read.unwrap();
        assert_eq!(got, data);
        assert!(
            tls.key_updates_sent >= 4,
            "{} updates",
            tls.key_updates_sent
        );
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn tickets_a_server_sends_after_the_handshake_resume_the_next_connection() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server()));
        let config = client_config(pki.client());
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (c, s) = pair().await;
            let acceptor = acceptor.clone();
            let server = tokio::spawn(async move {
                let tls = acceptor.accept(s).await.unwrap();
                let kind = tls.get_ref().1.handshake_kind();
                echo(tls).await.unwrap();
                kind
            });
            let tls = connect(Arc::clone(&config), name(), c).await.unwrap();
            assert_eq!(exchange(tls, b"hello").await.unwrap(), b"hello");
            kinds.push(server.await.unwrap());
        }
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
        );
    }

    /// Our server, a rustls client that completed the handshake, and the
    /// client's raw socket for what a broken peer would send.
    async fn server_with_raw_client(pki: &Pki) -> (TlsStream, TcpStream) {
        let (c, s) = pair().await;
        let config = server_config(pki.server());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let (ours, theirs) = tokio::join!(accept(config, s), connector.connect(name(), c));
        let (ours, _) = ours.unwrap();
        (ours, theirs.unwrap().into_inner().0)
    }

    /// What our server's next read fails with once the peer's raw socket
    /// sent `bytes`, or (for `None`) a FIN with no close_notify before it.
    async fn read_error_after(bytes: Option<&[u8]>) -> io::Error {
        let pki = pki();
        let (mut ours, mut raw) = server_with_raw_client(&pki).await;
        match bytes {
            Some(bytes) => raw.write_all(bytes).await.unwrap(),
            None => raw.shutdown().await.unwrap(),
        }
        ours.read(&mut [0; 64]).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_tampered_record_is_an_error_naming_it() {
        let _limit = crate::test_support::limit();
        let mut record = vec![APPLICATION_DATA, 3, 3, 0, 40];
        record.extend_from_slice(&[7; 40]);
        let e = read_error_after(Some(&record)).await;
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused_before_it_is_read() {
        let _limit = crate::test_support::limit();
        let e = read_error_after(Some(&[APPLICATION_DATA, 3, 3, 0x48, 0])).await;
        assert!(e.to_string().contains("record length 18432"), "{e}");
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_unexpected_eof() {
        let _limit = crate::test_support::limit();
        let e = read_error_after(None).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[tokio::test]
    async fn data_and_a_close_sent_right_after_the_handshake_are_kept() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, s) = pair().await;
        let config = server_config(pki.server());
        let server = tokio::spawn(async move {
            let (mut tls, _) = accept(config, s).await.unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            tls.write_all(&got).await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let mut tls = connector.connect(name(), c).await.unwrap();
        // No await point between the client's Finished and these: on this
        // one-thread runtime the server reads them in the same read.
        tls.write_all(b"early words").await.unwrap();
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early words");
        server.await.unwrap();
    }

    /// A rustls server speaking only `suite` (and so only its version),
    /// echoing one connection.
    async fn echo_server_with(
        pki: &Pki,
        suite: rustls::SupportedCipherSuite,
    ) -> (TcpStream, tokio::task::JoinHandle<io::Result<u64>>) {
        let acceptor = acceptor_with(pki, suite);
        let (c, s) = pair().await;
        let server = tokio::spawn(async move { echo(acceptor.accept(s).await?).await });
        (c, server)
    }

    /// A rustls acceptor speaking only `suite` (and so only its version).
    fn acceptor_with(pki: &Pki, suite: rustls::SupportedCipherSuite) -> tokio_rustls::TlsAcceptor {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = vec![suite];
        let version = suite.version();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(pki.server.cert_chain().to_vec(), pki.server.private_key())
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    #[tokio::test]
    async fn every_suite_of_both_versions_carries_data() {
        let _limit = crate::test_support::limit();
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let pki = pki();
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ] {
            let (c, server) = echo_server_with(&pki, suite).await;
            let tls = connect(client_config(pki.client()), name(), c)
                .await
                .unwrap_or_else(|e| panic!("{suite:?}: {e}"));
            let data = payload(200 * 1024 + 7);
            let got = exchange(tls, &data)
                .await
                .unwrap_or_else(|e| panic!("{suite:?}: {e}"));
            assert!(got == data, "{suite:?}: the echo differs");
            assert_eq!(
                server.await.unwrap().unwrap(),
                data.len() as u64,
                "{suite:?}"
            );
        }
    }

    #[tokio::test]
    async fn bytes_relayed_from_a_socket_are_sealed_where_they_land() {
        let _limit = crate::test_support::limit();
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let pki = pki();
        // TLS 1.3, and TLS 1.2 with the explicit nonce of AES-GCM.
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ] {
            let (c, server) = echo_server_with(&pki, suite).await;
            let mut tls = connect(client_config(pki.client()), name(), c)
                .await
                .unwrap();
            let (mut app, src) = pair().await;
            // More than one relay read holds, and not a whole record.
            let data = payload(RELAY_RECORDS * MAX_PLAINTEXT + 3 * MAX_PLAINTEXT + 7);
            app.write_all(&data).await.unwrap();
            app.shutdown().await.unwrap();
            let mut moved = 0;
            loop {
                match poll_fn(|cx| tls.poll_relay_from(cx, &src)).await.unwrap() {
                    Relayed::Moved(n) => moved += n,
                    Relayed::Eof => break,
                    Relayed::Unavailable => panic!("{suite:?}: direct path refused"),
                }
            }
            assert_eq!(moved, data.len(), "{suite:?}");
            let got = exchange(tls, &[]).await.unwrap();
            assert!(got == data, "{suite:?}: the echo differs");
            assert_eq!(server.await.unwrap().unwrap(), data.len() as u64);
        }
    }

    #[tokio::test]
    async fn a_tls12_client_and_our_server_carry_data_both_ways() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, server) = our_echo_server(&pki).await;
        let tls12 = elsinore_certs::client_config_with_versions(
            &pki.client,
            &pki.server_bundle,
            None,
            &[],
            &[&rustls::version::TLS12],
        )
        .unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls12)
            .connect(name(), c)
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_2)
        );
        let data = payload(1 << 20);
        assert_eq!(exchange(tls, &data).await.unwrap(), data);
        let (echoed, accepted) = server.await.unwrap();
        assert_eq!(echoed, 1 << 20);
        assert_eq!(accepted.server_name.as_deref(), Some("svc.a.example"));
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_peer_holds_no_buffer() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, s) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server()));
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            tls.write_all(&payload(40 * 1024)).await.unwrap();
            tls.flush().await.unwrap();
            // Hold the connection open until the client is done.
            let _ = tls.read_to_end(&mut Vec::new()).await;
        });
        let mut ours = connect(client_config(pki.client()), name(), c)
            .await
            .unwrap();
        ours.write_all(b"hello").await.unwrap();
        let mut got = vec![0; 40 * 1024];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload(40 * 1024));
        // Nothing more is coming: the read waits, without a buffer.
        let mut buf = [0; 64];
        let waiting = tokio::time::timeout(Duration::from_millis(50), ours.read(&mut buf));
        assert!(waiting.await.is_err(), "no data was sent");
        assert_eq!(ours.inbuf.capacity(), 0, "incoming buffer kept");
        assert_eq!(ours.outbuf.capacity(), 0, "outgoing buffer kept");
        drop(ours);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_reader_not_yet_flowing_takes_one_record_and_leaves_the_rest_in_the_socket() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (c, s) = pair().await;
        // A second handle on the server's socket, to see what is still
        // queued in the kernel without taking it.
        let s = s.into_std().unwrap();
        let probe = s.try_clone().unwrap();
        let s = TcpStream::from_std(s).unwrap();
        let (ours, client) = tokio::join!(
            accept(server_config(pki.server()), s),
            connect(client_config(pki.client()), name(), c)
        );
        let (mut ours, _) = ours.unwrap();
        let mut client = client.unwrap();
        let data = payload(4 * MAX_PLAINTEXT);
        client.write_all(&data).await.unwrap();
        client.flush().await.unwrap();
        let sent = 4 * (HEADER + MAX_PLAINTEXT + 1 + TAG);
        let queued = || {
            let mut peek = vec![0; 2 * sent];
            match probe.peek(&mut peek) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                queued => queued.unwrap(),
            }
        };
        crate::test_support::wait_until("the four records queued", Duration::from_secs(10), || {
            let n = queued();
            async move {
                if n == sent {
                    Ok(())
                } else {
                    Err(format!("{n} bytes queued"))
                }
            }
        })
        .await;

        let mut first = [0; 1];
        ours.read_exact(&mut first).await.unwrap();
        // One record's worth was read; the other three wait in the socket.
        assert_eq!(
            queued(),
            sent - READ_SMALL,
            "the first read took more than a record"
        );

        let mut rest = vec![0; data.len() - 1];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!([&first[..], &rest[..]].concat(), data);
        assert_eq!(queued(), 0);
    }

    #[test]
    fn drained_buffers_are_kept_per_thread_up_to_a_limit() {
        while spare::kept().0 > 0 {
            spare::take();
        }
        // Drained the way a connection drains it: read to the end.
        let mut drained = BytesMut::with_capacity(READ_BIG);
        drained.extend_from_slice(&payload(READ_BIG));
        drained.advance(READ_BIG);
        spare::give(drained);
        assert_eq!(spare::kept().0, 1);
        assert!(spare::take().capacity() >= READ_BIG);
        assert_eq!(spare::kept(), (0, 0));
        // Nothing to keep in a buffer never allocated, or one too small.
        spare::give(BytesMut::new());
        spare::give(BytesMut::with_capacity(100));
        assert_eq!(spare::kept(), (0, 0));
        // A burst's oversized buffer goes back to malloc.
        spare::give(BytesMut::with_capacity(4 * READ_BIG));
        assert_eq!(spare::kept(), (0, 0));
        // Bulk buffers: only as many as the byte budget holds.
        for _ in 0..8 {
            spare::give(BytesMut::with_capacity(2 * READ_BIG));
        }
        let (count, bytes) = spare::kept();
        assert!(
            count >= 1 && bytes <= spare::KEEP_BYTES,
            "{count} kept, {bytes} bytes"
        );
        assert!(bytes + 2 * READ_BIG > spare::KEEP_BYTES, "room left unused");
        while spare::kept().0 > 0 {
            spare::take();
        }
        assert_eq!(spare::kept(), (0, 0), "taking gives the bytes back");
        // Request/response buffers: eight, whatever the budget.
        for _ in 0..20 {
            spare::give(BytesMut::with_capacity(READ_SMALL));
        }
        assert_eq!(spare::kept().0, 8);
    }

    #[tokio::test]
    async fn a_client_resumes_with_our_server_and_keeps_its_identity() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let config = server_config(pki.server());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (c, s) = pair().await;
            let config = Arc::clone(&config);
            let server = tokio::spawn(async move {
                let (tls, accepted) = accept(config, s).await.unwrap();
                echo(tls).await.unwrap();
                accepted
            });
            let tls = connector.connect(name(), c).await.unwrap();
            let kind = tls.get_ref().1.handshake_kind();
            assert_eq!(exchange(tls, b"hello").await.unwrap(), b"hello");
            let accepted = server.await.unwrap();
            let chain = accepted.peer_certificates.expect("a client chain");
            let id = elsinore_certs::peer_spiffe_id(Some(&chain)).unwrap();
            seen.push((kind, id.to_string(), accepted.server_name));
        }
        let id = "spiffe://b.example/gw".to_owned();
        let sni = Some("svc.a.example".to_owned());
        assert_eq!(
            seen,
            [
                (Some(HandshakeKind::Full), id.clone(), sni.clone()),
                (Some(HandshakeKind::Resumed), id, sni),
            ]
        );
    }

    /// A real ClientHello (rustls, SNI svc.a.example, ALPN h2) with a few
    /// bytes flipped, inserted, deleted or cut off, sent to [`accept`]
    /// followed by the end of the stream: the server never panics or hangs,
    /// always ends with an error (the client never finishes), and what it
    /// wrote is well-formed TLS records: a ServerHello flight when the hello
    /// still parsed, or a fatal plaintext alert (sent before the error
    /// returns, as `drive` promises). The counts prove the edits reach both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edited_client_hellos_get_a_server_hello_or_a_fatal_alert() {
        let _limit = crate::test_support::limit();
        use proptest::prelude::*;
        use proptest::strategy::ValueTree;
        let pki = pki();
        let server = server_config(pki.server());
        let mut client =
            rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        assert_eq!(hello[0], 0x16, "a handshake record");

        let edit = (0u8..4, any::<prop::sample::Index>(), any::<u8>());
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(256));
        let mut cases = Vec::new();
        for _ in 0..256 {
            let edits = prop::collection::vec(edit.clone(), 0..3)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let mut bytes = hello.clone();
            let described = format!("{edits:?}");
            for (kind, at, byte) in edits {
                let len = bytes.len();
                match kind {
                    0 => bytes.insert(at.index(len + 1), byte),
                    _ if len == 0 => {}
                    1 => bytes[at.index(len)] ^= 1 << (byte % 8),
                    2 => {
                        bytes.remove(at.index(len));
                    }
                    _ => bytes.truncate(at.index(len)),
                }
            }
            cases.push((described, bytes));
        }

        let (mut server_hellos, mut alerts, mut silent) = (0, 0, 0);
        for (edits, bytes) in cases {
            let (mut c, s) = pair().await;
            c.write_all(&bytes).await.unwrap();
            c.shutdown().await.unwrap();
            // In a task of its own, so that a panic is reported with its input.
            let accepting = tokio::spawn(tokio::time::timeout(
                Duration::from_secs(10),
                accept(server.clone(), s),
            ));
            let accepted = match accepting.await {
                Ok(result) => result.expect("accept ends within 10s"),
                Err(e) => panic!("accept panicked on the hello edited by {edits}: {e}"),
            };
            assert!(
                accepted.is_err(),
                "a handshake completed without a client Finished"
            );
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
                .await
                .expect("the server closes")
                .unwrap_or(0);
            // Walk the records the server wrote.
            let mut rest = out.as_slice();
            let mut types = Vec::new();
            while !rest.is_empty() {
                assert!(rest.len() >= 5, "a truncated record header: {out:?}");
                let (typ, len) = (rest[0], usize::from(u16::from_be_bytes([rest[3], rest[4]])));
                assert!(matches!(typ, 0x14..=0x17), "record type {typ}: {out:?}");
                assert_eq!(rest[1], 0x03, "record version: {out:?}");
                assert!(rest.len() >= 5 + len, "a truncated record: {out:?}");
                if typ == 0x15 && types.is_empty() {
                    // A plaintext alert before any handshake: fatal.
                    assert_eq!(len, 2);
                    assert_eq!(rest[5], 2, "alert level: {out:?}");
                }
                types.push(typ);
                rest = &rest[5 + len..];
            }
            match types.first() {
                Some(0x16) => server_hellos += 1,
                Some(0x15) => alerts += 1,
                None => silent += 1,
                Some(other) => {
                    panic!("first record of type {other} for the hello edited by {edits}: {out:?}")
                }
            }
        }
        eprintln!(
            "of 256 edited ClientHellos: {server_hellos} answered with a ServerHello, {alerts} with an alert, {silent} closed silently"
        );
        assert!(server_hellos >= 10, "{server_hellos} ServerHellos");
        assert!(alerts >= 10, "{alerts} alerts");
    }

    /// Found by the test above: a ClientHello with one bit flipped and one
    /// byte inserted made rustls fail without queueing an alert, and the
    /// alert probe that followed handed rustls an empty buffer while its
    /// deframer still counted progress in the real one: a panic (slice
    /// index out of range) instead of an error.
    #[tokio::test]
    async fn a_client_hello_that_fails_without_an_alert_is_an_error_not_a_panic() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let mut client =
            rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        // proptest's Index(raw).index(size): a fixed-point fraction of size.
        let at = |raw: u64, size: usize| ((size as u128 * u128::from(raw)) >> 64) as usize;
        let len = hello.len();
        hello[at(4553423649611829179, len)] ^= 1 << (84 % 8);
        hello.insert(at(486907595222288628, len + 1), 63);
        let (mut c, s) = pair().await;
        c.write_all(&hello).await.unwrap();
        c.shutdown().await.unwrap();
        let accepting = tokio::spawn(tokio::time::timeout(
            Duration::from_secs(10),
            accept(server_config(pki.server()), s),
        ));
        let accepted = accepting.await.expect("accept does not panic");
        let Err(err) = accepted.expect("accept ends within 10s") else {
            panic!("a handshake completed without a client Finished");
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// Found by the mutation test too: a ClientHello with one byte appended
    /// inside its record fails after rustls has encoded the ServerHello
    /// flight. The flight used to be dropped and only the alert sent, which
    /// TLS 1.3 encrypts under handshake keys the client cannot derive
    /// without that flight; now the flight goes out first.
    #[tokio::test]
    async fn an_alert_after_the_server_hello_flight_follows_that_flight() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let mut client =
            rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        let at = (((hello.len() as u128 + 1) * 18425487743616005254u128) >> 64) as usize;
        hello.insert(at, 64);
        let (mut c, s) = pair().await;
        c.write_all(&hello).await.unwrap();
        c.shutdown().await.unwrap();
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            accept(server_config(pki.server()), s),
        )
        .await
        .expect("accept ends within 10s");
        assert!(accepted.is_err());
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .expect("the server closes")
            .unwrap();
        assert_eq!(
            out.first(),
            Some(&0x16),
            "the ServerHello comes first: {out:?}"
        );
        // The last record is the (encrypted) alert.
        let mut rest = out.as_slice();
        let mut last = 0;
        while rest.len() >= 5 {
            last = rest[0];
            rest = &rest[5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))..];
        }
        assert_eq!(last, 0x17, "an encrypted alert ends the flight: {out:?}");
    }

    /// tlsfuzzer's "zero-length app data interleaved in handshake": a
    /// ClientHello split over two records with an empty application data
    /// record between them. rustls refuses it without queueing an alert;
    /// the client must still get a plaintext fatal unexpected_message
    /// (RFC 8446 §5.1), not a bare close.
    #[tokio::test]
    async fn a_record_inside_a_split_client_hello_gets_an_unexpected_message_alert() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let mut client =
            rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        let message = &hello[5..];
        let mut bytes = vec![0x16, 3, 1, 0, 10];
        bytes.extend_from_slice(&message[..10]);
        bytes.extend_from_slice(&[0x17, 3, 3, 0, 0]);
        let (mut c, err) =
            refused_handshake(&pki, &bytes, "a handshake completed on half a ClientHello").await;
        assert!(
            err.to_string()
                .contains("MessageInterleavedWithHandshakeMessage"),
            "{err}"
        );
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .expect("the server closes")
            .unwrap();
        assert_eq!(out, [0x15, 3, 3, 0, 2, 2, 10], "a fatal unexpected_message");
    }

    /// tlsfuzzer's "too big ClientHello msg": a ClientHello padded to 2^14
    /// + 1 bytes in one record. rustls takes plaintext records up to the
    /// TLS 1.2 ciphertext limit and answered it with a ServerHello; RFC 8446
    /// §5.1 asks for record_overflow.
    #[tokio::test]
    async fn a_client_hello_record_over_2_14_bytes_gets_record_overflow() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let mut client =
            rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        // The body: version, random, session id, suites, compression, then
        // the extensions' length; a padding extension (21) goes first.
        let mut body = hello[9..].to_vec();
        let mut at = 2 + 32;
        at += 1 + usize::from(body[at]);
        at += 2 + usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        at += 1 + usize::from(body[at]);
        let pad = MAX_PLAINTEXT + 1 - 4 - body.len() - 4;
        let extensions = usize::from(u16::from_be_bytes([body[at], body[at + 1]])) + 4 + pad;
        body[at..at + 2].copy_from_slice(&(extensions as u16).to_be_bytes());
        let mut padding = vec![0, 21];
        padding.extend_from_slice(&(pad as u16).to_be_bytes());
        padding.resize(4 + pad, 0);
        body.splice(at + 2..at + 2, padding);
        let mut bytes = vec![0x16, 3, 1];
        bytes.extend_from_slice(&(4 + body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&body);
        assert_eq!(bytes.len(), HEADER + MAX_PLAINTEXT + 1);
        let (mut c, err) = refused_handshake(
            &pki,
            &bytes,
            "a handshake completed without a client Finished",
        )
        .await;
        assert!(err.to_string().contains("16385 bytes"), "{err}");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .expect("the server closes")
            .unwrap();
        assert_eq!(out, [0x15, 3, 3, 0, 2, 2, 22], "a fatal record_overflow");
    }

    /// Waits (on the wall clock: that is the condition) until `cert` has expired.
    async fn until_expired(cert: &CertificateDer<'_>) {
        let not_after = elsinore_certs::not_after(cert).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::SystemTime::now() <= not_after + Duration::from_millis(1100) {
            assert!(
                std::time::Instant::now() < deadline,
                "certificate never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn a_client_refuses_to_resume_with_a_server_whose_certificate_expired() {
        let _limit = crate::test_support::limit();
        let td: TrustDomain = "a.example".parse().unwrap();
        let ca = Ca::new(&td).unwrap();
        let issued = ca
            .issue_valid_for(
                &"spiffe://a.example/gw".parse().unwrap(),
                Duration::from_secs(2),
            )
            .unwrap();
        let short =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let mut pki = pki();
        pki.server = short.clone();
        pki.server_bundle = TrustBundle::from_pem(td, ca.cert_pem().as_bytes()).unwrap();
        // A rustls server that resumes whatever it issued a ticket for.
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server()));
        let client = client_config(pki.client());
        let mut kinds = Vec::new();
        let mut results = Vec::new();
        for round in 0..2 {
            if round == 1 {
                until_expired(&short.cert_chain()[0]).await;
            }
            let (c, s) = pair().await;
            let acceptor = acceptor.clone();
            let server = tokio::spawn(async move {
                let tls = acceptor.accept(s).await.ok()?;
                let kind = tls.get_ref().1.handshake_kind();
                let _ = echo(tls).await;
                kind
            });
            let result = match connect(Arc::clone(&client), name(), c).await {
                Ok(tls) => exchange(tls, b"hello").await.map(|_| ()),
                Err(e) => Err(e),
            };
            results.push(result.map_err(|e| e.to_string()));
            kinds.push(server.await.unwrap());
        }
        assert_eq!(results[0], Ok(()), "the full handshake, while valid");
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)]
        );
        let err = results[1].clone().unwrap_err();
        assert!(err.contains("server certificate has expired"), "{err}");
    }

    // ---- What a misbehaving peer gets (issue 16) ----

    /// Our server and a rustls client that completed the handshake with it.
    async fn server_with_rustls_client(
        pki: &Pki,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (c, s) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client()));
        let (ours, theirs) = tokio::join!(
            accept(server_config(pki.server()), s),
            connector.connect(name(), c)
        );
        (ours.unwrap().0, theirs.unwrap())
    }

    /// The error rustls reports on what arrives on `raw` from our side.
    async fn rustls_error(
        raw: &mut TcpStream,
        conn: &mut rustls::ClientConnection,
    ) -> rustls::Error {
        let mut buf = vec![0; 32 * 1024];
        loop {
            let n = raw.read(&mut buf).await.unwrap();
            assert!(n > 0, "our side closed without an alert");
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest).unwrap();
                if let Err(e) = conn.process_new_packets() {
                    return e;
                }
            }
        }
    }

    /// What our server's read fails with once the raw socket of a rustls
    /// client sent `bytes`, and the alert rustls then reads from it.
    async fn rustls_sees_after(bytes: &[u8]) -> (io::Error, rustls::Error) {
        let pki = pki();
        let (mut ours, theirs) = server_with_rustls_client(&pki).await;
        let (mut raw, mut conn) = theirs.into_inner();
        raw.write_all(bytes).await.unwrap();
        let err = ours.read(&mut [0; 64]).await.unwrap_err();
        // A closed connection shows an alert that was not sent.
        drop(ours);
        (err, rustls_error(&mut raw, &mut conn).await)
    }

    #[tokio::test]
    async fn records_refused_before_decryption_get_the_alert_rustls_sends() {
        let _limit = crate::test_support::limit();
        use rustls::AlertDescription as A;
        let mut tampered = vec![APPLICATION_DATA, 3, 3, 0, 40];
        tampered.extend_from_slice(&[7; 40]);
        let cases: [(&[u8], &str, A); 4] = [
            (&tampered, "bad_record_mac", A::BadRecordMac),
            (
                &[APPLICATION_DATA, 3, 3, 0, 3, 1, 2, 3],
                "record length 3",
                A::BadRecordMac,
            ),
            (
                &[APPLICATION_DATA, 3, 3, 0x48, 0],
                "record length 18432",
                A::RecordOverflow,
            ),
            (
                &[HANDSHAKE, 3, 3, 0, 1, 0],
                "record of type 22",
                A::UnexpectedMessage,
            ),
        ];
        for (bytes, says, alert) in cases {
            let (err, seen) = rustls_sees_after(bytes).await;
            assert!(err.to_string().contains(says), "{says}: {err}");
            assert_eq!(seen, rustls::Error::AlertReceived(alert), "{says}");
        }
    }

    #[tokio::test]
    async fn key_update_requests_received_together_are_answered_once() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut theirs) = server_with_rustls_client(&pki).await;
        // As many requests as are allowed without data, in one write with data.
        for _ in 0..MAX_POST_HANDSHAKE {
            theirs.get_mut().1.refresh_traffic_keys().unwrap();
        }
        theirs.write_all(b"x").await.unwrap();
        theirs.flush().await.unwrap();
        let mut buf = [0; 1];
        ours.read_exact(&mut buf).await.unwrap();
        ours.write_all(b"y").await.unwrap();
        ours.flush().await.unwrap();
        // rustls follows our one answer to read what comes after it.
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y");
        assert_eq!(ours.key_updates_sent, 1, "one answer for all the requests");
    }

    /// The answer goes out from the read path once the data that came
    /// with the request has been handed over: a side that only reads still
    /// owes it (RFC 8446 §4.6.3), and a reader that got what it wanted may
    /// not read again until the peer hears back.
    #[tokio::test]
    async fn a_key_update_request_is_answered_by_a_side_that_only_reads() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut theirs) = server_with_rustls_client(&pki).await;
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        theirs.write_all(b"x").await.unwrap();
        theirs.flush().await.unwrap();
        let mut buf = [0; 1];
        ours.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            ours.key_updates_sent, 1,
            "answered with the data, before any further read or write"
        );
        // rustls follows the answer to read what comes after it.
        ours.write_all(b"y").await.unwrap();
        ours.flush().await.unwrap();
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y");
        assert_eq!(ours.key_updates_sent, 1);
    }

    #[tokio::test]
    async fn more_key_updates_than_allowed_without_data_are_an_unexpected_message() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut theirs) = server_with_rustls_client(&pki).await;
        for _ in 0..=MAX_POST_HANDSHAKE {
            theirs.get_mut().1.refresh_traffic_keys().unwrap();
        }
        theirs.write_all(b"x").await.unwrap();
        theirs.flush().await.unwrap();
        let err = ours.read(&mut [0; 1]).await.unwrap_err();
        assert!(err.to_string().contains("more than 32 KeyUpdate"), "{err}");
        assert_eq!(ours.key_updates_sent, 0, "no answer to a flood");
        drop(ours);
        let seen = theirs.read(&mut [0; 1]).await.unwrap_err();
        let seen = seen
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert_eq!(
            seen,
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::UnexpectedMessage
            ))
        );
    }

    /// Our server and, as its peer, our client, whose raw `seal` sends what
    /// no honest peer would.
    async fn server_and_raw_peer(pki: &Pki) -> (TlsStream, TlsStream) {
        let (c, s) = pair().await;
        let (ours, peer) = tokio::join!(
            accept(server_config(pki.server()), s),
            connect(client_config(pki.client()), name(), c)
        );
        (ours.unwrap().0, peer.unwrap())
    }

    /// Seals `records` (inner type, content) as `peer` and sends them.
    async fn send_sealed(peer: &mut TlsStream, records: &[(u8, &[u8])]) {
        for (typ, content) in records {
            peer.seal(*typ, content).unwrap();
        }
        peer.flush().await.unwrap();
    }

    /// What our server fails with after `records` (which end with data, so
    /// that a server taking them reads that data instead), and the alert
    /// the peer reads after it.
    async fn refused(records: &[(u8, &[u8])]) -> (io::Error, io::Error) {
        let pki = pki();
        let (mut ours, mut peer) = server_and_raw_peer(&pki).await;
        send_sealed(&mut peer, records).await;
        let mut buf = [0; 64];
        let err = match ours.read(&mut buf).await {
            Ok(n) => panic!("read {:?}", &buf[..n]),
            Err(e) => e,
        };
        // The connection stays failed, the same way.
        let again = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
        let write = ours.write(b"y").await.unwrap_err();
        assert_eq!(write.to_string(), err.to_string());
        drop(ours);
        let alert = peer.read(&mut buf).await.unwrap_err();
        (err, alert)
    }

    fn assert_alert(e: &io::Error, description: u8) {
        assert!(
            e.to_string()
                .contains(&format!("fatal alert {description} (")),
            "expected alert {description}: {e}"
        );
    }

    #[tokio::test]
    async fn an_inner_plaintext_over_2_14_bytes_is_a_record_overflow() {
        let _limit = crate::test_support::limit();
        let big = vec![b'a'; MAX_PLAINTEXT + 1];
        let (err, alert) = refused(&[(APPLICATION_DATA, &big)]).await;
        assert!(err.to_string().contains("16386 bytes, over 16385"), "{err}");
        assert_alert(&alert, RECORD_OVERFLOW);
    }

    #[tokio::test]
    async fn an_empty_handshake_record_is_an_unexpected_message() {
        let _limit = crate::test_support::limit();
        let (err, alert) = refused(&[(HANDSHAKE, &[]), (APPLICATION_DATA, b"x")]).await;
        assert!(err.to_string().contains("empty handshake record"), "{err}");
        assert_alert(&alert, UNEXPECTED_MESSAGE);
    }

    #[tokio::test]
    async fn data_between_the_fragments_of_a_handshake_message_is_an_unexpected_message() {
        let _limit = crate::test_support::limit();
        let (err, alert) = refused(&[
            (HANDSHAKE, &[NEW_SESSION_TICKET, 0, 0]),
            (APPLICATION_DATA, b"x"),
        ])
        .await;
        assert!(err.to_string().contains("between the fragments"), "{err}");
        assert_alert(&alert, UNEXPECTED_MESSAGE);
    }

    #[tokio::test]
    async fn a_key_update_with_an_unknown_request_is_an_illegal_parameter() {
        let _limit = crate::test_support::limit();
        let (err, alert) = refused(&[
            (HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 2]),
            (APPLICATION_DATA, b"x"),
        ])
        .await;
        assert!(err.to_string().contains("request_update 2"), "{err}");
        assert_alert(&alert, ILLEGAL_PARAMETER);
    }

    #[tokio::test]
    async fn at_most_32_empty_records_in_a_row_are_taken() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut peer) = server_and_raw_peer(&pki).await;
        let mut records = vec![(APPLICATION_DATA, &b""[..]); MAX_EMPTY_RECORDS.into()];
        records.push((APPLICATION_DATA, b"x"));
        send_sealed(&mut peer, &records).await;
        let mut buf = [0; 1];
        ours.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"x", "32 are allowed");
        // Data resets the count; one more than allowed is refused.
        records.insert(0, (APPLICATION_DATA, b""));
        let (err, alert) = refused(&records).await;
        assert!(
            err.to_string().contains("more than 32 empty records"),
            "{err}"
        );
        assert_alert(&alert, UNEXPECTED_MESSAGE);
    }

    #[tokio::test]
    async fn user_canceled_is_a_warning_and_the_close_notify_after_it_ends_the_stream() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut peer) = server_and_raw_peer(&pki).await;
        send_sealed(
            &mut peer,
            &[
                (ALERT, &[WARNING, USER_CANCELED]),
                (APPLICATION_DATA, b"x"),
                (ALERT, &[WARNING, CLOSE_NOTIFY]),
            ],
        )
        .await;
        let mut got = Vec::new();
        ours.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"x");
    }

    #[tokio::test]
    async fn alerts_are_judged_by_level_and_warnings_are_few() {
        let _limit = crate::test_support::limit();
        // A fatal user_canceled ends the connection; we answer no alert.
        let pki = pki();
        let (mut ours, mut peer) = server_and_raw_peer(&pki).await;
        send_sealed(
            &mut peer,
            &[(ALERT, &[FATAL, USER_CANCELED]), (APPLICATION_DATA, b"x")],
        )
        .await;
        let err = ours.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        assert_alert(&err, USER_CANCELED);

        // Five warnings: more than rustls (and BoringSSL) take.
        let warning = (ALERT, &[WARNING, USER_CANCELED][..]);
        let mut records = vec![warning; usize::from(MAX_WARNINGS) + 1];
        records.push((APPLICATION_DATA, b"x"));
        let (err, alert) = refused(&records).await;
        assert!(
            err.to_string().contains("more than 4 warning alerts"),
            "{err}"
        );
        assert_alert(&alert, UNEXPECTED_MESSAGE);

        // TLS 1.3 has no warning but user_canceled (rustls: decode_error).
        let (err, alert) = refused(&[(ALERT, &[WARNING, 42]), (APPLICATION_DATA, b"x")]).await;
        assert!(err.to_string().contains("TLS 1.3 has no warnings"), "{err}");
        assert_alert(&alert, DECODE_ERROR);

        // An alert of no known level, even a close_notify.
        let (err, alert) = refused(&[(ALERT, &[3, CLOSE_NOTIFY]), (APPLICATION_DATA, b"x")]).await;
        assert!(err.to_string().contains("unknown level 3"), "{err}");
        assert_alert(&alert, ILLEGAL_PARAMETER);

        let (err, alert) = refused(&[(ALERT, &[FATAL]), (APPLICATION_DATA, b"x")]).await;
        assert!(err.to_string().contains("malformed alert"), "{err}");
        assert_alert(&alert, DECODE_ERROR);
    }

    #[tokio::test]
    async fn a_key_update_not_requesting_one_is_followed_and_not_answered() {
        let _limit = crate::test_support::limit();
        let pki = pki();
        let (mut ours, mut peer) = server_and_raw_peer(&pki).await;
        peer.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0]).unwrap();
        peer.tx = Keys::new(peer.kernel.update_tx().unwrap(), true).unwrap();
        send_sealed(&mut peer, &[(APPLICATION_DATA, b"x")]).await;
        let mut buf = [0; 1];
        ours.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"x", "read under the peer's new key");
        ours.write_all(b"y").await.unwrap();
        ours.flush().await.unwrap();
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y", "written under our old key");
        assert_eq!(ours.key_updates_sent, 0);
    }

    #[tokio::test]
    async fn a_tls12_connection_at_its_key_limit_ends_with_close_notify() {
        let _limit = crate::test_support::limit();
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let pki = pki();
        let acceptor = acceptor_with(&pki, cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
        let (c, s) = pair().await;
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.map(|_| got)
        });
        let mut tls = connect(client_config(pki.client()), name(), c)
            .await
            .unwrap();
        tls.set_tx_limit(2);
        // The Finished took sequence number 0.
        let sealable = (2 - tls.tx.seq) as usize * MAX_PLAINTEXT;
        let data = payload(10 * MAX_PLAINTEXT);
        let err = tls.write_all(&data).await.unwrap_err();
        assert!(
            err.to_string().contains("closed with close_notify"),
            "{err}"
        );
        drop(tls);
        // An orderly end for rustls, after the records the key could seal.
        let got = server
            .await
            .unwrap()
            .expect("close_notify, not a truncation");
        assert!(got == data[..sealable], "{} bytes", got.len());
    }

    /// An upper bound (within what it holds) of `buf`'s allocation: what it
    /// holds can sit at the end of it, out of `capacity`'s sight.
    fn allocation(buf: &mut BytesMut) -> usize {
        // Moves what is held to the front when the room before it allows.
        let _ = buf.try_reclaim(buf.capacity() - buf.len() + 1);
        buf.capacity() + buf.len()
    }

    #[tokio::test]
    async fn a_peer_trickling_a_record_holds_one_record_of_buffer() {
        let _limit = crate::test_support::limit();
        use std::io::Write as _;
        let pki = pki();
        let (mut ours, theirs) = server_with_rustls_client(&pki).await;
        let (mut raw, mut conn) = theirs.into_inner();
        let mut seal = |data: &[u8]| {
            let mut out = Vec::new();
            for chunk in data.chunks(MAX_PLAINTEXT) {
                conn.writer().write_all(chunk).unwrap();
                while conn.wants_write() {
                    conn.write_tls(&mut out).unwrap();
                }
            }
            out
        };
        // Bulk data, which our reads grow to READ_BIG for, then the start
        // of one more record: the server waits for its rest.
        let bulk = payload(2 << 20);
        let mut bytes = seal(&bulk);
        let tail_plain = payload(MAX_PLAINTEXT + 7)[7..].to_vec();
        let tail = seal(&tail_plain);
        bytes.extend_from_slice(&tail[..100]);
        let mut got = vec![0; bulk.len()];
        let (written, read) = tokio::join!(raw.write_all(&bytes), ours.read_exact(&mut got));
        written.unwrap();
        read.unwrap();
        assert!(got == bulk);
        // The rest, a byte at a time: each is read, and waits in little memory.
        let mut largest = 0;
        for (at, byte) in tail.iter().enumerate().take(140).skip(100) {
            raw.write_all(&[*byte]).await.unwrap();
            let held = crate::test_support::wait_until(
                "the server to read the byte",
                crate::test_support::WAIT,
                || {
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    let mut one = [0; 1];
                    let polled =
                        Pin::new(&mut ours).poll_read(&mut cx, &mut ReadBuf::new(&mut one));
                    let seen = (
                        polled.is_pending(),
                        ours.inbuf.len(),
                        allocation(&mut ours.inbuf),
                    );
                    async move {
                        match seen {
                            (true, len, held) if len == at + 1 => Ok(held),
                            other => Err(format!("(waiting, held, allocated): {other:?}")),
                        }
                    }
                },
            )
            .await;
            largest = largest.max(held);
        }
        assert!(
            largest <= 2 * READ_SMALL,
            "{largest} bytes held for a partial record"
        );
        // And what was held is intact.
        raw.write_all(&tail[140..]).await.unwrap();
        let mut got = vec![0; tail_plain.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert!(got == tail_plain);
    }

    #[test]
    fn the_fuzz_entry_opens_what_it_seals_and_refuses_as_connections_do() {
        let (key, iv) = ([7; 32], [9; 12]);
        let mut wire = Vec::new();
        wire.extend(fuzz::seal(key, iv, true, 0, APPLICATION_DATA, b"one ", 0));
        wire.extend(fuzz::seal(
            key,
            iv,
            true,
            1,
            HANDSHAKE,
            &[KEY_UPDATE, 0, 0, 1, 1],
            3,
        ));
        // After a KeyUpdate the fixed schedule keeps the key, from sequence 0.
        wire.extend(fuzz::seal(key, iv, true, 0, APPLICATION_DATA, b"two", 100));
        assert_eq!(
            fuzz::open(key, iv, true, &wire),
            (b"one two".to_vec(), None)
        );
        let cut = &wire[..wire.len() - 1];
        assert_eq!(fuzz::open(key, iv, true, cut), (b"one ".to_vec(), None));

        let big = vec![1; MAX_PLAINTEXT + 1];
        let (data, why) = fuzz::open(key, iv, true, &fuzz::seal(key, iv, true, 0, 23, &big, 0));
        assert!(data.is_empty());
        assert!(why.unwrap().starts_with("alert 22 (record_overflow)"));

        // TLS 1.2 framing: explicit nonce, outer type.
        let mut wire = fuzz::seal(key, iv, false, 0, APPLICATION_DATA, b"data", 0);
        wire.extend(fuzz::seal(
            key,
            iv,
            false,
            1,
            ALERT,
            &[WARNING, CLOSE_NOTIFY],
            0,
        ));
        wire.extend(fuzz::seal(key, iv, false, 2, APPLICATION_DATA, b"after", 0));
        assert_eq!(fuzz::open(key, iv, false, &wire), (b"data".to_vec(), None));
        let (_, why) = fuzz::open([8; 32], iv, false, &wire);
        assert!(why.unwrap().starts_with("alert 20 (bad_record_mac)"));
    }
}
