//! Differential tests of the HTTP/1.1 server loop against hyper 1's server:
//! the same bytes, sent on a loopback connection to [`serve`] and to a
//! `hyper::server::conn::http1` connection, must give the handler the same
//! requests (method, target, body bytes, trailers, `Content-Length`) and
//! fail the same ones. A framing difference between the two is where a
//! request-smuggling bug would hide, so every case where this loop is
//! deliberately stricter than hyper is listed in [`STRICTER`] with its
//! reason, and the test checks that it is indeed only stricter there
//! (hyper accepts, we refuse), never looser. A property test then edits
//! valid requests at random (bytes flipped, inserted, deleted, cut, field
//! lines that matter to framing inserted) and checks the rule that keeps
//! smuggling out: whatever we hand on, hyper hands on identically; where
//! we stop, hyper may go further, never the other way.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::server::*;

/// What a handler saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The whole request, its body read to the end.
    Whole {
        method: String,
        target: String,
        content_length: Vec<String>,
        body: Vec<u8>,
        trailers: Vec<(String, String)>,
    },
    /// The head was handed over, but its body failed to decode.
    BodyFailed { method: String, target: String },
}

/// Reads a request to its end, as both handlers do.
async fn record<B>(req: Request<B>) -> Seen
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = req.into_parts();
    let method = parts.method.to_string();
    let target = parts.uri.to_string();
    let content_length = parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    match body.collect().await {
        Ok(collected) => {
            let trailers = collected
                .trailers()
                .into_iter()
                .flatten()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Seen::Whole {
                method,
                target,
                content_length,
                body: collected.to_bytes().to_vec(),
                trailers,
            }
        }
        Err(_) => Seen::BodyFailed { method, target },
    }
}

/// Both handlers' answer: 200, or 400 when the body failed.
fn answer(seen: &Seen) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    if matches!(seen, Seen::BodyFailed { .. }) {
        *resp.status_mut() = StatusCode::BAD_REQUEST;
    }
    resp
}

/// What one server made of the bytes: the requests its handler saw, in
/// order, and the status line of the first response (for the report).
#[derive(Debug)]
struct Run {
    seen: Vec<Seen>,
    first_status: String,
}

/// Sends `wire`, half-closes, and reads until the server closes.
async fn client(addr: std::net::SocketAddr, wire: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(wire).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    // A reset after a refusal is a close too.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or("").to_owned()
}

async fn run_ours(wire: &[u8]) -> Run {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let settings = Settings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            yield_every: 0,
        };
        let token = CancellationToken::new();
        let _ = serve(s, &settings, &token, |req| {
            let tx = tx.clone();
            async move {
                let seen = record(req).await;
                let resp = answer(&seen);
                let _ = tx.send(seen);
                resp
            }
        })
        .await;
    });
    let first_status = client(addr, wire).await;
    server.await.unwrap();
    let mut seen = Vec::new();
    while let Ok(s) = rx.try_recv() {
        seen.push(s);
    }
    Run { seen, first_status }
}

async fn run_hyper(wire: &[u8]) -> Run {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let tx = tx.clone();
            async move {
                let seen = record(req).await;
                let resp = answer(&seen);
                let _ = tx.send(seen);
                Ok::<_, Infallible>(resp)
            }
        });
        // Half-close on: the client's end of input must not cut the
        // response to a request it sent whole.
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    });
    let first_status = client(addr, wire).await;
    server.await.unwrap();
    let mut seen = Vec::new();
    while let Ok(s) = rx.try_recv() {
        seen.push(s);
    }
    Run { seen, first_status }
}

/// Cases both servers must read alike: (name, bytes).
const SAME: &[(&str, &str)] = &[
    ("get", "GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (
        "post with length",
        "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "zero length",
        "POST /p HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "length with leading zeros",
        "POST /p HTTP/1.1\r\nContent-Length: 005\r\n\r\nhello",
    ),
    (
        "repeated identical lengths (folded into the first)",
        "POST /p HTTP/1.1\r\nContent-Length: 05\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "length list in one field",
        "POST /p HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
    ),
    (
        "length list without space",
        "POST /p HTTP/1.1\r\nContent-Length: 5,5\r\n\r\nhello",
    ),
    (
        "differing lengths",
        "POST /p HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "signed length",
        "POST /p HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
    ),
    (
        "negative length",
        "POST /p HTTP/1.1\r\nContent-Length: -1\r\n\r\nhello",
    ),
    (
        "hex length",
        "POST /p HTTP/1.1\r\nContent-Length: 0x5\r\n\r\nhello",
    ),
    (
        "empty length",
        "POST /p HTTP/1.1\r\nContent-Length:\r\n\r\nhello",
    ),
    (
        "length over 64 bits",
        "POST /p HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\nhello",
    ),
    (
        "length longer than the body",
        "POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\nhello",
    ),
    (
        "length shorter than the body (the rest is the next request)",
        "POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nhelGET /n HTTP/1.1\r\n\r\n",
    ),
    (
        "chunked with extensions and trailers",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;a=b\r\nhello\r\n1 ;q=\"x;y\"\r\n!\r\n0\r\nX-Sum: 6\r\nX-Other: o\r\n\r\n",
    ),
    (
        "chunk sizes in upper case with leading zeros",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n000A\r\n0123456789\r\n0\r\n\r\n",
    ),
    (
        "chunked in capitals",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: CHUNKED\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    ),
    (
        "empty chunk-size line",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk extension without a size",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n;a\r\n\r\n",
    ),
    (
        "chunk size with leading space",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size ended by bare LF",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk extension ended by bare LF",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size over 64 bits",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size not hex",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size 0x-prefixed",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk data too long",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk data ended by bare LF",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
    ),
    (
        "trailer line ended by a bare LF",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-A: 1\nX-B: 2\r\n\r\n",
    ),
    (
        "trailers",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
    ),
    (
        "obs-fold in trailers",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-A: 1\r\n 2\r\n\r\n",
    ),
    (
        "chunked body cut short",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ),
    (
        "chunked body without its last chunk",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ),
    (
        "empty transfer-encoding",
        "POST /c HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n",
    ),
    (
        "chunked, then an empty transfer-encoding",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n",
    ),
    (
        "chunked followed by an empty list element",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    ),
    (
        "transfer-encoding identity",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\nhello",
    ),
    (
        "transfer-encoding gzip alone",
        "POST /c HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ),
    (
        "transfer-encoding in HTTP/1.0",
        "POST /c HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "transfer-encoding and length in HTTP/1.0",
        "POST /c HTTP/1.0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
    ),
    (
        "obs-fold",
        "GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n",
    ),
    (
        "obs-fold of transfer-encoding",
        "POST /c HTTP/1.1\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "space before the colon",
        "POST /p HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
    ),
    ("bare CR in a value", "GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"),
    (
        "bare CR ending a line",
        "GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
    ),
    ("NUL in a value", "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n"),
    ("bare LF line ends", "GET /lf HTTP/1.1\nHost: a\n\n"),
    (
        "empty lines before the request line",
        "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "HTTP/2 version in an HTTP/1 request line",
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    ),
    ("HTTP/0.9 request", "GET /\r\n\r\n"),
    ("lower-case version", "GET / http/1.1\r\nHost: a\r\n\r\n"),
    (
        "absolute-form target",
        "GET http://a.example/x?y HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ),
    (
        "asterisk-form target",
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "target with a space",
        "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "target with a fragment",
        "GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    ("unknown method", "PURGE /x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("lower-case method", "get / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (
        "pipelined requests",
        "POST /1 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\
         POST /2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\ny\r\n0\r\n\r\n\
         GET /3 HTTP/1.1\r\n\r\n",
    ),
    (
        "HTTP/1.0 keep-alive then close",
        "GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\nGET /3 HTTP/1.0\r\n\r\n",
    ),
    (
        "HTTP/1.0 asking for close and keep-alive",
        "GET /1 HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    ),
    (
        "HTTP/1.0 keep-alive and close in one field",
        "GET /1 HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    ),
    (
        "connection close ends the pipeline",
        "GET /1 HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    ),
    (
        "expect 100-continue",
        "PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    ),
    (
        "duplicate host",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ),
    (
        "upgrade asked for",
        "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ),
    ("head cut short", "GET / HTTP/1.1\r\nHost: a\r\n"),
    ("nothing", ""),
];

/// Where this loop is stricter than hyper 1, on purpose: (name, bytes,
/// why). Hyper accepts each of these; we refuse.
const STRICTER: &[(&str, &str, &str)] = &[
    (
        "content-length and transfer-encoding",
        "POST /s HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "RFC 9112 §6.3 allows reading such a request as chunked and closing after it \
         (hyper does); refusing it is the other permitted choice and leaves no \
         request for a front proxy and us to frame differently",
    ),
    (
        "transfer-encoding then content-length",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "as above, in the other order",
    ),
    (
        "gzip then chunked",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        "we forward over HTTP/2, which has no transfer codings: a coding we would \
         have to pass on as a content coding is refused with 501 (RFC 9112 §6.1)",
    ),
    (
        "chunked twice",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        "RFC 9112 §7: a sender must not apply chunked more than once; hyper reads \
         only the last field",
    ),
    (
        "chunk size followed by whitespace",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        "RFC 9112 §7.1 allows whitespace only before a ';' (BWS of chunk-ext); \
         parsers that trim and parsers that stop at the space disagree",
    ),
    (
        "chunk size followed by a tab",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\t\r\nhello\r\n0\r\n\r\n",
        "as above",
    ),
    (
        "chunk extension that is not a token",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n0\r\n\r\n",
        "RFC 9112 §7.1.1: chunk-ext-name is a token, its value a token or a quoted \
         string; hyper skips extensions unread",
    ),
    (
        "chunk extension with an unterminated quoted string",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b\r\nhello\r\n0\r\n\r\n",
        "as above",
    ),
    (
        "trailer section ended by a bare LF",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Sum: 1\r\n\n\
         GET /next HTTP/1.1\r\n\r\n",
        "lines end in CRLF (RFC 9112 §2.2): httparse alone ends the section at the \
         bare LF and sees GET /next as a request, hyper reads on to the next CRLF \
         CRLF and takes it as trailer lines; refusing leaves no such request",
    ),
    (
        "an empty list element before chunked",
        "POST /s HTTP/1.1\r\nTransfer-Encoding: , chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        "RFC 9110 §5.6.1 lets a recipient skip empty list elements, as hyper does \
         here; we refuse them in Transfer-Encoding, where hyper itself reads \
         `chunked,` or an empty last field as not chunked",
    ),
    (
        "CONNECT",
        "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        "tunnels are not proxied (405); hyper hands CONNECT to the service",
    ),
];

/// Both servers, one case: the same requests seen, the same failures.
#[tokio::test]
async fn the_server_loop_reads_requests_as_hyper_does() {
    let _limit = crate::test_support::limit();
    let mut differ = Vec::new();
    let (mut whole, mut failed) = (0, 0);
    for (name, wire) in SAME {
        let (ours, theirs) = (
            run_ours(wire.as_bytes()).await,
            run_hyper(wire.as_bytes()).await,
        );
        if matches!(theirs.seen.first(), Some(Seen::Whole { .. })) {
            whole += 1;
        } else {
            failed += 1;
        }
        if ours.seen != theirs.seen {
            differ.push(format!(
                "{name}: ours {:?} ({}), hyper {:?} ({})",
                ours.seen, ours.first_status, theirs.seen, theirs.first_status
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // The list exercises both verdicts, not one: neither server is
    // refusing (or accepting) everything.
    assert!(
        whole >= 15 && failed >= 15,
        "{whole} read whole, {failed} not"
    );
}

/// The listed cases are stricter, not looser: hyper hands the request to
/// its service, we refuse it with a 4xx/5xx before (or as) the handler
/// could use it, and never frame it otherwise.
#[tokio::test]
async fn where_the_loop_differs_from_hyper_it_is_stricter() {
    let _limit = crate::test_support::limit();
    for (name, wire, why) in STRICTER {
        assert!(!why.is_empty());
        let (ours, theirs) = (
            run_ours(wire.as_bytes()).await,
            run_hyper(wire.as_bytes()).await,
        );
        assert!(
            matches!(theirs.seen.first(), Some(Seen::Whole { .. })),
            "{name}: hyper no longer accepts it ({theirs:?}); move it to SAME"
        );
        assert!(
            ours.seen
                .iter()
                .all(|s| matches!(s, Seen::BodyFailed { .. })),
            "{name}: we handed on {:?}",
            ours.seen
        );
        let status: u16 = ours
            .first_status
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            (400..600).contains(&status),
            "{name}: answered {:?}",
            ours.first_status
        );
    }
}

/// A valid request (HTTP/1.1 or 1.0; no body, a body of known length or
/// a chunked one with extensions and trailers), maybe followed by a
/// pipelined second request.
fn valid_request() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    (
        proptest::sample::select(vec!["GET", "POST", "PUT"]),
        "/[a-z0-9]{0,8}",
        any::<bool>(),
        0u8..3,
        "[a-z]{0,24}",
        proptest::collection::vec(
            (
                "[a-z]{1,12}",
                proptest::sample::select(super::server::tests::CHUNK_EXTENSIONS),
            ),
            0..3,
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(method, target, http10, framing, body, chunks, trailer, pipelined)| {
                let version = if http10 && framing != 2 { "1.0" } else { "1.1" };
                let mut wire = format!("{method} {target} HTTP/{version}\r\nHost: a\r\n");
                if http10 && pipelined {
                    wire.push_str("Connection: keep-alive\r\n");
                }
                match framing {
                    1 => wire.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len())),
                    2 => {
                        wire.push_str("Transfer-Encoding: chunked\r\n\r\n");
                        for (data, ext) in &chunks {
                            wire.push_str(&format!("{:x}{ext}\r\n{data}\r\n", data.len()));
                        }
                        wire.push_str("0\r\n");
                        if trailer {
                            wire.push_str("X-Sum: 1\r\n");
                        }
                        wire.push_str("\r\n");
                    }
                    _ => wire.push_str("\r\n"),
                }
                if pipelined {
                    wire.push_str(&format!("GET /next HTTP/{version}\r\nHost: a\r\n\r\n"));
                }
                wire.into_bytes()
            },
        )
}

/// Whether our reading `ours` of some bytes is hyper's reading `theirs`,
/// or a prefix of it that may end in a body we refused and hyper read.
fn never_looser(ours: &[Seen], theirs: &[Seen]) -> Result<(), String> {
    if ours.len() > theirs.len() {
        return Err("we handed on more requests than hyper".to_owned());
    }
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let stricter_body = match (a, b) {
            (
                Seen::BodyFailed { method, target },
                Seen::Whole {
                    method: m,
                    target: t,
                    ..
                },
            ) => method == m && target == t && i + 1 == ours.len(),
            _ => false,
        };
        if a != b && !stricter_body {
            return Err(format!("request {i} differs"));
        }
    }
    Ok(())
}

const CASES: usize = 1000;

/// Edited requests: we never read one differently from hyper, only stop
/// earlier. The counts prove the edits reach both verdicts.
#[test]
fn edited_requests_are_never_read_more_loosely_than_hyper_reads_them() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let _limit = crate::test_support::limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (handed_on, refused, stricter) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let strategy = (
        valid_request(),
        proptest::collection::vec(super::server::tests::edit(), 0..4),
    );
    let mut runner = proptest::test_runner::TestRunner::new(
        proptest::test_runner::Config::with_cases(CASES as u32),
    );
    runner
        .run(&strategy, |(valid, edits)| {
            let wire = super::server::tests::apply(&valid, &edits);
            let (ours, theirs) = rt.block_on(async {
                let ours = run_ours(&wire).await;
                (ours, run_hyper(&wire).await)
            });
            if let Err(why) = never_looser(&ours.seen, &theirs.seen) {
                return Err(proptest::test_runner::TestCaseError::fail(format!(
                    "{why} for {:?}: ours {:?} ({}), hyper {:?} ({})",
                    String::from_utf8_lossy(&wire),
                    ours.seen,
                    ours.first_status,
                    theirs.seen,
                    theirs.first_status
                )));
            }
            let counter = if ours.seen != theirs.seen {
                &stricter
            } else if ours.seen.iter().any(|s| matches!(s, Seen::Whole { .. })) {
                &handed_on
            } else {
                &refused
            };
            counter.fetch_add(1, Relaxed);
            Ok(())
        })
        .unwrap();
    let counts = [
        ("handed on alike", handed_on.into_inner()),
        ("refused alike", refused.into_inner()),
        ("stopped earlier than hyper", stricter.into_inner()),
    ];
    eprintln!("{counts:?} of {CASES} edited requests");
    assert!(
        counts[0].1 >= CASES / 5 && counts[1].1 >= CASES / 10,
        "the edits do not reach both verdicts: {counts:?}"
    );
}
