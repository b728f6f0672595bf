//! The client's unit tests, against scripted raw HTTP/1.1 backends on
//! loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::HeaderValue;
use http_body::Frame;
use tokio::io::AsyncReadExt;

use super::pool::still_open;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::net::TcpListener;

use super::*;
use crate::http::BytesBody;

/// What the scripted backend does with one request.
enum Act {
    Reply(&'static str),
    /// Reply, then close the connection.
    ReplyClose(&'static str),
    /// Close without a byte of response.
    Close,
}

/// A raw HTTP/1.1 backend on loopback: each request is answered as the
/// script says for (connection number, request number on it); records
/// every request as received and counts accepted connections.
struct Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn backend<F>(script: F) -> Backend
where
    F: Fn(usize, usize) -> Act + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (a, s) = (Arc::clone(&accepts), Arc::clone(&seen));
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = l.accept().await.unwrap();
            let conn_no = a.fetch_add(1, Ordering::SeqCst);
            let (s, script) = (Arc::clone(&s), Arc::clone(&script));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for req_no in 0.. {
                    let Some(req) = read_request(&mut tcp, &mut buf).await else {
                        return;
                    };
                    s.lock().unwrap().push(req);
                    match script(conn_no, req_no) {
                        Act::Reply(r) => tcp.write_all(r.as_bytes()).await.unwrap(),
                        Act::ReplyClose(r) => {
                            tcp.write_all(r.as_bytes()).await.unwrap();
                            return;
                        }
                        Act::Close => return,
                    }
                }
            });
        }
    });
    Backend {
        addr,
        accepts,
        seen,
    }
}

/// One whole request (head and a content-length or chunked body).
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let find = |b: &[u8], pat: &[u8]| b.windows(pat.len()).position(|w| w == pat);
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_lowercase();
            let body_len = if head.contains("transfer-encoding: chunked") {
                // Ends with the last chunk and an empty trailer line.
                find(&buf[end + 4..], b"0\r\n")
                    .and_then(|z| find(&buf[end + 4 + z..], b"\r\n\r\n").map(|t| z + t + 4))
            } else {
                let n = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                (buf.len() >= end + 4 + n).then_some(n)
            };
            if let Some(n) = body_len {
                let req: Vec<u8> = buf.drain(..end + 4 + n).collect();
                return Some(String::from_utf8(req).unwrap());
            }
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Connects to one loopback backend, with the errors the gateway's
/// backend list gives for one.
struct To(SocketAddr);

impl Connect for To {
    fn connect(&self, timeout: Duration) -> Connecting<'_> {
        let addr = self.0;
        Box::pin(async move {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(io)) => {
                    let _ = io.set_nodelay(true);
                    Ok((io, addr.to_string()))
                }
                Ok(Err(e)) => Err(ProxyError::upstream(
                    ErrorKind::ConnectFailed,
                    format!("no backend accepted the connection: {addr}: {e}"),
                )),
                Err(_) => Err(ProxyError::upstream(
                    ErrorKind::ConnectTimeout,
                    format!("no backend accepted the connection: {addr}: timed out"),
                )),
            }
        })
    }
}

/// A client of the backend at `addr` with the gateway's default cap.
fn settings(connect_timeout: Duration, idle_timeout: Duration) -> Settings {
    Settings {
        connect_timeout,
        idle_timeout,
        max_connections: 1024,
    }
}

fn client(addr: SocketAddr) -> H1Client {
    // No test here is about the connect timeout: generous, so that a
    // burst of hundreds of loopback connects on a loaded machine (one
    // runtime thread, a busy core) is not mistaken for a dead backend.
    H1Client::new(
        Arc::new(To(addr)),
        settings(Duration::from_secs(20), Duration::from_secs(60)),
    )
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header(header::HOST, "svc.mesh-a.global")
        .body(Empty::new())
        .unwrap()
}

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test step timed out")
}

async fn send<B>(c: &H1Client, req: Request<B>) -> Result<Response<ResponseBody>, ProxyError>
where
    B: BytesBody + Send,
{
    bounded(c.send(req)).await
}

async fn text(resp: Response<ResponseBody>) -> String {
    let bytes = bounded(resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

const OK_HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello";

#[tokio::test]
async fn content_length_response_is_read_and_the_connection_pooled() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = client(b.addr);
    let resp = send(&c, get("http://ignored.example/reviews/1?x=y"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-a"], "1");
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    assert_eq!(c.idle(), 0, "the body still owns the connection");
    assert_eq!(text(resp).await, "hello");
    assert_eq!(c.idle(), 1);
    let seen = b.seen.lock().unwrap().clone();
    // Origin-form, the Host header as given.
    assert_eq!(
        seen[0],
        "GET /reviews/1?x=y HTTP/1.1\r\nhost: svc.mesh-a.global\r\n\r\n"
    );
}

#[tokio::test]
async fn host_is_added_from_the_uri_when_missing() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = client(b.addr);
    let req = Request::builder()
        .uri("http://svc.mesh-a.global:8080/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    text(send(&c, req).await.unwrap()).await;
    let seen = b.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        "GET / HTTP/1.1\r\nhost: svc.mesh-a.global:8080\r\n\r\n"
    );
}

#[tokio::test]
async fn chunked_response_passes_its_trailers_on() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| {
        Act::Reply(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: done\r\ngrpc-status: 0\r\n\r\n",
        )
    })
    .await;
    let c = client(b.addr);
    let resp = send(&c, get("/")).await.unwrap();
    assert_eq!(resp.body().size_hint().exact(), None);
    let collected = bounded(resp.into_body().collect()).await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers frame");
    assert_eq!(trailers["x-t"], "done");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "hello world");
    assert_eq!(c.idle(), 1);
}

#[tokio::test]
async fn close_delimited_response_is_read_to_eof_and_not_reused() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::ReplyClose("HTTP/1.1 200 OK\r\n\r\nuntil the end")).await;
    let c = client(b.addr);
    for _ in 0..2 {
        let resp = send(&c, get("/")).await.unwrap();
        assert_eq!(text(resp).await, "until the end");
        assert_eq!(c.idle(), 0);
    }
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);

    // A length-framed response that says close is not pooled either.
    let b = backend(|_, _| {
        Act::Reply("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    let c = client(b.addr);
    assert_eq!(text(send(&c, get("/")).await.unwrap()).await, "ok");
    assert_eq!(c.idle(), 0);
}

#[tokio::test]
async fn head_and_204_have_no_body_and_keep_the_connection() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, n| {
        Act::Reply(match n {
            0 => "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
            1 => "HTTP/1.1 204 No Content\r\n\r\n",
            _ => "HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
        })
    })
    .await;
    let c = client(b.addr);
    let mut head = get("/");
    *head.method_mut() = Method::HEAD;
    let resp = send(&c, head).await.unwrap();
    assert!(resp.body().is_end_stream());
    // Pooled at once: nothing left to read.
    assert_eq!(c.idle(), 1);
    assert_eq!(text(resp).await, "");

    for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
        let resp = send(&c, get("/")).await.unwrap();
        assert_eq!(resp.status(), status);
        assert!(resp.body().is_end_stream());
        assert_eq!(text(resp).await, "");
    }
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

/// A bodiless response that declares a body: a `HEAD` answered with
/// the GET's length (as it should be), or a 204 or 304 with one. A
/// backend may send those bytes, and maybe late, once the connection
/// is back in the pool; here they come at the worst time, after the
/// next request went out on the same connection, and they are a
/// complete response of their own. They must never be read as the
/// next request's response.
#[tokio::test]
async fn a_body_after_a_bodiless_response_never_reaches_the_next_request() {
    let _limit = crate::test_support::limit();
    const SMUGGLED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil";
    for (method, status_line) in [
        (Method::HEAD, "HTTP/1.1 200 OK"),
        (Method::GET, "HTTP/1.1 204 No Content"),
        (Method::GET, "HTTP/1.1 304 Not Modified"),
    ] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepts);
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = l.accept().await.unwrap();
                let first = count.fetch_add(1, Ordering::SeqCst) == 0;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut tcp, &mut buf).await.is_some() {
                        if !first {
                            tcp.write_all(OK_HELLO.as_bytes()).await.unwrap();
                            continue;
                        }
                        let head = format!(
                            "{status_line}\r\nContent-Length: {}\r\n\r\n",
                            SMUGGLED.len()
                        );
                        tcp.write_all(head.as_bytes()).await.unwrap();
                        // The "body", once the next request is here.
                        if read_request(&mut tcp, &mut buf).await.is_some() {
                            let _ = tcp.write_all(SMUGGLED.as_bytes()).await;
                        }
                        return;
                    }
                });
            }
        });
        let c = client(addr);
        let mut first = get("/first");
        *first.method_mut() = method.clone();
        let resp = send(&c, first).await.unwrap();
        assert!(resp.body().is_end_stream(), "{method} {status_line}");
        assert_eq!(text(resp).await, "");
        assert_eq!(c.idle(), 0, "{method} {status_line}: not pooled");
        let resp = send(&c, get("/second")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            text(resp).await,
            "hello",
            "after {method} {status_line}: the second request's own response"
        );
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn interim_100_continue_is_skipped_and_101_refused() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, n| {
        Act::Reply(if n == 0 {
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        } else {
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        })
    })
    .await;
    let c = client(b.addr);
    let resp = send(&c, get("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("link"));
    assert_eq!(text(resp).await, "ok");

    let err = send(&c, get("/")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Protocol);
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(err.message.contains("upgrades are not proxied"), "{err}");
}

#[tokio::test]
async fn a_burst_keeps_its_connections_for_the_next_burst() {
    let _limit = crate::test_support::limit();
    // As many requests at once as a busy HTTP/2 peer runs: each holds a
    // backend connection until its body is read; all go back to the
    // pool, and the next burst opens none.
    const BURST: usize = 300;
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = Arc::new(client(b.addr));
    for round in 0..2 {
        let sends = (0..BURST).map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { send(&c, get("/")).await.unwrap() })
        });
        let mut heads = Vec::new();
        for s in sends.collect::<Vec<_>>() {
            heads.push(s.await.unwrap());
        }
        for resp in heads {
            assert_eq!(text(resp).await, "hello");
        }
        assert_eq!(c.idle(), BURST, "round {round}: every connection pooled");
    }
    assert_eq!(b.accepts.load(Ordering::SeqCst), BURST);
}

#[tokio::test]
async fn backend_connections_are_capped_and_requests_beyond_wait() {
    let _limit = crate::test_support::limit();
    const CAP: usize = 2;
    const REQUESTS: usize = 8;
    // Holds every response until released; counts connections and the
    // requests in hand.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    {
        let (accepts, arrived) = (Arc::clone(&accepts), Arc::clone(&arrived));
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = l.accept().await.unwrap();
                accepts.fetch_add(1, Ordering::SeqCst);
                let arrived = Arc::clone(&arrived);
                let mut released = released.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut tcp, &mut buf).await.is_some() {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        released.wait_for(|r| *r).await.unwrap();
                        tcp.write_all(OK_HELLO.as_bytes()).await.unwrap();
                    }
                });
            }
        });
    }
    let c = Arc::new(H1Client::new(
        Arc::new(To(addr)),
        Settings {
            max_connections: CAP,
            ..settings(Duration::from_secs(2), Duration::from_secs(60))
        },
    ));
    let sends: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { text(send(&c, get("/")).await.unwrap()).await })
        })
        .collect();
    crate::test_support::wait_until(
        "the capped connections to carry their requests",
        crate::test_support::WAIT,
        || {
            let n = arrived.load(Ordering::SeqCst);
            std::future::ready(if n >= CAP {
                Ok(())
            } else {
                Err(format!("{n} requests at the backend"))
            })
        },
    )
    .await;
    release.send(true).unwrap();
    for s in sends {
        assert_eq!(s.await.unwrap(), "hello");
    }
    assert_eq!(arrived.load(Ordering::SeqCst), REQUESTS);
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        CAP,
        "{REQUESTS} requests at once over at most {CAP} connections"
    );
    assert_eq!(c.idle(), CAP);
}

#[tokio::test]
async fn sequential_requests_reuse_one_backend_connection() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = client(b.addr);
    for _ in 0..3 {
        let resp = send(&c, get("/")).await.unwrap();
        assert_eq!(text(resp).await, "hello");
    }
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(b.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_body_dropped_early_closes_the_connection() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = client(b.addr);
    drop(send(&c, get("/")).await.unwrap());
    assert_eq!(c.idle(), 0);
    text(send(&c, get("/")).await.unwrap()).await;
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
}

/// Waits (bounded) until the newest pooled connection is seen closed.
async fn until_pooled_seen_closed(c: &H1Client) {
    crate::test_support::wait_until(
        "the backend's close to reach the pooled connection",
        crate::test_support::WAIT,
        || {
            let idle = c.inner.pool.idle.lock().unwrap();
            let open = idle.last().is_some_and(|e| still_open(&e.conn.io));
            std::future::ready(if open {
                Err("still open".to_owned())
            } else {
                Ok(())
            })
        },
    )
    .await;
}

#[tokio::test]
async fn pooled_connection_closed_by_the_backend_is_replaced() {
    let _limit = crate::test_support::limit();
    // Closes each connection after its first response, as a backend
    // with a short keep-alive timeout does.
    let b = backend(|_, _| Act::ReplyClose(OK_HELLO)).await;
    let c = client(b.addr);
    assert_eq!(text(send(&c, get("/")).await.unwrap()).await, "hello");
    assert_eq!(c.idle(), 1, "the response said nothing of closing");
    until_pooled_seen_closed(&c).await;
    // Seen closed at checkout, so even a request with a body (which
    // could not be retried) goes out on a new connection.
    let post = Request::post("/")
        .header(header::HOST, "svc")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    assert_eq!(text(send(&c, post).await.unwrap()).await, "hello");
    until_pooled_seen_closed(&c).await;
    assert_eq!(text(send(&c, get("/")).await.unwrap()).await, "hello");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn connections_idle_past_the_idle_timeout_are_not_reused() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = H1Client::new(
        Arc::new(To(b.addr)),
        settings(Duration::from_secs(2), Duration::from_millis(100)),
    );
    text(send(&c, get("/")).await.unwrap()).await;
    text(send(&c, get("/")).await.unwrap()).await;
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
    // Time passing, not an ordering wait: the idle timeout is 100 ms,
    // and whatever the load, 250 ms have then passed.
    tokio::time::sleep(Duration::from_millis(250)).await;
    text(send(&c, get("/")).await.unwrap()).await;
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
    assert_eq!(c.idle(), 1, "the expired one was dropped, the new one kept");
}

#[tokio::test]
async fn request_on_a_connection_closing_under_it_is_retried_once() {
    let _limit = crate::test_support::limit();
    // The first connection answers one request, then takes the second
    // and closes without a byte (the race of a keep-alive timeout).
    let b = backend(|conn, n| match (conn, n) {
        (0, 0) => Act::Reply(OK_HELLO),
        (0, _) => Act::Close,
        _ => Act::Reply(OK_HELLO),
    })
    .await;
    let c = client(b.addr);
    assert_eq!(text(send(&c, get("/1")).await.unwrap()).await, "hello");
    assert_eq!(text(send(&c, get("/2")).await.unwrap()).await, "hello");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 2);
    let seen = b.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "/2 was sent twice: {seen:?}");
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_after_being_written_whole() {
    let _limit = crate::test_support::limit();
    for (method, retried) in [
        (Method::POST, false),
        (Method::PATCH, false),
        (Method::from_bytes(b"PURGE").unwrap(), false),
        (Method::DELETE, true),
        (Method::PUT, true),
        (Method::OPTIONS, true),
    ] {
        // The pooled connection takes the second request whole, then
        // closes without answering: the backend may have acted on it.
        let b = backend(|conn, n| match (conn, n) {
            (0, 0) => Act::Reply(OK_HELLO),
            (0, _) => Act::Close,
            _ => Act::Reply(OK_HELLO),
        })
        .await;
        let c = client(b.addr);
        assert_eq!(text(send(&c, get("/1")).await.unwrap()).await, "hello");
        let req = Request::builder()
            .method(method.clone())
            .uri("/2")
            .header(header::HOST, "svc")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let sent = send(&c, req).await;
        let seen: Vec<String> = b.seen.lock().unwrap().clone();
        let times = seen
            .iter()
            .filter(|r| r.starts_with(&format!("{method} /2 ")))
            .count();
        if retried {
            assert_eq!(text(sent.unwrap()).await, "hello", "{method}");
            assert_eq!(times, 2, "{method} goes again: {seen:?}");
        } else {
            let err = sent.unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{method}");
            assert!(
                err.message.contains("connection closed before a response"),
                "{method}: {err}"
            );
            assert_eq!(times, 1, "{method} is sent once only: {seen:?}");
            assert_eq!(b.accepts.load(Ordering::SeqCst), 1, "{method}");
        }
    }
}

#[tokio::test]
async fn request_with_a_body_is_not_retried() {
    let _limit = crate::test_support::limit();
    let b = backend(|conn, n| match (conn, n) {
        (0, 0) => Act::Reply(OK_HELLO),
        (0, _) => Act::Close,
        _ => Act::Reply(OK_HELLO),
    })
    .await;
    let c = client(b.addr);
    assert_eq!(text(send(&c, get("/1")).await.unwrap()).await, "hello");
    let post = Request::post("/2")
        .body(Full::new(Bytes::from_static(b"once only")))
        .unwrap();
    let err = send(&c, post).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(
        err.message.contains("connection closed before a response"),
        "{err}"
    );
    assert!(err.message.contains(&b.addr.to_string()), "{err}");
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_responses_are_clear_502s() {
    let _limit = crate::test_support::limit();
    for (raw, why) in [
        ("HTTP/1.1 abc OK\r\n\r\n", "malformed response head"),
        ("SMTP ready\r\n\r\n", "malformed response head"),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
            "conflicting response content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "invalid response content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both content-length and transfer-encoding",
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "other than chunked",
        ),
    ] {
        let b = backend(move |_, _| Act::ReplyClose(raw)).await;
        let c = client(b.addr);
        let err = send(&c, get("/")).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Protocol, "{raw:?}: {err}");
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert!(err.message.contains(why), "{raw:?}: {err}");
        assert!(err.message.contains(&b.addr.to_string()), "{err}");
    }
}

#[tokio::test]
async fn malformed_chunked_body_is_an_error_and_not_pooled() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| {
        Act::Reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")
    })
    .await;
    let c = client(b.addr);
    let resp = send(&c, get("/")).await.unwrap();
    let err = bounded(resp.into_body().collect()).await.unwrap_err();
    assert!(
        err.to_string().contains("malformed chunked response body"),
        "{err}"
    );
    assert_eq!(c.idle(), 0);
}

#[tokio::test]
async fn connect_failure_names_the_backend() {
    let _limit = crate::test_support::limit();
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = send(&client(dead), get("/")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ConnectFailed);
    assert!(err.message.contains(&dead.to_string()), "{err}");
}

#[tokio::test]
async fn request_bodies_arrive_intact_with_length_or_chunked() {
    let _limit = crate::test_support::limit();
    let b = backend(|_, _| Act::Reply(OK_HELLO)).await;
    let c = client(b.addr);
    let post = Request::post("/upload")
        .header(header::HOST, "svc")
        .header(header::CONTENT_LENGTH, "999")
        .body(Full::new(Bytes::from_static(b"hello body")))
        .unwrap();
    text(send(&c, post).await.unwrap()).await;

    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("8"));
    // Several frames with no size known up front.
    let frames = [
        Frame::data(Bytes::from_static(b"abc")),
        Frame::data(Bytes::from_static(b"defgh")),
        Frame::trailers(trailers),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames.map(Ok::<_, Infallible>)));
    let put = Request::put("/stream")
        .header(header::HOST, "svc")
        .body(body)
        .unwrap();
    text(send(&c, put).await.unwrap()).await;

    // A large body goes out past the coalescing buffer.
    let big = Bytes::from(vec![b'z'; 100_000]);
    let post = Request::post("/big")
        .header(header::HOST, "svc")
        .body(Full::new(big.clone()))
        .unwrap();
    text(send(&c, post).await.unwrap()).await;

    let seen = b.seen.lock().unwrap().clone();
    // Our framing, not the peer's stale content-length.
    assert_eq!(
        seen[0],
        "POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\nhello body"
    );
    assert_eq!(
        seen[1],
        "PUT /stream HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n\
         3\r\nabc\r\n5\r\ndefgh\r\n0\r\nx-sum: 8\r\n\r\n"
    );
    assert!(seen[2].ends_with(std::str::from_utf8(&big).unwrap()));
    assert!(seen[2].contains("content-length: 100000\r\n"));
    // Every body was sent whole, so the one connection stayed usable.
    assert_eq!(b.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn early_response_ends_the_upload_and_the_connection() {
    let _limit = crate::test_support::limit();
    // Answers 413 on seeing the head, without reading the body.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        tcp.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // Hold the connection open: the client must not wait for it.
        std::future::pending::<()>().await;
        drop(tcp);
    });
    let c = client(addr);
    // A body that never ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"start"))))
        .await
        .unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post("/")
        .header(header::HOST, "svc")
        .body(body)
        .unwrap();
    let resp = send(&c, req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(text(resp).await, "");
    assert_eq!(c.idle(), 0, "the upload was cut: the connection is spent");
    drop(tx);
}
