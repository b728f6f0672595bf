//! The server loop's unit tests, on loopback connections; the edit
//! strategies here also drive `differential_tests`.

use super::*;
use http_body::Body;
use http_body_util::{BodyExt, Full};
use std::collections::VecDeque;
use std::convert::Infallible;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A response body of several frames whose length is not known up
/// front (so HTTP/1.1 clients get it chunked).
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Echoes `METHOD URI` and the request body; `/chunked` answers in
/// frames with a trailer, and request trailers come back as a header.
async fn echo(req: Request<RequestBody>) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => {
            let mut r = Response::new(
                Full::new(Bytes::from(format!("body error: {e}")))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            );
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    let trailer = collected
        .trailers()
        .and_then(|t| t.get("x-sum"))
        .map(|v| v.to_str().unwrap().to_owned());
    let body = collected.to_bytes();
    let text = format!(
        "{} {} {}",
        parts.method,
        parts.uri,
        String::from_utf8_lossy(&body)
    );
    let mut resp = if parts.uri.path() == "/chunked" {
        let mut t = HeaderMap::new();
        t.insert("x-done", HeaderValue::from_static("yes"));
        Response::new(
            Frames(VecDeque::from([
                Frame::data(Bytes::from(text)),
                Frame::data(Bytes::from_static(b"!")),
                Frame::trailers(t),
            ]))
            .map_err(|n| match n {})
            .boxed_unsync(),
        )
    } else {
        Response::new(
            Full::new(Bytes::from(text))
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
    };
    if let Some(t) = trailer {
        resp.headers_mut()
            .insert("x-got-trailer", HeaderValue::from_str(&t).unwrap());
    }
    let lengths: Vec<&str> = parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    if !lengths.is_empty() {
        resp.headers_mut().insert(
            "x-got-content-length",
            HeaderValue::from_str(&lengths.join("|")).unwrap(),
        );
    }
    if parts.uri.path() == "/close-in-a-list" {
        resp.headers_mut().insert(
            header::CONNECTION,
            HeaderValue::from_static("x-trace, close"),
        );
    }
    resp
}

fn settings() -> Settings {
    Settings {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        yield_every: 0,
    }
}

/// A server running [`serve`] with [`echo`] for each connection.
async fn server(settings: Settings) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let token = CancellationToken::new();
                let _ = serve(s, &settings, &token, echo).await;
            });
        }
    });
    addr
}

/// Sends `raw` and reads until the server closes.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn responses_written_to_the_client_count_as_hand_offs() {
    let _limit = crate::test_support::limit();
    let addr = server(Settings {
        yield_every: 4,
        ..settings()
    })
    .await;
    let before = crate::handoff::yields_on_this_thread();
    let mut raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".repeat(7);
    raw.extend_from_slice(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let got = exchange(addr, &raw).await;
    assert_eq!(got.matches("HTTP/1.1 200").count(), 8, "{got}");
    // The server runs on this test's thread: every 4th response yielded.
    assert_eq!(crate::handoff::yields_on_this_thread() - before, 2);
}

#[tokio::test]
async fn a_response_whose_connection_list_names_close_ends_the_connection() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(
        addr,
        b"GET /close-in-a-list HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(!got.contains("/second"), "answered after close: {got}");
}

#[tokio::test]
async fn pipelined_requests_with_length_and_chunked_bodies_on_one_connection() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(
        addr,
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n\
          GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.contains("content-length: 13\r\n\r\nPOST /a hello"),
        "{got}"
    );
    assert!(got.contains("x-got-trailer: 5\r\n"), "{got}");
    assert!(
        got.contains("content-length: 13\r\n\r\nPOST /b abcde"),
        "{got}"
    );
    // Unknown length: chunked, with the trailer carried.
    assert!(
        got.ends_with(
            "transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             d\r\nGET /chunked \r\n1\r\n!\r\n0\r\nx-done: yes\r\n\r\n"
        ),
        "{got}"
    );
    assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{got}");
}

#[tokio::test]
async fn http10_gets_a_close_delimited_body_and_keep_alive_on_request() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(addr, b"GET /chunked HTTP/1.0\r\n\r\n").await;
    assert!(
        got.contains("connection: close\r\n\r\nGET /chunked !"),
        "{got}"
    );
    assert!(!got.contains("transfer-encoding"), "{got}");

    let got = exchange(
        addr,
        b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    )
    .await;
    assert!(
        got.contains("connection: keep-alive\r\n\r\nGET /1 "),
        "{got}"
    );
    assert!(got.ends_with("connection: close\r\n\r\nGET /2 "), "{got}");
}

#[tokio::test]
async fn smuggling_shapes_and_oversized_heads_are_refused_with_a_status() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    for (raw, status) in [
        (
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                [..],
            "400",
        ),
        (
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
            "400",
        ),
        (
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            "501",
        ),
        (&b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"[..], "405"),
        (&b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"[..], "400"),
    ] {
        let got = exchange(addr, raw).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{:?}: {got}",
            String::from_utf8_lossy(raw)
        );
        assert!(got.contains("connection: close"), "{got}");
        assert!(got.contains("x-elsinore-error: protocol"), "{got}");
    }
    let mut big = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
    big.extend_from_slice(b"\r\n\r\n");
    let got = exchange(addr, &big).await;
    assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
}

#[tokio::test]
async fn malformed_chunked_body_fails_the_request_and_closes() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(
        addr,
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n\
          GET /never HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
    assert!(got.contains("malformed chunked request body"), "{got}");
    assert!(
        !got.contains("/never"),
        "nothing after a broken body is served: {got}"
    );
}

#[tokio::test]
async fn expect_continue_gets_100_before_the_body_is_sent() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /up HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"ok").await.unwrap();
    let mut rest = vec![0u8; 512];
    let n = s.read(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest[..n]);
    assert!(rest.starts_with("HTTP/1.1 200 OK"), "{rest}");
    assert!(rest.ends_with("PUT /up ok"), "{rest}");
}

#[tokio::test]
async fn head_response_has_length_but_no_body() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(addr, b"HEAD /h HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(got.contains("content-length: 8\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\n"), "{got}");
}

#[tokio::test]
async fn idle_and_slow_head_connections_are_closed() {
    let _limit = crate::test_support::limit();
    let addr = server(Settings {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        yield_every: 0,
    })
    .await;
    // Idle after one request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("idle connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200 OK"));
    // A head that never ends.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("slow head closed")
        .unwrap();
    assert!(out.is_empty());
}

/// A server connection and its client, for tests that run [`serve`]
/// themselves.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    (server, client)
}

const SLOW_HEAD: Settings = Settings {
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(3600),
    yield_every: 0,
};

/// Before its first request a connection gets the header timeout, not
/// the (much longer) idle timeout: a client that connects and sends
/// nothing holds its slot for `header_timeout`.
#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let _limit = crate::test_support::limit();
    let (server, mut client) = pair().await;
    let started = tokio::time::Instant::now();
    let token = CancellationToken::new();
    let served = serve(server, &SLOW_HEAD, &token, echo).await;
    assert!(
        matches!(served, Err(ConnError::HeadTimeout(t)) if t == SLOW_HEAD.header_timeout),
        "{served:?}"
    );
    assert_eq!(started.elapsed(), SLOW_HEAD.header_timeout);
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert!(out.is_empty(), "{out:?}");
}

/// The first head is due `header_timeout` after the connection opened,
/// however late its first byte came: a client that waits, then
/// trickles, cannot stretch it.
#[tokio::test(start_paused = true)]
async fn the_first_head_is_due_from_the_connection_start_not_its_first_byte() {
    let _limit = crate::test_support::limit();
    let (server, mut client) = pair().await;
    let started = tokio::time::Instant::now();
    let trickle = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        client.write_all(b"GET / HT").await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Past the deadline: the server may be gone.
        let _ = client.write_all(b"TP/1.1\r\nHost: x\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        out
    });
    let token = CancellationToken::new();
    let served = serve(server, &SLOW_HEAD, &token, echo).await;
    assert!(
        matches!(served, Err(ConnError::HeadTimeout(_))),
        "{served:?}"
    );
    assert_eq!(started.elapsed(), SLOW_HEAD.header_timeout);
    let out = trickle.await.unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("200"), "{out:?}");
}

/// After the first request, an idle keep-alive connection gets the idle
/// timeout, not the header timeout.
#[tokio::test(start_paused = true)]
async fn after_the_first_request_the_idle_timeout_applies() {
    let _limit = crate::test_support::limit();
    let (server, mut client) = pair().await;
    client
        .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let token = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let served = serve(server, &SLOW_HEAD, &token, echo).await;
    assert!(matches!(served, Ok(Served::Closed)), "{served:?}");
    assert_eq!(started.elapsed(), SLOW_HEAD.idle_timeout);
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).ends_with("GET /1 "),
        "{out:?}"
    );
}

/// RFC 9112 §6.3 / RFC 9110 §8.6, as hyper's server: repeated
/// identical `Content-Length` fields reach the handler (what egress
/// forwards) as one field; a list in one field and differing values
/// are refused.
#[tokio::test]
async fn repeated_content_lengths_are_folded_and_lists_refused() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(
        addr,
        b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello\
          GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("x-got-content-length: 5\r\n"), "{got}");
    assert!(got.contains("POST /cl hello"), "{got}");
    assert!(got.ends_with("GET /next "), "{got}");
    for raw in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5,5\r\n\r\nhello"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\nhello"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"[..],
    ] {
        let got = exchange(addr, raw).await;
        assert!(
            got.starts_with("HTTP/1.1 400 "),
            "{:?}: {got}",
            String::from_utf8_lossy(raw)
        );
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(!got.contains("hello"), "{got}");
    }
}

/// RFC 9112 §6.1: `Transfer-Encoding` in HTTP/1.0 is faulty framing;
/// refused (as hyper does) and the connection is not reused.
#[tokio::test]
async fn http10_with_transfer_encoding_is_refused_and_closed() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    let got = exchange(
        addr,
        b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n\
          GET /never HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
    assert!(got.contains("HTTP/1.0"), "the reason names it: {got}");
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(!got.contains("/never"), "{got}");
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
}

/// Chunk-size lines with whitespace around the size, or ending in a
/// bare LF, fail the request; the connection is not read further.
#[tokio::test]
async fn loose_chunk_size_lines_fail_the_request() {
    let _limit = crate::test_support::limit();
    let addr = server(settings()).await;
    for line in ["5 \r\n", " 5\r\n", "5;ext\n", "5\n", "5\t\r\n"] {
        let raw = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{line}hello\r\n0\r\n\r\n\
             GET /never HTTP/1.1\r\n\r\n"
        );
        let got = exchange(addr, raw.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{line:?}: {got}");
        assert!(got.contains("malformed chunked request body"), "{got}");
        assert!(!got.contains("hello"), "{line:?}: {got}");
        assert!(!got.contains("/never"), "{line:?}: {got}");
    }
}

#[tokio::test]
async fn an_h2c_preface_is_handed_back_unread() {
    let _limit = crate::test_support::limit();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let token = CancellationToken::new();
    let served = serve(server, &settings(), &token, echo).await.unwrap();
    let Served::H2Preface(mut tcp) = served else {
        panic!("expected the connection back, got {served:?}");
    };
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
}

/// One edit of a byte string; indexes are taken modulo its length.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    Flip(proptest::sample::Index, u8),
    Insert(proptest::sample::Index, u8),
    Delete(proptest::sample::Index),
    Truncate(proptest::sample::Index),
    /// A whole field line inserted at the start of a line.
    InsertLine(proptest::sample::Index, &'static str),
}

/// Chunk extensions (RFC 9112 7.1.1), with and without values, quoted
/// strings and whitespace before the semicolon.
pub(crate) const CHUNK_EXTENSIONS: &[&str] = &[
    "",
    ";a",
    ";name=value",
    ";a=1;b=2",
    ";q=\"x y;z\"",
    " ;x=y",
    "\t;x",
];

/// Field lines that matter to our checks after httparse: framing,
/// expectations, connection options, and names or values that the
/// `http` crate refuses.
const LINES: &[&str] = &[
    "Content-Length: 5\r\n",
    "Content-Length: 5, 6\r\n",
    "Content-Length: -1\r\n",
    "Content-Length: 99999999999999999999\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Transfer-Encoding: gzip, chunked\r\n",
    "Transfer-Encoding: \r\n",
    "Expect: 100-continue\r\n",
    "Connection: close\r\n",
    "X-Ok: \x7f\r\n",
    "X-Ok: a\x01b\r\n",
    "X-Sp ace: v\r\n",
];

/// Bytes that matter to an HTTP/1.1 parser, inserted more often than
/// any other byte.
fn edit_byte() -> impl proptest::strategy::Strategy<Value = u8> {
    use proptest::prelude::*;
    prop_oneof![
        proptest::sample::select(b"\r\n :;,\t\"\x00\x7f\xff0aZ".to_vec()),
        any::<u8>(),
    ]
}

pub(crate) fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
    use proptest::prelude::*;
    prop_oneof![
        (any::<proptest::sample::Index>(), 0u8..8).prop_map(|(i, bit)| Edit::Flip(i, 1 << bit)),
        (any::<proptest::sample::Index>(), edit_byte()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<proptest::sample::Index>().prop_map(Edit::Delete),
        any::<proptest::sample::Index>().prop_map(Edit::Truncate),
        (
            any::<proptest::sample::Index>(),
            proptest::sample::select(LINES)
        )
            .prop_map(|(i, line)| Edit::InsertLine(i, line)),
    ]
}

/// Applies `edits` to `bytes` (an edit of an empty string inserts or does nothing).
pub(crate) fn apply(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for e in edits {
        let len = out.len();
        match e {
            Edit::Insert(i, b) => out.insert(i.index(len + 1), *b),
            Edit::InsertLine(i, line) => {
                // After the request line, before the end of the head.
                let starts: Vec<usize> = (1..len)
                    .filter(|&at| out[at - 1] == b'\n' && at + 2 < len)
                    .collect();
                let at = if starts.is_empty() {
                    len
                } else {
                    starts[i.index(starts.len())]
                };
                out.splice(at..at, line.bytes());
            }
            _ if len == 0 => {}
            Edit::Flip(i, mask) => out[i.index(len)] ^= mask,
            Edit::Delete(i) => {
                out.remove(i.index(len));
            }
            Edit::Truncate(i) => out.truncate(i.index(len)),
        }
    }
    out
}

/// A valid request head and what it says.
#[derive(Debug, Clone)]
struct ValidHead {
    wire: Vec<u8>,
    method: &'static str,
    target: String,
    fields: Vec<(String, String)>,
    framing: Framing,
}

fn valid_head() -> impl proptest::strategy::Strategy<Value = ValidHead> {
    use proptest::prelude::*;
    (
        proptest::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
        ]),
        "/[a-z0-9._~/-]{0,16}(\\?[a-z0-9=&]{1,12})?",
        "[a-z0-9.-]{1,16}(:[0-9]{1,5})?",
        proptest::collection::btree_map("x-[a-z0-9-]{1,10}", "[!-~]([ -~]{0,20}[!-~])?", 0..6),
        prop_oneof![
            Just(Framing::Length(0)),
            (0u64..100_000).prop_map(Framing::Length),
            Just(Framing::Chunked(Chunk::Size)),
        ],
        any::<bool>(),
    )
        .prop_map(|(method, target, host, extra, framing, explicit_zero)| {
            let mut fields = vec![("host".to_owned(), host)];
            fields.extend(extra);
            match framing {
                Framing::Length(0) if !explicit_zero => {}
                Framing::Length(n) => fields.push(("content-length".into(), n.to_string())),
                Framing::Chunked(_) => {
                    fields.push(("transfer-encoding".into(), "chunked".into()));
                }
            }
            let mut wire = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
            for (name, value) in &fields {
                wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            ValidHead {
                wire,
                method,
                target,
                fields,
                framing,
            }
        })
}

/// The parser on valid heads, on their prefixes, and on valid heads
/// with a few bytes flipped, inserted, deleted or cut off: a valid head
/// parses to exactly what it says; a prefix asks for more; an edited head
/// is refused with a 4xx/501 and a reason, or asks for more, or parses
/// to a head whose own bytes parse the same way again. The counts at the
/// end prove the edits reach past httparse into the checks of our own.
#[test]
fn heads_parse_exactly_and_edited_heads_are_refused_or_consistent() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let (partial, parsed, refused_by_httparse, refused_by_us) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let strategy = (
        valid_head(),
        any_prefix(),
        proptest::collection::vec(edit(), 1..4),
    );
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(1024));
    runner
        .run(&strategy, |(valid, prefix, edits)| {
            use proptest::prop_assert;
            use proptest::prop_assert_eq;
            // The valid head, exactly.
            let Ok(Some((head, len))) = parse_head(&valid.wire) else {
                return Err(proptest::test_runner::TestCaseError::fail(
                    "a valid head was not parsed",
                ));
            };
            prop_assert_eq!(len, valid.wire.len());
            prop_assert_eq!(head.method.as_str(), valid.method);
            prop_assert_eq!(head.uri.to_string(), valid.target.clone());
            prop_assert_eq!(head.version, Version::HTTP_11);
            prop_assert_eq!(head.framing, valid.framing);
            prop_assert!(head.keep_alive);
            prop_assert!(!head.expect_continue);
            for (name, value) in &valid.fields {
                if name == "transfer-encoding" {
                    prop_assert!(!head.headers.contains_key(name));
                } else {
                    prop_assert_eq!(
                        head.headers.get(name).map(|v| v.as_bytes()),
                        Some(value.as_bytes()),
                        "{}",
                        name
                    );
                }
            }
            // Followed by anything: the same head, the rest left alone.
            let mut pipelined = valid.wire.clone();
            pipelined.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            prop_assert!(matches!(parse_head(&pipelined), Ok(Some((_, l))) if l == len));
            // A strict prefix: more bytes needed.
            let cut = prefix.index(valid.wire.len());
            prop_assert!(
                matches!(parse_head(&valid.wire[..cut]), Ok(None)),
                "prefix of {} bytes",
                cut
            );

            let edited = apply(&valid.wire, &edits);
            match parse_head(&edited) {
                Ok(None) => {
                    partial.fetch_add(1, Relaxed);
                }
                Ok(Some((head, len))) => {
                    parsed.fetch_add(1, Relaxed);
                    prop_assert!(len <= edited.len());
                    prop_assert!(edited[..len].ends_with(b"\n"));
                    let again = parse_head(&edited[..len]);
                    let Ok(Some((again, again_len))) = again else {
                        return Err(proptest::test_runner::TestCaseError::fail(
                            "its own bytes did not parse again",
                        ));
                    };
                    prop_assert_eq!(again_len, len);
                    prop_assert_eq!(&again.method, &head.method);
                    prop_assert_eq!(&again.uri, &head.uri);
                    prop_assert_eq!(again.framing, head.framing);
                    prop_assert!(!head.headers.contains_key(header::TRANSFER_ENCODING));
                    prop_assert!(!head.headers.contains_key(header::EXPECT));
                    prop_assert!(head.method != Method::CONNECT);
                }
                Err(HeadError::Refused(status, why)) => {
                    prop_assert!(
                        status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED,
                        "{} {}",
                        status,
                        why
                    );
                    prop_assert!(!why.is_empty());
                    if why.starts_with("malformed request head") {
                        refused_by_httparse.fetch_add(1, Relaxed);
                    } else {
                        refused_by_us.fetch_add(1, Relaxed);
                    }
                }
                Err(HeadError::Closed | HeadError::Io(_)) => {
                    return Err(proptest::test_runner::TestCaseError::fail(
                        "parse_head reported I/O",
                    ));
                }
            }
            Ok(())
        })
        .unwrap();
    let counts = [
        ("asked for more", partial.into_inner()),
        ("parsed", parsed.into_inner()),
        ("refused by httparse", refused_by_httparse.into_inner()),
        ("refused by our checks", refused_by_us.into_inner()),
    ];
    eprintln!("{counts:?} of 1024 edited heads");
    // Each outcome is common (the rarest, refusals by our checks, is
    // about a tenth of the cases); 2% leaves room for chance.
    for (outcome, n) in counts {
        assert!(
            n >= 20,
            "only {n} of 1024 edited heads {outcome}: {counts:?}"
        );
    }
}

fn any_prefix() -> impl proptest::strategy::Strategy<Value = proptest::sample::Index> {
    proptest::prelude::any::<proptest::sample::Index>()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Chunked bodies of any shape, with chunk extensions, sizes in
    /// either case with leading zeros, and a trailer section, sent in
    /// pieces of any size, arrive whole and in order with their
    /// trailers, and the request after them is served too.
    #[test]
    fn chunked_bodies_arrive_whole_whatever_the_read_boundaries(
        chunks in proptest::collection::vec(
            (
                proptest::collection::vec(b'a'..=b'z', 1..300),
                proptest::sample::select(CHUNK_EXTENSIONS),
                proptest::prelude::any::<bool>(),
                0usize..3,
            ),
            0..8,
        ),
        last_extension in proptest::sample::select(CHUNK_EXTENSIONS),
        sum in "[a-z0-9]{1,12}",
        other_trailers in proptest::collection::vec(("x-t[a-z]{1,6}", "[!-~]{1,10}"), 0..3),
        piece in 1usize..64,
    ) {
        let mut wire = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut expected = Vec::new();
        for (c, extension, upper, zeros) in &chunks {
            let size = if *upper { format!("{:X}", c.len()) } else { format!("{:x}", c.len()) };
            wire.extend_from_slice(format!("{}{size}{extension}\r\n", "0".repeat(*zeros)).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
            expected.extend_from_slice(c);
        }
        wire.extend_from_slice(format!("0{last_extension}\r\n").as_bytes());
        for (name, value) in &other_trailers {
            wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        wire.extend_from_slice(format!("X-Sum: {sum}\r\n\r\n").as_bytes());
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\nConnection: close\r\n\r\n");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(async {
            let addr = server(settings()).await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            for part in wire.chunks(piece) {
                s.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8(out).unwrap()
        });
        let body = format!("POST /c {}", String::from_utf8(expected).unwrap());
        proptest::prop_assert!(got.contains(&format!("content-length: {}\r\n\r\n{body}", body.len())), "{}", got);
        // The echo reports the request's `x-sum` trailer as a header.
        proptest::prop_assert!(got.contains(&format!("x-got-trailer: {sum}\r\n")), "{}", got);
        proptest::prop_assert!(got.ends_with("GET /next "), "{}", got);
    }
}

/// The framing rules on heads alone (the server tests above show them on
/// the wire).
#[test]
fn framing_of_request_heads() {
    let framing = |raw: &str| parse_head(raw.as_bytes()).map(|h| h.map(|(h, _)| h));
    let head = framing("POST / HTTP/1.1\r\nContent-Length: 07\r\ncontent-length: 7\r\n\r\n")
        .ok()
        .flatten()
        .unwrap();
    assert_eq!(head.framing, Framing::Length(7));
    let lengths: Vec<_> = head
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    assert_eq!(lengths, ["07"]);
    // A single field is passed on as it came.
    let head = framing("POST / HTTP/1.1\r\nContent-Length: 007\r\n\r\n")
        .ok()
        .flatten()
        .unwrap();
    assert_eq!(head.headers[header::CONTENT_LENGTH], "007");
    for (raw, status) in [
        ("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
        (
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            400,
        ),
        ("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (
            "POST / HTTP/1.0\r\nTransfer-Encoding: identity\r\n\r\n",
            400,
        ),
        ("POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n", 400),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: , chunked\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            501,
        ),
    ] {
        match framing(raw) {
            Err(HeadError::Refused(s, why)) => assert_eq!(s.as_u16(), status, "{raw:?}: {why}"),
            Ok(h) => panic!("{raw:?} accepted: {:?}", h.map(|h| h.framing)),
            Err(_) => panic!("{raw:?}: not refused"),
        }
    }
}
