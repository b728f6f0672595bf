//! The record layer's read path (`transport/src/tls.rs`, `TlsStream` as
//! `accept` returns it) fed valid AEAD records with hostile inner
//! plaintext. Each input runs a real TLS 1.3 handshake over loopback
//! (a rustls client that verifies our certificate against its CA, our
//! `accept`), then takes the client's traffic secret
//! (from rustls's key log) and writes records sealed under it: so the
//! records open, and what the fuzzer controls is what is inside them.
//!
//! Input: byte 0 picks the suite (AES-128-GCM, AES-256-GCM,
//! ChaCha20-Poly1305); then operations, each a byte and its fields:
//! * 0: a sealed record: inner type, padding length, u16 content length
//!   (up to 2^14 + 15: over-long plaintext too), content;
//! * 1: raw bytes written as they are (u8 length, bytes);
//! * 2: as 0 but its tag corrupted;
//! * 3: a well-formed KeyUpdate (the next byte's low bit: update_requested),
//!   after which records are sealed under the next key, as after a sealed
//!   KeyUpdate written with op 0.
//!
//! Beyond "does not crash": the plaintext the server reads is always a
//! prefix of the application data sealed, in order (nothing from a
//! corrupted, raw or non-data record is ever delivered, nothing is lost
//! or reordered before the first refusal); when every operation is a valid
//! application-data record (1 to 2^14 bytes of content and padding), all
//! of it is delivered; the server ends promptly.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use elsinore_fuzz::Loopback;
use elsinore_fuzz::tls::{SERVER_NAME, ServerIdentity, provider, server_identity};
use elsinore_gateway::proxy::tls;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The last client application traffic secret rustls logged.
#[derive(Debug, Default)]
struct LastSecret(Mutex<Option<Vec<u8>>>);

impl rustls::KeyLog for LastSecret {
    fn log(&self, label: &str, _: &[u8], secret: &[u8]) {
        if label == "CLIENT_TRAFFIC_SECRET_0" {
            *self.0.lock().expect("not poisoned") = Some(secret.to_vec());
        }
    }
    fn will_log(&self, label: &str) -> bool {
        label == "CLIENT_TRAFFIC_SECRET_0"
    }
}

#[derive(Clone, Copy)]
struct Suite {
    aead: &'static aead::Algorithm,
    hkdf: hkdf::Algorithm,
    key_len: usize,
}

const SUITES: [Suite; 3] = [
    Suite {
        aead: &aead::AES_128_GCM,
        hkdf: hkdf::HKDF_SHA256,
        key_len: 16,
    },
    Suite {
        aead: &aead::AES_256_GCM,
        hkdf: hkdf::HKDF_SHA384,
        key_len: 32,
    },
    Suite {
        aead: &aead::CHACHA20_POLY1305,
        hkdf: hkdf::HKDF_SHA256,
        key_len: 32,
    },
];

struct Fixture {
    net: Loopback,
    server: Arc<rustls::ServerConfig>,
    clients: Vec<(Arc<rustls::ClientConfig>, Arc<LastSecret>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ServerIdentity { chain, key, roots } = server_identity();
        // The record layer does not care how the client authenticated.
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server config");
        let server = tls::server_config(server);
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let clients = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ]
        .into_iter()
        .map(|suite| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = vec![suite];
            let log = Arc::new(LastSecret::default());
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.key_log = log.clone();
            config.enable_secret_extraction = true;
            // One fresh full handshake per input: no resumption state
            // carried from one input to the next.
            config.resumption = rustls::client::Resumption::disabled();
            (Arc::new(config), log)
        })
        .collect();
        Fixture {
            net: Loopback::new(),
            server,
            clients,
        }
    })
}

struct HkdfLen(usize);

impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &str, len: usize) -> Vec<u8> {
    let full = format!("tls13 {label}");
    let mut info = Vec::new();
    info.extend_from_slice(&(len as u16).to_be_bytes());
    info.push(full.len() as u8);
    info.extend_from_slice(full.as_bytes());
    info.push(0);
    let mut out = vec![0u8; len];
    hkdf::Prk::new_less_safe(alg, secret)
        .expand(&[&info], HkdfLen(len))
        .expect("expand")
        .fill(&mut out)
        .expect("fill");
    out
}

/// The client's sending side: the current secret, key, IV and sequence.
struct Sealer {
    suite: Suite,
    secret: Vec<u8>,
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Sealer {
    fn new(suite: Suite, secret: Vec<u8>) -> Self {
        let key = expand_label(suite.hkdf, &secret, "key", suite.key_len);
        let iv = expand_label(suite.hkdf, &secret, "iv", 12);
        Sealer {
            suite,
            key: LessSafeKey::new(UnboundKey::new(suite.aead, &key).expect("a key")),
            iv: iv.try_into().expect("12 bytes"),
            secret,
            seq: 0,
        }
    }

    fn key_update(&mut self) {
        let next = expand_label(
            self.suite.hkdf,
            &self.secret,
            "traffic upd",
            self.secret.len(),
        );
        *self = Sealer::new(self.suite, next);
    }

    /// One record: `content`, its inner type, `pad` zeros; `corrupt` flips
    /// a bit of the tag.
    fn seal(&mut self, ty: u8, content: &[u8], pad: usize, corrupt: bool, out: &mut Vec<u8>) {
        let mut inner = Vec::with_capacity(content.len() + 1 + pad + 16);
        inner.extend_from_slice(content);
        inner.push(ty);
        inner.resize(inner.len() + pad, 0);
        let len = inner.len() + 16;
        let Ok(len16) = u16::try_from(len) else {
            return;
        };
        let header = [23, 3, 3, (len16 >> 8) as u8, len16 as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut inner,
            )
            .expect("seal");
        if corrupt {
            let last = inner.len() - 1;
            inner[last] ^= 0x80;
        }
        out.extend_from_slice(&header);
        out.extend_from_slice(&inner);
    }
}

/// A cursor over the input; reads past its end give zeros and empty slices.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

const KEY_UPDATE: u8 = 24;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

fuzz_target!(|input: &[u8]| {
    let f = fixture();
    let mut input = Input(input);
    let Some(choice) = input.byte() else { return };
    let which = usize::from(choice) % SUITES.len();
    let suite = SUITES[which];
    let (client_config, log) = &f.clients[which];

    f.net.rt.block_on(async {
        let (client_io, server_io) = f.net.connect().await;
        let connector = tokio_rustls::TlsConnector::from(client_config.clone());
        let name = ServerName::try_from(SERVER_NAME).expect("a name");
        let (client, server) = tokio::join!(
            connector.connect(name, client_io),
            tls::accept(f.server.clone(), server_io)
        );
        let client = client.expect("the rustls client's handshake");
        let (mut server, _) = server.expect("our server's handshake");
        let (mut client_io, conn) = client.into_inner();
        let secret = log
            .0
            .lock()
            .expect("not poisoned")
            .take()
            .expect("a logged secret");
        let extracted = conn.dangerous_extract_secrets().expect("secrets");
        let (seq, _) = extracted.tx;
        let mut sealer = Sealer::new(suite, secret);
        sealer.seq = seq;

        // Everything the client writes, and the data the server should read.
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        let mut all_valid_data = true;
        while let Some(op) = input.byte() {
            match op % 4 {
                op @ (0 | 2) => {
                    let ty = input.byte().unwrap_or(APPLICATION_DATA);
                    let pad = usize::from(input.byte().unwrap_or(0));
                    let len = usize::from(input.u16() % (16 * 1024 + 16));
                    let content = input.take(len);
                    let corrupt = op == 2;
                    sealer.seal(ty, content, pad, corrupt, &mut wire);
                    // What the receiver sees: the last non-zero byte of the
                    // inner plaintext is the type (a zero `ty` is padding).
                    let mut inner = content.to_vec();
                    inner.push(ty);
                    let opened = inner
                        .iter()
                        .rposition(|&b| b != 0)
                        .map(|at| (inner[at], &inner[..at]));
                    let valid = !corrupt
                        && content.len() + pad <= 16 * 1024
                        && matches!(opened, Some((APPLICATION_DATA, c)) if !c.is_empty());
                    all_valid_data &= valid;
                    match opened {
                        Some((APPLICATION_DATA, c)) if !corrupt => expected.extend_from_slice(c),
                        Some((HANDSHAKE, [KEY_UPDATE, 0, 0, 1, 0 | 1])) if !corrupt => {
                            sealer.key_update();
                        }
                        _ => {}
                    }
                }
                1 => {
                    let len = usize::from(input.byte().unwrap_or(0));
                    wire.extend_from_slice(input.take(len));
                    all_valid_data = false;
                }
                _ => {
                    let requested = input.byte().unwrap_or(0) & 1;
                    sealer.seal(
                        HANDSHAKE,
                        &[KEY_UPDATE, 0, 0, 1, requested],
                        0,
                        false,
                        &mut wire,
                    );
                    sealer.key_update();
                    all_valid_data = false;
                }
            }
        }

        let client = async {
            let (mut rd, mut wr) = client_io.split();
            let write = async {
                let _ = wr.write_all(&wire).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            tokio::join!(write, drain);
        };
        let server = async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let end = loop {
                match server.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e),
                }
            };
            drop(server);
            (got, end)
        };
        let ((got, end), ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        })
        .await
        .expect("the server neither finished nor failed within 10 s");
        assert!(
            expected.starts_with(&got),
            "the server read {} bytes that are not a prefix of the {} sealed ({end:?})",
            got.len(),
            expected.len()
        );
        if all_valid_data {
            assert_eq!(
                got.len(),
                expected.len(),
                "valid application data was not all delivered ({end:?})"
            );
        }
    });
});
