//! What the fuzz targets share: feeding a body decoder from memory in
//! pieces of chosen sizes, so that a target can check that the verdict does
//! not depend on how the bytes arrived (a TCP stream may split them
//! anywhere), a loopback socket pair per input for the targets that drive a
//! real connection, and a few small helpers.

use std::net::SocketAddr;

use bytes::BytesMut;
use elsinore_transport::fuzzing::h1::{BodyDecoder, BodyFraming};
use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};

/// A tiny deterministic generator (splitmix64) for piece sizes, seeded
/// from the input so a crash reproduces.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A size in `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}

/// Everything a body decoder produced from one input.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// The data frames, concatenated.
    pub data: Vec<u8>,
    /// The trailer frame, if one came.
    pub trailers: Option<HeaderMap>,
    /// `Ok(bytes after the body)` or the error, as text.
    pub outcome: Result<Vec<u8>, String>,
}

/// How the input reaches the decoder.
#[derive(Debug, Clone)]
pub enum Pieces {
    /// Everything in the buffer before the first call.
    AllAtOnce,
    /// Nothing up front; each read adds 1 to `max` bytes.
    Random { rng: Rng, max: usize },
}

/// Decodes a body framed by `framing` from `input` until it ends or fails.
/// Panics if the decoder hands out a frame after the end, more frames than
/// the input could hold, or a data frame beyond a declared length.
pub fn decode_body(framing: BodyFraming, input: &[u8], mut pieces: Pieces) -> Decoded {
    let mut decoder = BodyDecoder::new(framing);
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    if let Pieces::AllAtOnce = pieces {
        buf.extend_from_slice(input);
        fed = input.len();
    }
    let mut more = |buf: &mut BytesMut| -> bool {
        if fed >= input.len() {
            return false;
        }
        let n = match &mut pieces {
            Pieces::AllAtOnce => input.len() - fed,
            Pieces::Random { rng, max } => rng.size(*max).min(input.len() - fed),
        };
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        true
    };
    let mut data = Vec::new();
    let mut trailers = None;
    // Every frame but the last consumes at least one input byte.
    let mut frames_left = input.len() + 2;
    let outcome = loop {
        match decoder.next_frame(&mut buf, &mut more) {
            Ok(None) => {
                assert!(decoder.is_done(), "end of body but the decoder is not done");
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                break Ok(rest);
            }
            Ok(Some(frame)) => {
                frames_left = frames_left
                    .checked_sub(1)
                    .expect("more frames than input bytes: the decoder does not progress");
                assert!(trailers.is_none(), "a frame after the trailers");
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => {
                        let t = frame.into_trailers().expect("a frame is data or trailers");
                        assert!(!t.is_empty(), "an empty trailer frame");
                        trailers = Some(t);
                    }
                }
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    if let (BodyFraming::Length(n), Ok(_)) = (framing, &outcome) {
        assert_eq!(
            data.len() as u64,
            n,
            "a length-framed body of another length"
        );
    }
    if let BodyFraming::Length(n) = framing {
        assert!(data.len() as u64 <= n, "more data than the declared length");
        assert!(trailers.is_none(), "trailers on a length-framed body");
    }
    Decoded {
        data,
        trailers,
        outcome,
    }
}

/// Decodes `input` all at once and in random pieces (seeded by `seed`),
/// asserts both give the same result, and returns it.
pub fn decode_both_ways(framing: BodyFraming, input: &[u8], seed: u64) -> Decoded {
    let whole = decode_body(framing, input, Pieces::AllAtOnce);
    let max = 1 + (seed % 23) as usize;
    let pieces = decode_body(
        framing,
        input,
        Pieces::Random {
            rng: Rng::new(seed),
            max,
        },
    );
    assert_eq!(
        whole, pieces,
        "the body decodes differently when its bytes arrive in pieces of at most {max}"
    );
    whole
}

/// A canonical chunked encoding of `data` in chunks of the sizes `rng`
/// draws, with `trailers`.
pub fn encode_chunked(data: &[u8], trailers: Option<&HeaderMap>, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = rng.size(64).min(data.len() - at);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&data[at..at + n]);
        out.extend_from_slice(b"\r\n");
        at += n;
    }
    out.extend_from_slice(b"0\r\n");
    if let Some(trailers) = trailers {
        for (name, value) in trailers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The values of `name` in `headers`, comma-split and trimmed.
pub fn list_values<'h>(headers: &'h HeaderMap, name: &str) -> Vec<&'h [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|v| !v.is_empty())
        .collect()
}

/// A Content-Length value as a number (digits only).
pub fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A loopback listener on a single-threaded runtime, made once per fuzz
/// process: each input then gets a fresh connection from it, without the
/// cost of a runtime and a bound port per input.
#[derive(Debug)]
pub struct Loopback {
    pub rt: tokio::runtime::Runtime,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Loopback {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback listener");
        let addr = listener.local_addr().expect("its address");
        Loopback { rt, listener, addr }
    }

    /// A new connection: the client's end, then the server's.
    pub async fn connect(&self) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(self.addr).await.expect("connect");
        let (server, _) = self.listener.accept().await.expect("accept");
        (client, server)
    }
}

/// TLS identities minted per process: a server leaf for `svc.a.example`
/// issued by a CA its clients trust, and a separate CA as the
/// client-certificate root.
pub mod tls {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::RootCertStore;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    pub const SERVER_NAME: &str = "svc.a.example";

    pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A fresh CA: the root store that trusts it, and its issuer.
    fn ca(name: &str) -> (Arc<RootCertStore>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().expect("a key pair");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("a CA certificate");
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).expect("the CA as a root");
        (Arc::new(roots), Issuer::new(params, key))
    }

    /// A server's certificate chain and key, and the roots a client verifies
    /// them with.
    pub struct ServerIdentity {
        pub chain: Vec<CertificateDer<'static>>,
        pub key: PrivateKeyDer<'static>,
        pub roots: Arc<RootCertStore>,
    }

    /// A leaf for [`SERVER_NAME`] (DNS SAN) issued by a fresh CA, so that a
    /// client with `roots` verifies it as it would any server.
    pub fn server_identity() -> ServerIdentity {
        let (roots, issuer) = ca("elsinore fuzz server CA");
        let key = KeyPair::generate().expect("a key pair");
        let cert = CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .expect("certificate params")
            .signed_by(&key, &issuer)
            .expect("a leaf certificate");
        ServerIdentity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
        }
    }

    /// A server config as the ingress builds it: TLS 1.2 and 1.3, client
    /// certificates required (chained to a CA no fuzz input has a
    /// certificate from), passed through the gateway's `server_config`.
    pub fn mtls_server_config() -> Arc<rustls::ServerConfig> {
        let (client_roots, _) = ca("elsinore fuzz client CA");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(client_roots, provider())
                .build()
                .expect("a client verifier");
        let ServerIdentity { chain, key, .. } = server_identity();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("a server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        elsinore_gateway::proxy::tls::server_config(config)
    }

    /// The length of the whole records at the start of `bytes`.
    pub fn whole_records(bytes: &[u8]) -> usize {
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + 5) {
            let end = at + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
            if end > bytes.len() {
                break;
            }
            at = end;
        }
        at
    }

    /// Splits `bytes` into TLS records: `(type, version, payload)` each;
    /// `None` if the last record is cut short.
    pub fn records(mut bytes: &[u8]) -> Option<Vec<(u8, u16, &[u8])>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            if bytes.len() < 5 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
            let body = bytes.get(5..5 + len)?;
            out.push((bytes[0], u16::from_be_bytes([bytes[1], bytes[2]]), body));
            bytes = &bytes[5 + len..];
        }
        Some(out)
    }
}
