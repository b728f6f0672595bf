//! The ingress's TLS accept path (`transport/src/tls.rs` `accept`: the
//! handshake driver around rustls's unbuffered server, where the
//! ClientHello and its SNI are parsed; the gateway has no ClientHello
//! parser of its own). The input is everything a client sends before it
//! closes its side, over a real loopback socket, to a server configured
//! as the ingress is (mTLS, TLS 1.2 and 1.3, ALPN h2 and http/1.1).
//!
//! Beyond "does not crash": the handshake never completes (no input can
//! finish it without the server's randomness) and always ends promptly,
//! with no hang; what the server sends before closing is whole TLS
//! records of the four content types with legal lengths.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use elsinore_fuzz::Loopback;
use elsinore_fuzz::tls::{mtls_server_config, records, whole_records};
use elsinore_gateway::proxy::tls;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    net: Loopback,
    config: Arc<rustls::ServerConfig>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        net: Loopback::new(),
        config: mtls_server_config(),
    })
}

fuzz_target!(|input: &[u8]| {
    let f = fixture();
    f.net.rt.block_on(async {
        let (mut client, server_io) = f.net.connect().await;
        let server = tls::accept(f.config.clone(), server_io);
        let client = async {
            // The server may refuse before reading everything.
            let _ = client.write_all(input).await;
            let _ = client.shutdown().await;
            let mut got = Vec::new();
            // A reset (the server closed with our bytes unread) may cut
            // what it sent: then only whole records are checked.
            let clean = client.read_to_end(&mut got).await.is_ok();
            (got, clean)
        };
        let (accepted, (mut sent, clean)) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        })
        .await
        .expect("the handshake neither failed nor finished within 10 s");
        assert!(accepted.is_err(), "a handshake completed from a fuzz input");
        if !clean {
            sent.truncate(whole_records(&sent));
        }
        let recs = records(&sent)
            .unwrap_or_else(|| panic!("the server sent a partial record: {sent:02x?}"));
        for (ty, version, body) in recs {
            assert!(matches!(ty, 20..=23), "record type {ty}");
            assert!(
                matches!(version, 0x0301..=0x0303),
                "record version {version:04x}"
            );
            assert!(
                body.len() <= 16 * 1024 + 256,
                "a {}-byte record",
                body.len()
            );
        }
    });
});
