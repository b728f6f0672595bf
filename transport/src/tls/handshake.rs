//! The handshake: rustls's unbuffered connection runs it over the socket,
//! one record at a time, and hands the traffic secrets and what it read past
//! its last record to a new [`TlsStream`]. Also the certificate resolver
//! that records the client's SNI, which the unbuffered server does not expose.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rustls::ProtocolVersion;
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

thread_local! {
    /// The SNI of the ClientHello rustls last handled on this thread. The
    /// unbuffered server connection does not expose it, but rustls hands it
    /// to the certificate resolver (for every ClientHello, resumed or not),
    /// synchronously inside `process_tls_records`: the handshake takes it
    /// right after that call, before anything else can run on the thread.
    static LAST_SNI: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[derive(Debug)]
pub(super) struct RecordSni(pub(super) Arc<dyn ResolvesServerCert>);

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

pub(super) fn is_tls13(version: Option<ProtocolVersion>) -> io::Result<bool> {
    match version {
        Some(ProtocolVersion::TLSv1_3) => Ok(true),
        Some(ProtocolVersion::TLSv1_2) => Ok(false),
        other => Err(protocol(&format!(
            "the handshake settled on {other:?}, which the data plane does not speak"
        ))),
    }
}

/// What the handshake leaves to the record layer, besides the secrets.
pub(super) struct Leftover {
    /// Bytes read past the handshake, not yet processed.
    pub(super) inbuf: BytesMut,
    /// Application data rustls already decrypted: a client may send it
    /// with its Finished.
    pub(super) early: Vec<u8>,
    /// The peer's close_notify came with it.
    pub(super) peer_closed: bool,
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
///
/// Long because it is the one loop over rustls's unbuffered states, each
/// of which (read more, encode, transmit, done) must be handled in place.
pub(super) async fn drive<C, D>(
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
pub(super) fn record_end(buf: &[u8], from: usize) -> Option<usize> {
    let [_, _, _, hi, lo] = *buf.get(from..from + HEADER)? else {
        return None;
    };
    let end = from + HEADER + usize::from(u16::from_be_bytes([hi, lo]));
    (end <= buf.len()).then_some(end)
}

/// Appends one handshake record rustls has for us to `out`.
pub(super) fn encode(
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
    pub(super) fn new(
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
}
