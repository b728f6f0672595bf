#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;

use bytes::Buf;
use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
use rustls::HandshakeKind;
use rustls::ProtocolVersion;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::poll_fn;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
        (*elsinore_certs::client_config(&self.client, &self.server_bundle, None, &[b"h2"]).unwrap())
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
async fn our_client_to_a_rustls_echo() -> (TlsStream, tokio::task::JoinHandle<io::Result<u64>>) {
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
    let mut client = rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
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
    let mut client = rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
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
    let mut client = rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
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
    let mut client = rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
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
    let mut client = rustls::ClientConnection::new(client_config(pki.client()), name()).unwrap();
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
    let short = Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
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
async fn rustls_error(raw: &mut TcpStream, conn: &mut rustls::ClientConnection) -> rustls::Error {
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
                let polled = Pin::new(&mut ours).poll_read(&mut cx, &mut ReadBuf::new(&mut one));
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
