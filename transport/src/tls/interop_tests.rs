//! The record layer against independent TLS implementations, each a real
//! process or library on loopback: OpenSSL's `s_client` and `s_server`,
//! Python's `ssl` module (OpenSSL again, through another driver) and
//! tokio-rustls; Envoy (BoringSSL) is covered end to end by
//! `tests/tests/envoy_interop.rs`. Each case moves a few hundred KiB both
//! ways and compares them byte for byte: a record sealed or opened wrongly
//! by either side shows as an error or a difference.
//!
//! The peers here present or ask for no client certificate: the record
//! layer does not need mTLS (the gateway requires it, in its configs).
//! OpenSSL and Python must be on `PATH`; under `CI=true` a missing one is a
//! failure (`.ci/run` installs them), elsewhere each test says loudly that
//! it skipped.
//!
//! Also here: the differential test against rustls's own record
//! protection, at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elsinore_certs::{Ca, SpiffeId, TrustDomain};
use rustls::SupportedCipherSuite;
use rustls::crypto::aws_lc_rs::{cipher_suite as cs, kx_group};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{Accepted, TlsStream, accept, client_config, connect, server_config};
use crate::test_support::{WAIT, limit, wait_until};

/// Bytes each case sends each way: many full records and a partial one.
const BULK: usize = 300 * 1024 + 77;

/// Every suite the data plane's configs allow, with OpenSSL's name for it.
/// The certificate is ECDSA, so the TLS 1.2 suites are the ECDSA ones.
const SUITES: [(SupportedCipherSuite, &str); 6] = [
    (cs::TLS13_AES_128_GCM_SHA256, "TLS_AES_128_GCM_SHA256"),
    (cs::TLS13_AES_256_GCM_SHA384, "TLS_AES_256_GCM_SHA384"),
    (
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS_CHACHA20_POLY1305_SHA256",
    ),
    (
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    ),
    (
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    ),
    (
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ),
];

fn version_name(suite: SupportedCipherSuite) -> &'static str {
    match suite {
        SupportedCipherSuite::Tls13(_) => "TLSv1.3",
        SupportedCipherSuite::Tls12(_) => "TLSv1.2",
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Whether `program` runs (`args` asks its version). Missing: a failure
/// under CI, a loud skip elsewhere.
fn have(program: &str, args: &[&str], install: &str) -> bool {
    let found = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let msg = format!("`{program}` is not on PATH; {install} (.ci/run does)");
        assert!(!in_ci(), "CI=true and {msg}");
        eprintln!(
            "\n*** SKIPPING INTEROP TEST (it passes WITHOUT testing anything): {msg}\n\
             *** With CI=true this is a failure.\n"
        );
    }
    found
}

fn openssl() -> bool {
    have(
        "openssl",
        &["version"],
        "install it with `apt-get install openssl`",
    )
}

fn python() -> bool {
    have(
        "python3",
        &["-c", "import ssl"],
        "install it with `apt-get install python3`",
    )
}

/// A CA and a server certificate for `localhost` and 127.0.0.1, as files
/// for the other processes and as DER for rustls.
pub(super) struct Pki {
    _dir: tempfile::TempDir,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
    roots: rustls::RootCertStore,
}

pub(super) fn pki() -> Pki {
    let td: TrustDomain = "interop.example".parse().unwrap();
    let ca = Ca::new(&td).unwrap();
    let id: SpiffeId = "spiffe://interop.example/peer".parse().unwrap();
    let issued = ca
        .issue(
            &id,
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_path = write("ca.pem", &ca.cert_pem());
    let cert = write("cert.pem", &issued.cert_pem);
    let key = write("key.pem", &issued.key_pem);
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    Pki {
        _dir: dir,
        ca: ca_path,
        cert,
        key,
        chain,
        key_pem: issued.key_pem,
        roots,
    }
}

/// The provider restricted to `suite` (all when `None`) and `groups`.
fn provider(
    suite: Option<SupportedCipherSuite>,
    groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
) -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    if let Some(groups) = groups {
        provider.kx_groups = groups;
    }
    Arc::new(provider)
}

fn versions(suite: Option<SupportedCipherSuite>) -> Vec<&'static rustls::SupportedProtocolVersion> {
    match suite {
        Some(suite) => vec![suite.version()],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    }
}

impl Pki {
    /// A rustls server config speaking only `suite` (all when `None`),
    /// without client authentication.
    pub(super) fn server_with(
        &self,
        suite: Option<SupportedCipherSuite>,
        groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
    ) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(provider(suite, groups))
            .with_protocol_versions(&versions(suite))
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap(),
            )
            .unwrap()
    }

    /// A rustls client config trusting our CA, offering only `suite` (all
    /// when `None`), without a client certificate.
    pub(super) fn client_with(
        &self,
        suite: Option<SupportedCipherSuite>,
        groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
    ) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider(suite, groups))
            .with_protocol_versions(&versions(suite))
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth()
    }
}

pub(super) fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Printable bytes (lowercase hex digits and newlines) that never start a
/// command of `s_client` or `s_server` (`Q`, `R`, `K`, `k`...), with no two
/// lines alike, so a lost, repeated or reordered chunk shows.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 80);
    let mut line = 0u64;
    while out.len() < len {
        let word = seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(line.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        writeln!(out, "{line:08x} {word:016x}{:040x}", u128::from(word) << 17).unwrap();
        line += 1;
    }
    out.truncate(len);
    out
}

/// A process under test: its standard input fed by a thread (so a full pipe
/// never blocks the runtime our side of the connection runs on), its
/// output and error collected by two more. Killed when dropped.
struct Peer {
    what: String,
    child: Child,
    stdin: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl Peer {
    fn spawn(program: &str, args: &[&str]) -> Peer {
        let what = format!("{program} {}", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{what}`: {e}"));
        let mut stdin = child.stdin.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for chunk in rx {
                if stdin
                    .write_all(&chunk)
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        let collect = |mut from: Box<dyn std::io::Read + Send>| {
            let into = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&into);
            std::thread::spawn(move || {
                let mut buf = [0; 64 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            into
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Peer {
            what,
            child,
            stdin: Some(tx),
            out,
            err,
        }
    }

    fn send(&self, bytes: &[u8]) {
        let stdin = self.stdin.as_ref().expect("standard input already closed");
        stdin.send(bytes.to_vec()).unwrap();
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn out(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the standard output holds at least `len` bytes.
    async fn wait_out(&self, len: usize) -> Vec<u8> {
        wait_until(&format!("{len} bytes from `{}`", self.what), WAIT, || {
            let out = self.out();
            let ready = out.len() >= len;
            async move {
                if ready {
                    Ok(out)
                } else {
                    Err(format!(
                        "{} bytes so far; stderr: {}",
                        out.len(),
                        self.err()
                    ))
                }
            }
        })
        .await
    }

    /// Waits for the process to exit.
    async fn exit(&mut self) -> ExitStatus {
        let what = self.what.clone();
        let child = &mut self.child;
        let err = &self.err;
        wait_until(&format!("`{what}` to exit"), WAIT, || {
            let status = child.try_wait().unwrap();
            let stderr = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
            async move { status.ok_or(format!("still running; stderr: {stderr}")) }
        })
        .await
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What our server saw of one connection.
#[derive(Debug)]
struct Served {
    echoed: u64,
    accepted: Accepted,
    key_updates_sent: u64,
}

/// Reads until the peer's close_notify, writing back what it read, then
/// closes.
async fn echo(tls: &mut TlsStream) -> std::io::Result<u64> {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0;
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    tls.shutdown().await?;
    Ok(total)
}

/// Our record layer serving `connections` connections, one after the
/// other, each an echo. `tx_limit` makes it replace its own key that often.
async fn our_server(
    config: rustls::ServerConfig,
    tx_limit: Option<u64>,
    connections: usize,
) -> (SocketAddr, JoinHandle<Vec<Served>>) {
    let config = server_config(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut served = Vec::new();
        for _ in 0..connections {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut tls, accepted) = accept(Arc::clone(&config), tcp)
                .await
                .unwrap_or_else(|e| panic!("our server's handshake: {e}"));
            if let Some(records) = tx_limit {
                tls.set_tx_limit(records);
            }
            let echoed = echo(&mut tls)
                .await
                .unwrap_or_else(|e| panic!("our server's echo: {e}"));
            served.push(Served {
                echoed,
                accepted,
                key_updates_sent: tls.key_updates_sent,
            });
        }
        served
    });
    (addr, server)
}

async fn our_client(config: rustls::ClientConfig, addr: SocketAddr) -> TlsStream {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connect(client_config(config), localhost(), tcp)
        .await
        .unwrap_or_else(|e| panic!("our client's handshake with {addr}: {e}"))
}

/// `openssl s_client` to `addr`, trusting our CA, with `extra` flags.
fn s_client(pki: &Pki, addr: SocketAddr, extra: &[&str]) -> Peer {
    let connect = addr.to_string();
    let ca = pki.ca.to_str().unwrap();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-CAfile",
        ca,
        "-verify_return_error",
    ];
    args.extend_from_slice(extra);
    Peer::spawn("openssl", &args)
}

/// `openssl s_server` with our certificate and `extra` flags, listening.
async fn s_server(pki: &Pki, extra: &[&str]) -> (Peer, SocketAddr) {
    // In -brief mode s_server does not print where it listens: learn a
    // free port by binding it, and hand it over. Another test may take the
    // port in between: then s_server exits, and we try another.
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let accept = format!("127.0.0.1:{port}");
        let mut args = vec![
            "s_server",
            "-accept",
            &accept,
            "-cert",
            pki.cert.to_str().unwrap(),
            "-key",
            pki.key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut peer = Peer::spawn("openssl", &args);
        // Not by connecting: that would use up one of its -naccept.
        let started = wait_until(&format!("`{}` to listen", peer.what), WAIT, || {
            let exited = peer.child.try_wait().unwrap();
            let listening = listening(port);
            async move {
                match (exited, listening) {
                    (Some(_), _) => Ok(false),
                    (None, true) => Ok(true),
                    (None, false) => Err("not listening yet".to_owned()),
                }
            }
        })
        .await;
        if started {
            return (peer, SocketAddr::from(([127, 0, 0, 1], port)));
        }
        eprintln!("`{}` exited at start: {}", peer.what, peer.err());
    }
    panic!("openssl s_server did not start three times; see above");
}

/// Whether a socket listens on 127.0.0.1:`port` (Linux's /proc/net/tcp:
/// local address `0100007F:PORT`, state `0A`).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
    })
}

/// Counts the lines of `-msg` output in `file` that show a `direction`
/// (`<<<` received, `>>>` sent) handshake message named `name`.
fn handshake_messages(file: &std::path::Path, direction: &str, name: &str) -> usize {
    let log = std::fs::read_to_string(file).unwrap_or_default();
    log.lines()
        .filter(|l| l.starts_with(direction) && l.contains("Handshake") && l.ends_with(name))
        .count()
}

/// s_client → our server: sends `data`, waits for all of it back, closes.
async fn s_client_echo(client: &mut Peer, data: &[u8]) {
    client.send(data);
    let echoed = client.wait_out(data.len()).await;
    assert!(
        echoed == data,
        "`{}` got back {} bytes that differ from the {} it sent",
        client.what,
        echoed.len(),
        data.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_and_our_server_in_every_suite() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    for (i, (suite, name)) in SUITES.into_iter().enumerate() {
        let (addr, server) = our_server(pki.server_with(Some(suite), None), None, 1).await;
        let mut client = s_client(&pki, addr, &["-brief"]);
        let data = text(BULK, i as u64);
        s_client_echo(&mut client, &data).await;
        client.close_stdin();
        let status = client.exit().await;
        let served = server.await.unwrap();
        let stderr = client.err();
        assert!(status.success(), "{name}: s_client failed: {stderr}");
        assert!(
            stderr.contains(&format!("Ciphersuite: {name}"))
                && stderr.contains(&format!("Protocol version: {}", version_name(suite))),
            "{name}: s_client negotiated something else: {stderr}"
        );
        assert_eq!(served[0].echoed, data.len() as u64, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_and_openssl_s_server_in_every_suite() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    for (i, (suite, name)) in SUITES.into_iter().enumerate() {
        // -brief: standard input and output carry only application data.
        let (mut server, addr) = s_server(&pki, &["-brief", "-naccept", "1"]).await;
        let mut tls = our_client(pki.client_with(Some(suite), None), addr).await;
        let up = text(BULK, 2 * i as u64);
        let down = text(BULK, 2 * i as u64 + 1);
        tls.write_all(&up).await.unwrap();
        tls.flush().await.unwrap();
        let got = server.wait_out(up.len()).await;
        assert!(got == up, "{name}: s_server received something else");
        server.send(&down);
        let mut got = vec![0; down.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert!(got == down, "{name}: our client received something else");
        tls.shutdown().await.unwrap();
        let status = server.exit().await;
        let stderr = server.err();
        assert!(status.success(), "{name}: s_server failed: {stderr}");
        assert!(
            stderr.contains(&format!("Ciphersuite: {name}"))
                && stderr.contains(&format!("Protocol version: {}", version_name(suite))),
            "{name}: s_server negotiated something else: {stderr}"
        );
    }
}

/// Both directions: s_client asks our server for new keys (`K`: update
/// requested, which our server must answer; `k`: not requested), and our
/// server replaces its own key every few records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_and_our_server_update_keys_both_ways() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    let (addr, server) = our_server(pki.server_with(None, None), Some(5), 1).await;
    let msgs = tempfile::NamedTempFile::new().unwrap();
    let msgfile = msgs.path().to_str().unwrap();
    let mut client = s_client(&pki, addr, &["-brief", "-msg", "-msgfile", msgfile]);
    let mut sent = Vec::new();
    for (round, command) in ["K\n", "k\n", "K\n"].into_iter().enumerate() {
        let data = text(64 * 1024 + round, round as u64);
        sent.extend_from_slice(&data);
        client.send(&data);
        client.wait_out(sent.len()).await;
        client.send(command.as_bytes());
        wait_until("s_client to send its KeyUpdate", WAIT, || {
            let n = handshake_messages(msgs.path(), ">>>", "KeyUpdate");
            async move { (n > round).then_some(()).ok_or(format!("{n} sent")) }
        })
        .await;
    }
    let last = text(100 * 1024, 9);
    sent.extend_from_slice(&last);
    client.send(&last);
    let echoed = client.wait_out(sent.len()).await;
    assert!(echoed == sent, "the echo differs across key updates");
    client.close_stdin();
    assert!(client.exit().await.success(), "{}", client.err());
    let served = server.await.unwrap();
    // Ours: every five records, plus one answer per `K`.
    let ours = handshake_messages(msgs.path(), "<<<", "KeyUpdate") as u64;
    assert_eq!(ours, served[0].key_updates_sent);
    assert!(
        ours >= (sent.len() / (5 * 16 * 1024)) as u64 + 2,
        "our server sent only {ours} KeyUpdates"
    );
}

/// Both directions from the other side: s_server asks our client for new
/// keys (its `K` command, which needs its verbose mode), and our client
/// replaces its own key every few records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_and_openssl_s_server_update_keys_both_ways() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    let msgs = tempfile::NamedTempFile::new().unwrap();
    let msgfile = msgs.path().to_str().unwrap();
    let (mut server, addr) = s_server(
        &pki,
        &["-naccept", "1", "-tls1_3", "-msg", "-msgfile", msgfile],
    )
    .await;
    let mut tls = our_client(pki.client_with(None, None), addr).await;
    tls.set_tx_limit(3);
    let up = text(200 * 1024, 1);
    tls.write_all(&up).await.unwrap();
    tls.flush().await.unwrap();
    // Verbose s_server prints session details before the data, and a line
    // where a read ended in a KeyUpdate: find the data in what is left.
    let printed =
        |server: &Peer| String::from_utf8_lossy(&server.out()).replace("Read BLOCK\n", "");
    wait_until("s_server to print what our client sent", WAIT, || {
        let found = printed(&server).contains(std::str::from_utf8(&up).unwrap());
        async move { found.then_some(()).ok_or("not yet".to_owned()) }
    })
    .await;
    for round in 0..2 {
        let before = tls.key_updates_sent;
        server.send(b"K\n");
        wait_until("s_server to send its KeyUpdate", WAIT, || {
            let n = handshake_messages(msgs.path(), ">>>", "KeyUpdate");
            async move { (n > round).then_some(()).ok_or(format!("{n} sent")) }
        })
        .await;
        let down = text(4096, 10 + round as u64);
        server.send(&down);
        let mut got = vec![0; down.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert!(
            got == down,
            "our client read something else after a KeyUpdate"
        );
        // Reading the request queued our answer (RFC 8446 §4.6.3: before
        // our next application data; checked below).
        assert_eq!(
            tls.key_updates_sent,
            before + 1,
            "the request was not answered"
        );
    }
    // Written under the newest key, read back by s_server.
    let more = text(50 * 1024, 20);
    tls.write_all(&more).await.unwrap();
    tls.flush().await.unwrap();
    wait_until("s_server to print the last data", WAIT, || {
        let found = printed(&server).contains(std::str::from_utf8(&more).unwrap());
        async move { found.then_some(()).ok_or("not yet".to_owned()) }
    })
    .await;
    tls.shutdown().await.unwrap();
    let answered = tls.key_updates_sent;
    assert!(server.exit().await.success(), "{}", server.err());
    assert_eq!(
        handshake_messages(msgs.path(), "<<<", "KeyUpdate") as u64,
        answered,
        "s_server did not see every KeyUpdate our client sent"
    );
    assert!(
        answered >= (up.len() / (3 * 16 * 1024)) as u64 + 2,
        "our client sent only {answered} KeyUpdates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_resumes_with_our_server() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    let (addr, server) = our_server(pki.server_with(None, None), None, 2).await;
    let session = tempfile::NamedTempFile::new().unwrap();
    let file = session.path().to_str().unwrap();
    for (round, flag) in ["-sess_out", "-sess_in"].into_iter().enumerate() {
        let mut client = s_client(&pki, addr, &["-tls1_3", flag, file]);
        let data = text(1000, round as u64);
        client.send(&data);
        wait_until("the echo", WAIT, || {
            let out = client.out();
            let found = out.windows(data.len()).any(|w| w == data);
            async move { found.then_some(()).ok_or("not yet".to_owned()) }
        })
        .await;
        client.close_stdin();
        assert!(client.exit().await.success(), "{}", client.err());
        let out = String::from_utf8_lossy(&client.out()).into_owned();
        let expected = if round == 0 {
            "New, TLSv1.3"
        } else {
            "Reused, TLSv1.3"
        };
        assert!(out.contains(expected), "s_client printed: {out}");
    }
    let served = server.await.unwrap();
    assert!(!served[0].accepted.resumed && served[1].accepted.resumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_resumes_with_openssl_s_server() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    let (mut server, addr) = s_server(&pki, &["-naccept", "2", "-tls1_3"]).await;
    let config = client_config(pki.client_with(None, None));
    for round in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connect(Arc::clone(&config), localhost(), tcp)
            .await
            .unwrap();
        // The tickets come after the handshake: read something to get them.
        let down = text(100, round);
        server.send(&down);
        let mut got = vec![0; down.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(got, down);
        // s_server takes the next connection once this one is closed.
        tls.shutdown().await.unwrap();
    }
    assert!(server.exit().await.success(), "{}", server.err());
    let out = String::from_utf8_lossy(&server.out()).into_owned();
    assert_eq!(out.matches("Reused session-id").count(), 1, "{out}");
}

/// A HelloRetryRequest each way: the client's only key share is for a group
/// the server does not take, so the server asks for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_retry_requests_with_openssl_both_ways() {
    let _limit = limit();
    if !openssl() {
        return;
    }
    let pki = pki();
    // s_client sends a key share for its first group only (P-384), which
    // our server does not offer.
    let groups = vec![kx_group::X25519, kx_group::SECP256R1];
    let (addr, server) = our_server(pki.server_with(None, Some(groups)), None, 1).await;
    let msgs = tempfile::NamedTempFile::new().unwrap();
    let msgfile = msgs.path().to_str().unwrap();
    let mut client = s_client(
        &pki,
        addr,
        &[
            "-brief",
            "-groups",
            "P-384:X25519",
            "-msg",
            "-msgfile",
            msgfile,
        ],
    );
    let data = text(BULK, 3);
    s_client_echo(&mut client, &data).await;
    client.close_stdin();
    assert!(client.exit().await.success(), "{}", client.err());
    assert_eq!(server.await.unwrap()[0].echoed, data.len() as u64);
    assert_eq!(
        handshake_messages(msgs.path(), ">>>", "ClientHello"),
        2,
        "no HelloRetryRequest: s_client sent one ClientHello"
    );
    assert!(
        client.err().contains("Server Temp Key: X25519"),
        "{}",
        client.err()
    );

    // Our client's key shares (X25519MLKEM768 and X25519) are for groups
    // s_server does not take.
    let msgs = tempfile::NamedTempFile::new().unwrap();
    let msgfile = msgs.path().to_str().unwrap();
    let (mut server, addr) = s_server(
        &pki,
        &[
            "-brief", "-naccept", "1", "-groups", "P-256", "-msg", "-msgfile", msgfile,
        ],
    )
    .await;
    let mut tls = our_client(pki.client_with(None, None), addr).await;
    let up = text(BULK, 4);
    tls.write_all(&up).await.unwrap();
    tls.flush().await.unwrap();
    assert!(server.wait_out(up.len()).await == up);
    let down = text(BULK, 5);
    server.send(&down);
    let mut got = vec![0; down.len()];
    tls.read_exact(&mut got).await.unwrap();
    assert!(got == down);
    tls.shutdown().await.unwrap();
    assert!(server.exit().await.success(), "{}", server.err());
    assert_eq!(
        handshake_messages(msgs.path(), "<<<", "ClientHello"),
        2,
        "no HelloRetryRequest: s_server saw one ClientHello"
    );
}

/// Python's `ssl` as a client: writes in 16 KiB steps and reads each back
/// (lock-step, so neither side's socket buffer can fill), then closes with
/// close_notify and waits for ours.
const PY_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, version, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
data = bytes((i * 7 + i // 251) % 256 for i in range(n))
got = bytearray()
with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        for at in range(0, n, 16384):
            s.sendall(data[at:at + 16384])
            while len(got) < min(at + 16384, n):
                chunk = s.recv(65536)
                if not chunk:
                    sys.exit("EOF before the echo was complete")
                got += chunk
        summary = f"{s.version()} {s.cipher()[0]}"
        s.unwrap()
        print(summary)
sys.exit(0 if bytes(got) == data else "the echo differs")
"#;

/// Python's `ssl` as a server for one connection: prints its port, echoes
/// until close_notify, answers it.
const PY_SERVER: &str = r#"
import socket, ssl, sys
cert, key, version, ciphers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
if ciphers:
    ctx.set_ciphers(ciphers)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.settimeout(30)
total = 0
with ctx.wrap_socket(conn, server_side=True) as s:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        s.sendall(chunk)
        total += len(chunk)
    summary = f"{total} {s.version()} {s.cipher()[0]}"
    s.unwrap()
    print(summary, flush=True)
"#;

fn python_version(suite: SupportedCipherSuite) -> &'static str {
    match suite {
        SupportedCipherSuite::Tls13(_) => "TLSv1_3",
        SupportedCipherSuite::Tls12(_) => "TLSv1_2",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_client_and_our_server_in_every_suite() {
    let _limit = limit();
    if !python() {
        return;
    }
    let pki = pki();
    for (suite, name) in SUITES {
        let (addr, server) = our_server(pki.server_with(Some(suite), None), None, 1).await;
        let port = addr.port().to_string();
        let len = BULK.to_string();
        let ca = pki.ca.to_str().unwrap();
        let mut client = Peer::spawn(
            "python3",
            &["-c", PY_CLIENT, &port, ca, python_version(suite), &len],
        );
        let status = client.exit().await;
        let out = String::from_utf8_lossy(&client.out()).into_owned();
        assert!(
            status.success(),
            "{name}: python failed: {out}{}",
            client.err()
        );
        assert_eq!(out.trim(), format!("{} {name}", version_name(suite)));
        assert_eq!(server.await.unwrap()[0].echoed, BULK as u64, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_and_a_python_ssl_server_in_every_suite() {
    let _limit = limit();
    if !python() {
        return;
    }
    let pki = pki();
    for (i, (suite, name)) in SUITES.into_iter().enumerate() {
        let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
        let mut server = Peer::spawn(
            "python3",
            &["-c", PY_SERVER, cert, key, python_version(suite), ""],
        );
        let port = wait_until("python to print its port", WAIT, || {
            let out = String::from_utf8_lossy(&server.out()).into_owned();
            let port = out
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u16>().ok());
            async move { port.ok_or(format!("printed {out:?}")) }
        })
        .await;
        let tls = our_client(
            pki.client_with(Some(suite), None),
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .await;
        let data = text(BULK, i as u64);
        let got = exchange(tls, &data).await;
        assert!(got == data, "{name}: the echo differs");
        assert!(server.exit().await.success(), "{name}: {}", server.err());
        let out = String::from_utf8_lossy(&server.out()).into_owned();
        let summary = out.lines().nth(1).unwrap_or_default().to_owned();
        assert_eq!(
            summary,
            format!("{} {} {name}", data.len(), version_name(suite)),
            "{name}"
        );
    }
}

/// Writes `data` and a close, and reads to the end at the same time.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    stream: S,
    data: &[u8],
) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = async { r.read_to_end(&mut got).await.unwrap() };
    tokio::join!(write, read);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_rustls_and_our_layer_both_ways_in_every_suite() {
    let _limit = limit();
    let pki = pki();
    for (i, (suite, name)) in SUITES.into_iter().enumerate() {
        // tokio-rustls client, our server.
        let (addr, server) = our_server(pki.server_with(Some(suite), None), None, 1).await;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client_with(None, None)));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector.connect(localhost(), tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.negotiated_cipher_suite(), Some(suite));
        let data = text(BULK, i as u64);
        assert!(
            exchange(tls, &data).await == data,
            "{name}: the echo differs"
        );
        assert_eq!(server.await.unwrap()[0].echoed, data.len() as u64);

        // Our client, tokio-rustls server.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_with(Some(suite), None)));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            n
        });
        let tls = our_client(pki.client_with(None, None), addr).await;
        let data = text(BULK, 100 + i as u64);
        assert!(
            exchange(tls, &data).await == data,
            "{name}: the echo differs"
        );
        assert_eq!(server.await.unwrap(), data.len() as u64);
    }
}

/// Differential test against rustls's record protection. One side is our
/// record layer (server or client, at random); the other a rustls
/// unbuffered handshake whose secrets are then taken out
/// (`dangerous_into_kernel_connection`), sealing with rustls's own record
/// protection (`Tls13AeadAlgorithm::encrypter` and
/// `Tls12AeadAlgorithm::encrypter`, what rustls's connections seal with)
/// and following key updates with rustls's key schedule
/// (`KernelConnection::update_{tx,rx}_secret`). All six suites.
///
/// A random schedule of writes both ways (sizes up to 100 KiB), key
/// updates rustls's side asks for and key updates our side makes every few
/// records (`set_tx_limit`; both TLS 1.3 only) and a close from either side
/// runs in lock step. Every record rustls seals must be opened by our layer
/// to exactly the bytes written. Every byte our layer puts on the wire must
/// equal what rustls's sealer produces for the same plaintext under the
/// same keys and sequence numbers, with the same record boundaries (writes
/// split at 16 KiB, as rustls does): header, inner content type and no
/// padding (TLS 1.3), explicit nonce (TLS 1.2 AES-GCM), additional data,
/// tag, and the KeyUpdate and close_notify records. That is stronger than
/// rustls being able to open them: a TLS 1.2 explicit nonce counted
/// differently from rustls's interoperates, and fails here. Not covered:
/// hostile input (tlsfuzzer and the fuzz targets).
mod differential {
    use proptest::prelude::*;
    use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
    use rustls::crypto::cipher::{MessageEncrypter, OutboundChunks, OutboundPlainMessage};
    use rustls::kernel::KernelConnection;
    use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// rustls's side writes this many bytes (one write, split into
        /// records of at most 16 KiB) and our side reads them.
        PeerWrite(usize),
        /// Our side writes this many bytes and rustls's side reads them.
        OurWrite(usize),
        /// rustls's side asks for new keys both ways, then writes a little
        /// so our side reads the request (and answers it).
        PeerKeyUpdate(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = prop_oneof![
            1..64usize,
            1..(100 * 1024usize),
            Just(16 * 1024),
            Just(16 * 1024 + 1)
        ];
        prop_oneof![
            3 => size.clone().prop_map(Op::PeerWrite),
            3 => size.prop_map(Op::OurWrite),
            1 => (1..64usize).prop_map(Op::PeerKeyUpdate),
        ]
    }

    /// What our side is told to do, one step at a time.
    enum Step {
        Read(usize, oneshot::Sender<Vec<u8>>),
        Write(Vec<u8>, oneshot::Sender<()>),
        Close(oneshot::Sender<()>),
        /// Read to the end (the peer's close_notify), then close.
        ReadToEnd(oneshot::Sender<Vec<u8>>),
    }

    async fn serve(mut tls: TlsStream, mut steps: mpsc::Receiver<Step>) {
        while let Some(step) = steps.recv().await {
            match step {
                Step::Read(n, done) => {
                    let mut buf = vec![0; n];
                    tls.read_exact(&mut buf).await.unwrap();
                    // An answer to a KeyUpdate goes out now, not with the
                    // next write: the client waits for it.
                    tls.flush().await.unwrap();
                    let _ = done.send(buf);
                }
                Step::Write(data, done) => {
                    tls.write_all(&data).await.unwrap();
                    tls.flush().await.unwrap();
                    let _ = done.send(());
                }
                Step::Close(done) => {
                    tls.shutdown().await.unwrap();
                    let _ = done.send(());
                }
                Step::ReadToEnd(done) => {
                    let mut rest = Vec::new();
                    tls.read_to_end(&mut rest).await.unwrap();
                    tls.shutdown().await.unwrap();
                    let _ = done.send(rest);
                }
            }
        }
    }

    /// One direction of rustls's record protection.
    struct Sealer {
        suite: SupportedCipherSuite,
        enc: Box<dyn MessageEncrypter>,
        seq: u64,
    }

    impl Sealer {
        fn new(
            suite: SupportedCipherSuite,
            (seq, secrets): (u64, ConnectionTrafficSecrets),
        ) -> Sealer {
            let (key, iv, gcm) = match secrets {
                ConnectionTrafficSecrets::Aes128Gcm { key, iv }
                | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (key, iv, true),
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv, false),
                _ => panic!("secrets of an unexpected cipher"),
            };
            let enc = match suite {
                SupportedCipherSuite::Tls13(suite) => suite.aead_alg.encrypter(key, iv),
                // rustls hands TLS 1.2 AES-GCM secrets over as one IV: the
                // 4-byte salt, then the explicit nonce's starting point.
                SupportedCipherSuite::Tls12(suite) if gcm => {
                    let (salt, explicit) = iv.as_ref().split_at(4);
                    suite.aead_alg.encrypter(key, salt, explicit)
                }
                SupportedCipherSuite::Tls12(suite) => {
                    suite.aead_alg.encrypter(key, iv.as_ref(), &[])
                }
            };
            let mut sealer = Sealer { suite, enc, seq: 0 };
            // aws-lc's TLS 1.2 AES-GCM sealing key learns its nonce mask
            // from its first record, which must be number 0, and refuses
            // sequence numbers that do not increase: seal (and drop) the
            // records rustls sealed before handing over (the Finished).
            while sealer.seq < seq {
                sealer.seal(ContentType::Handshake, &[]);
            }
            sealer
        }

        fn seal(&mut self, typ: ContentType, payload: &[u8]) -> Vec<u8> {
            let msg = OutboundPlainMessage {
                typ,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(payload),
            };
            let sealed = self.enc.encrypt(msg, self.seq).unwrap().encode();
            self.seq += 1;
            sealed
        }

        /// `data` as rustls frames one write: records of at most 16 KiB.
        fn seal_write(&mut self, data: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            for chunk in data.chunks(16 * 1024) {
                out.extend(self.seal(ContentType::ApplicationData, chunk));
            }
            out
        }
    }

    const KEY_UPDATE_REQUESTED: [u8; 5] = [24, 0, 0, 1, 1];
    const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];
    const CLOSE_NOTIFY: [u8; 2] = [1, 0];

    /// rustls's half: its handshake, then its keys.
    struct Peer {
        io: TcpStream,
        kernel: Kernel,
        /// rustls sealing what it sends.
        tx: Sealer,
        /// rustls sealing what our side should send: the prediction.
        rx: Sealer,
        /// Bytes from our side not yet compared.
        wire: Vec<u8>,
    }

    enum Kernel {
        Client(KernelConnection<ClientConnectionData>),
        Server(KernelConnection<ServerConnectionData>),
    }

    impl Kernel {
        fn update_tx(&mut self) -> (u64, ConnectionTrafficSecrets) {
            match self {
                Kernel::Client(k) => k.update_tx_secret().unwrap(),
                Kernel::Server(k) => k.update_tx_secret().unwrap(),
            }
        }

        fn update_rx(&mut self) -> (u64, ConnectionTrafficSecrets) {
            match self {
                Kernel::Client(k) => k.update_rx_secret().unwrap(),
                Kernel::Server(k) => k.update_rx_secret().unwrap(),
            }
        }
    }

    /// Runs a rustls unbuffered handshake over `io` until it may send
    /// application data; returns what it read past the handshake.
    macro_rules! drive {
        ($conn:expr, $io:expr) => {{
            let mut inbuf: Vec<u8> = Vec::new();
            loop {
                let UnbufferedStatus { discard, state } = $conn.process_tls_records(&mut inbuf);
                let (mut read, mut done) = (false, false);
                match state.unwrap() {
                    ConnectionState::EncodeTlsData(mut enc) => {
                        let mut out = vec![0; 64 * 1024];
                        let n = enc.encode(&mut out).unwrap();
                        $io.write_all(&out[..n]).await.unwrap();
                    }
                    ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                    ConnectionState::BlockedHandshake => read = true,
                    ConnectionState::WriteTraffic(_) => done = true,
                    other => panic!("unexpected state in the handshake: {other:?}"),
                }
                inbuf.drain(..discard);
                if done {
                    break;
                }
                if read {
                    let mut buf = vec![0; 32 * 1024];
                    let n = $io.read(&mut buf).await.unwrap();
                    assert!(n > 0, "our side closed during the handshake");
                    inbuf.extend_from_slice(&buf[..n]);
                }
            }
            inbuf
        }};
    }

    async fn rustls_client(
        config: rustls::ClientConfig,
        mut io: TcpStream,
        suite: SupportedCipherSuite,
    ) -> Peer {
        let mut conn = UnbufferedClientConnection::new(Arc::new(config), localhost()).unwrap();
        let rest = drive!(conn, io);
        // Our server sends no tickets: nothing follows the handshake until
        // it writes.
        assert!(rest.is_empty(), "bytes after the server's Finished");
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().unwrap();
        Peer::new(io, Kernel::Client(kernel), secrets, suite)
    }

    async fn rustls_server(
        config: rustls::ServerConfig,
        mut io: TcpStream,
        suite: SupportedCipherSuite,
    ) -> Peer {
        let mut conn = UnbufferedServerConnection::new(Arc::new(config)).unwrap();
        let rest = drive!(conn, io);
        assert!(rest.is_empty(), "bytes after the client's Finished");
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().unwrap();
        Peer::new(io, Kernel::Server(kernel), secrets, suite)
    }

    impl Peer {
        fn new(
            io: TcpStream,
            kernel: Kernel,
            secrets: rustls::ExtractedSecrets,
            suite: SupportedCipherSuite,
        ) -> Peer {
            Peer {
                io,
                kernel,
                tx: Sealer::new(suite, secrets.tx),
                rx: Sealer::new(suite, secrets.rx),
                wire: Vec::new(),
            }
        }
        /// Reads from our side until `expected.len()` bytes, and checks
        /// they are exactly `expected`.
        async fn expect(&mut self, expected: &[u8], what: &str) {
            while self.wire.len() < expected.len() {
                let mut buf = vec![0; 64 * 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut buf));
                let Ok(n) = read.await else {
                    panic!(
                        "{what}: our side sent {} of the {} bytes rustls would have",
                        self.wire.len(),
                        expected.len()
                    );
                };
                let n = n.unwrap();
                assert!(n > 0, "{what}: our side closed the socket early");
                self.wire.extend_from_slice(&buf[..n]);
            }
            let got: Vec<u8> = self.wire.drain(..expected.len()).collect();
            if got != expected {
                let at = got
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                panic!(
                    "{what}: our layer put different bytes on the wire than rustls seals, first at byte {at} of {} (record header there: ours {:02x?}, rustls {:02x?})",
                    expected.len(),
                    &got[..5.min(got.len())],
                    &expected[..5.min(expected.len())],
                );
            }
        }

        fn update_tx(&mut self) {
            let suite = self.tx.suite;
            self.tx = Sealer::new(suite, self.kernel.update_tx());
        }

        fn update_rx(&mut self) {
            let suite = self.rx.suite;
            self.rx = Sealer::new(suite, self.kernel.update_rx());
        }

        /// Our side's records for `data` written at once, with the key
        /// update it makes when its key has sealed `limit` records.
        fn predict_write(&mut self, data: &[u8], limit: u64) -> Vec<u8> {
            let mut out = Vec::new();
            for chunk in data.chunks(16 * 1024) {
                if self.rx.seq >= limit {
                    out.extend(
                        self.rx
                            .seal(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED),
                    );
                    self.update_rx();
                }
                out.extend(self.rx.seal(ContentType::ApplicationData, chunk));
            }
            out
        }
    }

    fn bytes(len: usize, seed: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131) ^ (i >> 8)) as u8)
            .collect()
    }

    /// Runs `ops` between our record layer (the server if `ours_serves`)
    /// and rustls's, then a close (ours first if `we_close_first`).
    async fn run(
        suite: SupportedCipherSuite,
        ours_serves: bool,
        mut ops: Vec<Op>,
        mut limit: u64,
        we_close_first: bool,
    ) {
        if let SupportedCipherSuite::Tls12(_) = suite {
            // TLS 1.2 has no key updates; a connection ends at its limit.
            limit = 1 << 23;
            for op in &mut ops {
                if let Op::PeerKeyUpdate(n) = *op {
                    *op = Op::PeerWrite(n);
                }
            }
        }
        let pki = pki();
        // No tickets: the prediction starts right after the handshake.
        let mut server = pki.server_with(Some(suite), None);
        server.send_tls13_tickets = 0;
        let mut client = pki.client_with(Some(suite), None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (steps, rx) = mpsc::channel(1);
        let (ours, mut peer) = if ours_serves {
            let ours = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let (mut tls, _) = accept(server_config(server), tcp).await.unwrap();
                tls.set_tx_limit(limit);
                serve(tls, rx).await;
            });
            client.enable_secret_extraction = true;
            let tcp = TcpStream::connect(addr).await.unwrap();
            (ours, rustls_client(client, tcp, suite).await)
        } else {
            let ours = tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut tls = connect(client_config(client), localhost(), tcp)
                    .await
                    .unwrap();
                tls.set_tx_limit(limit);
                serve(tls, rx).await;
            });
            server.enable_secret_extraction = true;
            let (tcp, _) = listener.accept().await.unwrap();
            (ours, rustls_server(server, tcp, suite).await)
        };
        let call = async |step: Step| {
            steps
                .send(step)
                .await
                .unwrap_or_else(|_| panic!("our side's task ended"))
        };
        for (i, op) in ops.iter().enumerate() {
            let what = format!("op {i} {op:?}");
            match *op {
                Op::PeerWrite(n) | Op::PeerKeyUpdate(n) => {
                    let mut sent = Vec::new();
                    let update = matches!(op, Op::PeerKeyUpdate(_));
                    if update {
                        sent.extend(peer.tx.seal(ContentType::Handshake, &KEY_UPDATE_REQUESTED));
                        peer.update_tx();
                    }
                    let data = bytes(n, i);
                    sent.extend(peer.tx.seal_write(&data));
                    peer.io.write_all(&sent).await.unwrap();
                    let (done, got) = oneshot::channel();
                    call(Step::Read(n, done)).await;
                    let got = got.await.unwrap();
                    assert!(
                        got == data,
                        "{what}: our layer opened rustls's records to other bytes"
                    );
                    if update {
                        // The answer, under our side's old key.
                        let answer = peer
                            .rx
                            .seal(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED);
                        peer.update_rx();
                        peer.expect(&answer, &what).await;
                    }
                }
                Op::OurWrite(n) => {
                    let data = bytes(n, i);
                    let expected = peer.predict_write(&data, limit);
                    let (done, written) = oneshot::channel();
                    call(Step::Write(data, done)).await;
                    peer.expect(&expected, &what).await;
                    written.await.unwrap();
                }
            }
        }
        let our_close = peer.rx.seal(ContentType::Alert, &CLOSE_NOTIFY);
        let peer_close = peer.tx.seal(ContentType::Alert, &CLOSE_NOTIFY);
        if we_close_first {
            let (done, closed) = oneshot::channel();
            call(Step::Close(done)).await;
            peer.expect(&our_close, "our close_notify").await;
            closed.await.unwrap();
            peer.io.write_all(&peer_close).await.unwrap();
        } else {
            peer.io.write_all(&peer_close).await.unwrap();
            let (done, rest) = oneshot::channel();
            call(Step::ReadToEnd(done)).await;
            assert!(rest.await.unwrap().is_empty());
            peer.expect(&our_close, "our close_notify").await;
        }
        drop(steps);
        ours.await.unwrap();
        // Nothing more on the wire.
        let mut tail = Vec::new();
        peer.io.read_to_end(&mut tail).await.unwrap();
        assert!(
            peer.wire.is_empty() && tail.is_empty(),
            "our side sent more than rustls would"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 8, max_shrink_time: 30_000, ..ProptestConfig::default() })]

        #[test]
        fn our_records_are_rustls_records_byte_for_byte(
            suite in prop_oneof![
                Just(cs::TLS13_AES_128_GCM_SHA256),
                Just(cs::TLS13_AES_256_GCM_SHA384),
                Just(cs::TLS13_CHACHA20_POLY1305_SHA256),
                Just(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
                Just(cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
                Just(cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
            ],
            ops in proptest::collection::vec(op(), 1..24),
            ours_serves in any::<bool>(),
            limit in prop_oneof![1..8u64, Just(1u64 << 23)],
            we_close_first in any::<bool>(),
        ) {
            let _limit = limit_guard();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run(suite, ours_serves, ops, limit, we_close_first));
        }
    }

    fn limit_guard() -> crate::test_support::Limit {
        crate::test_support::limit()
    }
}
