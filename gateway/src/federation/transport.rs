//! mTLS transport for the Hamlet API: the accept loop that terminates TLS for
//! our `DiscoveryService` (handshakes run concurrently, bounded by a timeout,
//! so one slow client never stalls another) and the connector a consumer
//! uses to dial a peer. Peer identity is read from the verified client
//! certificate and handed to the gRPC handlers as a request extension.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use elsinore_certs::SpiffeId;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

// How long a peer may take to complete the TLS handshake: with the other
// defaults and fixed settings.
use crate::config::defaults::FEDERATION_HANDSHAKE_TIMEOUT as HANDSHAKE_TIMEOUT;

/// What the federation handlers know about the caller: its address and the
/// SPIFFE ID from its verified certificate.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub remote: SocketAddr,
    pub spiffe_id: Result<SpiffeId, String>,
    /// The certificate chain the client presented, as its handshake
    /// verified it: a bundle an owner that dialed us publishes is judged
    /// against it (`credentials::learned`).
    pub chain: Arc<[rustls::pki_types::CertificateDer<'static>]>,
}

/// A TLS-terminated connection that exposes [`PeerConn`] to tonic.
pub struct MtlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerConn,
    /// The connection's slot under the listener's cap, held until tonic
    /// drops the connection.
    _slot: elsinore_transport::accept::Permit,
}

impl Connected for MtlsConn {
    type ConnectInfo = PeerConn;
    fn connect_info(&self) -> PeerConn {
        self.info.clone()
    }
}

impl AsyncRead for MtlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes, yielding
/// authenticated connections on the returned channel until `shutdown`.
/// Handshake failures (no certificate, wrong CA, wrong trust domain) are
/// logged with the client address and never reach the gRPC layer. At most
/// `max_connections` connections (in their handshake or open) are held at
/// once; more are closed on accept, so a flood of connections that never
/// finish a handshake cannot start unbounded tasks and exhaust descriptors.
pub fn accept_mtls(
    listener: TcpListener,
    credentials: Arc<crate::credentials::Credentials>,
    max_connections: usize,
    shutdown: CancellationToken,
) -> (
    mpsc::Receiver<Result<MtlsConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    use elsinore_transport::accept;
    let (tx, rx) = mpsc::channel(64);
    let connections = accept::Connections::new(max_connections);
    let hooks = accept::Hooks::default().on_refused(move |remote| {
        tracing::warn!(
            client.addr = %remote,
            max_connections,
            "federation connection refused: connection limit reached"
        );
    });
    let settings = accept::Settings::new("federation listener");
    let task = tokio::spawn(accept::serve(
        listener,
        settings,
        connections,
        shutdown,
        hooks,
        move |tcp, remote, slot| {
            let _ = tcp.set_nodelay(true);
            // The material published now: a rotation reaches the next handshake.
            let acceptor = TlsAcceptor::from(Arc::clone(&credentials.current().federation_server));
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let presented = tls.get_ref().1.peer_certificates();
                        let spiffe_id =
                            elsinore_certs::peer_spiffe_id(presented).map_err(|e| e.to_string());
                        let chain = presented
                            .unwrap_or_default()
                            .iter()
                            .map(|c| c.clone().into_owned())
                            .collect();
                        let conn = MtlsConn {
                            inner: tls,
                            info: PeerConn {
                                remote,
                                spiffe_id,
                                chain,
                            },
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(client.addr = %remote, %error, "federation TLS handshake refused");
                    }
                    Err(_) => {
                        tracing::warn!(client.addr = %remote, "federation TLS handshake timed out");
                    }
                }
            });
        },
    ));
    (rx, task)
}

/// Dials `host:port` (a name is resolved by [`crate::dns::resolver`],
/// each address tried in turn) and runs the
/// TLS client handshake with `config`, which verifies the peer by its trust
/// bundle and SPIFFE ID (the DNS name is not what authenticates a peer).
pub async fn dial_mtls(
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error> {
    // Peer addresses given as names go through the gateway's resolver.
    let tcp = crate::dns::resolver::connect(host, port, None).await?;
    let _ = tcp.set_nodelay(true);
    let server_name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::from(std::net::Ipv4Addr::LOCALHOST));
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(TokioIo::new(tls))
}

/// Where [`connect_channel`] keeps the chain the peer presented.
pub type ChainSlot = Arc<std::sync::Mutex<Option<Vec<rustls::pki_types::CertificateDer<'static>>>>>;

/// The certificate chain the server presented on a connection made by
/// [`dial_mtls`] (verified by its handshake).
fn server_chain(
    io: &TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs = io.inner().get_ref().1.peer_certificates()?;
    Some(certs.iter().map(|c| c.clone().into_owned()).collect())
}

/// An HTTP/2 channel to a peer's federation listener at `address`: every
/// connection tonic makes is a fresh mTLS dial with the material published
/// at that moment for `peer` (a rotation reaches the next dial). Both
/// directions dial through it: our consumer for the usual stream, our owner
/// for a peer configured `dial: owner`. With `chain`, the certificate chain
/// the peer presented on the last dial is kept there (a bundle the peer
/// publishes is judged against it: `credentials::learned`).
pub async fn connect_channel(
    credentials: Arc<crate::credentials::Credentials>,
    peer: &str,
    address: &crate::config::HostPort,
    chain: Option<ChainSlot>,
) -> Result<tonic::transport::Channel, tonic::Status> {
    let shown = address.to_string();
    let peer = peer.to_owned();
    let target = address.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let target = target.clone();
        let chain = chain.clone();
        let config = credentials.current().federation_clients.get(&peer).cloned();
        async move {
            let config = config.ok_or_else(|| io::Error::other("no trust bundle for this peer"))?;
            let io = dial_mtls(&target.host, target.port, config).await?;
            if let Some(slot) = chain
                && let Ok(mut slot) = slot.lock()
            {
                *slot = server_chain(&io);
            }
            Ok::<_, io::Error>(io)
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{shown}"))
        .map_err(|e| tonic::Status::invalid_argument(format!("peer address {shown}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("dial {shown}: {}", error_chain(&e))))
}

/// An error with its sources, for one log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn credentials() -> Arc<crate::credentials::Credentials> {
        let ours: TrustDomain = "mesh-a.example".parse().unwrap();
        let theirs: TrustDomain = "mesh-b.example".parse().unwrap();
        let ca = Ca::new(&ours).unwrap();
        let peer_ca = Ca::new(&theirs).unwrap();
        let issued = ca.issue(&SpiffeId::gateway(ours), &[], &[]).unwrap();
        let identity =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let bundle = TrustBundle::from_pem(theirs, peer_ca.cert_pem().as_bytes()).unwrap();
        let bundles = HashMap::from([("mesh-b".to_owned(), bundle)]);
        Arc::new(crate::credentials::Credentials::fixed(identity, bundles).unwrap())
    }

    /// Connections that never start their handshake used to get a task each,
    /// without bound; over the cap one is now closed at once instead of
    /// being held for the handshake timeout.
    #[tokio::test]
    async fn connections_over_the_cap_are_closed_on_accept() {
        let _limit = crate::test_support::limit();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let (_incoming, task) = accept_mtls(listener, credentials(), 2, shutdown.clone());

        // Two silent clients take both slots for their handshakes.
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        // Well under HANDSHAKE_TIMEOUT: without the cap the server would
        // wait that long for this client's ClientHello.
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, over.read(&mut [0u8; 1])).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the third connection must be closed at once, got {read:?}"
        );
        shutdown.cancel();
        task.await.unwrap();
    }
}
