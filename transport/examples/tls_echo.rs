//! A TLS server around Elsinore's own record layer (`elsinore_transport::tls`), for
//! test suites that need a server process: tlsfuzzer's scripts (see
//! docs/transport.md) and manual checks with `openssl s_client`. Client
//! authentication is off, since those suites present no certificate; the
//! gateway itself always requires one.
//!
//! ```text
//! cargo run -p elsinore-transport --example tls_echo -- CERT.pem KEY.pem [ADDR] [http|echo]
//! ```
//!
//! `http` (the default) answers the first request head (up to an empty
//! line) with one small HTTP/1.0 response in one record, as `openssl
//! s_server -www` does and tlsfuzzer expects, then reads until the client's
//! close_notify and answers it. `echo` writes back what it reads. Each
//! connection's outcome is printed on standard error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use elsinore_transport::tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 33\r\n\r\nhello from the gateway's records\n";

/// Request heads longer than this are refused.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum Mode {
    Http,
    Echo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cert, key, addr, mode) = match &args[..] {
        [cert, key, rest @ ..] if rest.len() <= 2 => {
            let addr = rest.first().map_or("127.0.0.1:4433", String::as_str);
            let mode = match rest.get(1).map(String::as_str) {
                None | Some("http") => Mode::Http,
                Some("echo") => Mode::Echo,
                Some(other) => bail!("unknown mode {other:?}: http or echo"),
            };
            (cert, key, addr.to_owned(), mode)
        }
        _ => bail!("usage: tls_echo CERT.pem KEY.pem [ADDR] [http|echo]"),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {cert}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {cert}"))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {key}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let config = tls::server_config(config);
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(Duration::from_secs(30), serve(config, tcp, mode))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
            match outcome {
                Ok(()) => eprintln!("{peer}: closed cleanly"),
                Err(e) => eprintln!("{peer}: {e:#}"),
            }
        });
    }
}

async fn serve(
    config: Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    mode: Mode,
) -> anyhow::Result<()> {
    let (mut tls, _) = tls::accept(config, tcp).await.context("handshake")?;
    let mut buf = vec![0; 64 * 1024];
    let mut head = Vec::new();
    let mut answered = false;
    loop {
        let n = tls.read(&mut buf).await.context("reading")?;
        if n == 0 {
            break;
        }
        match mode {
            Mode::Echo => tls.write_all(&buf[..n]).await.context("echoing")?,
            Mode::Http if !answered => {
                head.extend_from_slice(&buf[..n]);
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    tls.write_all(RESPONSE).await.context("answering")?;
                    tls.flush().await.context("answering")?;
                    answered = true;
                } else if head.len() > MAX_HEAD {
                    bail!("no end of the request head in {MAX_HEAD} bytes");
                }
            }
            Mode::Http => {}
        }
    }
    tls.shutdown().await.context("closing")?;
    Ok(())
}
