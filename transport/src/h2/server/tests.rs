//! The HTTP/2 server's tests, against h2's own client and ours.

use super::*;
use crate::h2::client::{self as h2client, SendError, Sender};
use crate::http::BytesBody;
use crate::test_support::recording;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

type Frames =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn frames(items: Vec<Frame<Bytes>>) -> Frames {
    StreamBody::new(futures_util::stream::iter(items.into_iter().map(Ok)).boxed())
}

fn never_ending() -> Frames {
    StreamBody::new(futures_util::stream::pending().boxed())
}

/// Counts drops: tells whether an exchange (or a body) was let go.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

const SETTINGS: Settings = Settings {
    max_concurrent_streams: 100,
    drain_timeout: Duration::from_secs(5),
    handshake_timeout: Duration::from_secs(10),
};

/// Serves the first connection to a fresh loopback listener in a task
/// of its own.
async fn one_connection<F, Fut, B>(
    settings: Settings,
    stop: impl Future<Output = ()> + Send + 'static,
    handler: F,
) -> (SocketAddr, JoinHandle<Result<Ended, h2::Error>>)
where
    F: Fn(Request<RecvBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: BytesBody + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        serve(tcp, settings, stop, handler).await
    });
    (addr, task)
}

/// Until `rx` fires (or its sender is dropped).
async fn until(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

async fn client(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    h2client::handshake(tcp, tracing::Span::none())
        .await
        .unwrap()
}

/// The `h2` crate's own client, for what ours never does (CONNECT,
/// resetting a stream on purpose).
async fn raw_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (raw, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    raw
}

async fn send<B>(tx: &Sender, method: &str, path: &str, body: B) -> Response<h2client::ResponseBody>
where
    B: BytesBody + Send + 'static,
{
    let req = Request::builder()
        .method(method)
        .uri(format!("http://svc.test{path}"))
        .body(body)
        .unwrap();
    match tx.send(req).await {
        Ok(resp) => resp,
        Err(SendError::Unsent(_, e) | SendError::Failed(e)) => panic!("send failed: {e}"),
    }
}

async fn text(resp: Response<h2client::ResponseBody>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    crate::test_support::wait_until(what, crate::test_support::WAIT, || {
        std::future::ready(if check() {
            Ok(())
        } else {
            Err("not yet".to_owned())
        })
    })
    .await;
}

#[tokio::test]
async fn responses_finished_together_leave_in_parts() {
    let _limit = crate::test_support::limit();
    let burst = 4 * RESPOND_EVERY;
    let entered = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    // Every handler waits for the release, so all of them finish in the
    // same pass of the connection's task, as responses that arrive from
    // the backends together do.
    let handler = {
        let (entered, answered, release) = (
            Arc::clone(&entered),
            Arc::clone(&answered),
            Arc::clone(&release),
        );
        move |_: Request<RecvBody>| {
            let (entered, answered, release) = (
                Arc::clone(&entered),
                Arc::clone(&answered),
                Arc::clone(&release),
            );
            async move {
                entered.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                answered.fetch_add(1, Ordering::SeqCst);
                Response::new(Empty::<Bytes>::new())
            }
        }
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (recorded, writes) = oneshot::channel();
    let counter = Arc::clone(&answered);
    tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        // For every write: how many handlers had answered by then.
        let (io, writes) = recording(tcp, &counter);
        let _ = recorded.send(writes);
        serve(io, SETTINGS, std::future::pending(), handler).await
    });
    let tx = client(addr).await;
    let writes = writes.await.unwrap();
    let requests: Vec<_> = (0..burst)
        .map(|_| {
            let tx = tx.clone();
            tokio::spawn(
                async move { text(send(&tx, "GET", "/", Empty::<Bytes>::new()).await).await },
            )
        })
        .collect();
    eventually("every request reached its handler", || {
        entered.load(Ordering::SeqCst) == burst
    })
    .await;
    writes.lock().unwrap().clear();
    release.notify_waiters();
    for r in requests {
        r.await.unwrap();
    }
    let writes = writes.lock().unwrap().clone();
    let first = writes.first().copied().unwrap_or(burst);
    assert!(
        first <= RESPOND_EVERY,
        "the first responses went out only after {first} of {burst} were answered: {writes:?}"
    );
}

#[tokio::test]
async fn bodies_larger_than_the_window_and_trailers_cross_both_ways() {
    let _limit = crate::test_support::limit();
    // Echoes the body, then trailers naming the method and the byte
    // count and the request's own trailer.
    let echo = |req: Request<RecvBody>| async move {
        let method = req.method().to_string();
        let collected = req.into_body().collect().await.unwrap();
        let sent = collected.trailers().and_then(|t| t.get("x-sent")).cloned();
        let body = collected.to_bytes();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-method", method.parse().unwrap());
        trailers.insert("x-len", body.len().to_string().parse().unwrap());
        if let Some(v) = sent {
            trailers.insert("x-sent", v);
        }
        Response::new(frames(vec![Frame::data(body), Frame::trailers(trailers)]))
    };
    let (addr, _server) = one_connection(SETTINGS, std::future::pending(), echo).await;
    let tx = client(addr).await;

    // 3 MiB: more than the 1 MiB windows in each direction.
    let payload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut sent = HeaderMap::new();
    sent.insert("x-sent", "yes".parse().unwrap());
    let mut pieces: Vec<Frame<Bytes>> = payload
        .chunks(100_000)
        .map(|c| Frame::data(Bytes::copy_from_slice(c)))
        .collect();
    pieces.push(Frame::trailers(sent));
    let resp = send(&tx, "POST", "/echo", frames(pieces)).await;
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(collected.to_bytes(), payload);
    assert_eq!(trailers["x-method"], "POST");
    assert_eq!(trailers["x-len"], (3 * 1024 * 1024).to_string());
    assert_eq!(trailers["x-sent"], "yes");

    // An empty request body: END_STREAM on the request head.
    let resp = send(&tx, "GET", "/", Empty::<Bytes>::new()).await;
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-len"], "0");
}

#[tokio::test]
async fn streams_are_served_concurrently_in_the_connection_task() {
    let _limit = crate::test_support::limit();
    // The first request is answered only once the second has arrived:
    // with streams served one after another this would never finish.
    let second_in = Arc::new(Notify::new());
    let first_in = Arc::new(Notify::new());
    let first_entered = Arc::clone(&first_in);
    let handler = move |req: Request<RecvBody>| {
        let (second_in, first_in) = (Arc::clone(&second_in), Arc::clone(&first_in));
        async move {
            let path = req.uri().path().to_owned();
            if path == "/first" {
                first_in.notify_one();
                second_in.notified().await;
            } else {
                second_in.notify_one();
            }
            Response::new(frames(vec![Frame::data(Bytes::from(path))]))
        }
    };
    let (addr, _server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let tx = client(addr).await;
    let first = {
        let tx = tx.clone();
        tokio::spawn(async move { send(&tx, "GET", "/first", Empty::<Bytes>::new()).await })
    };
    // The second goes out only once the first waits in its handler.
    first_entered.notified().await;
    let second = send(&tx, "GET", "/second", Empty::<Bytes>::new()).await;
    let first = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first stream was answered")
        .unwrap();
    assert_eq!(text(first).await, "/first");
    assert_eq!(text(second).await, "/second");
}

#[tokio::test]
async fn a_reset_stream_drops_its_exchange_and_its_response_body() {
    let _limit = crate::test_support::limit();
    let dropped = Arc::new(AtomicUsize::new(0));
    let hanging = Arc::new(Notify::new());
    let handler = {
        let (dropped, hanging) = (Arc::clone(&dropped), Arc::clone(&hanging));
        move |req: Request<RecvBody>| {
            let guard = DropCount(Arc::clone(&dropped));
            let hanging = Arc::clone(&hanging);
            async move {
                if req.uri().path() == "/hang" {
                    hanging.notify_one();
                    // The response never comes.
                    std::future::pending::<()>().await;
                }
                // A head, then a body that never ends.
                let body = never_ending().map_frame(move |f| {
                    let _held = &guard;
                    f
                });
                Response::new(body)
            }
        }
    };
    let (addr, _server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let mut raw = raw_client(addr).await;

    // Reset while the handler waits.
    let req = Request::get("http://svc.test/hang").body(()).unwrap();
    let (_response, mut stream) = raw.send_request(req, false).unwrap();
    hanging.notified().await;
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    stream.send_reset(Reason::CANCEL);
    eventually("the waiting exchange is dropped", || {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;

    // Reset while the body streams: dropping every handle of the
    // stream resets it, and the never-ending body is let go.
    let req = Request::get("http://svc.test/stream").body(()).unwrap();
    let (response, stream) = raw.send_request(req, true).unwrap();
    let resp = response.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    drop((resp, stream));
    eventually("the streaming body is dropped", || {
        dropped.load(Ordering::SeqCst) == 2
    })
    .await;
}

/// The size of what `handler` returns.
fn output_size<F, Fut>(_: &F) -> usize
where
    F: Fn(Request<RecvBody>) -> Fut,
{
    std::mem::size_of::<Fut>()
}

#[tokio::test]
async fn an_exchange_keeps_the_handler_future_once() {
    let _limit = crate::test_support::limit();
    // A handler whose future is large.
    let handler = |req: Request<RecvBody>| async move {
        let state = [7u8; 4096];
        tokio::task::yield_now().await;
        drop(req);
        Response::new(frames(vec![Frame::data(Bytes::copy_from_slice(
            &state[..1],
        ))]))
    };
    let alone = output_size(&handler);
    assert!(alone > 4096);

    // One real stream, taken off the connection by hand.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _client = tokio::spawn(async move {
        let mut raw = raw_client(addr).await;
        let req = Request::get("http://svc.test/").body(()).unwrap();
        let (response, _stream) = raw.send_request(req, true).unwrap();
        let _ = response.await;
    });
    let (tcp, _) = l.accept().await.unwrap();
    let mut conn: h2::server::Connection<TcpStream, Bytes> =
        h2::server::handshake(tcp).await.unwrap();
    let (req, respond) = conn.accept().await.unwrap().unwrap();
    let (parts, recv) = req.into_parts();
    let req = Request::from_parts(parts, RecvBody::new(recv, &HeaderMap::new(), ()));

    let size = std::mem::size_of_val(&exchange(&handler, req, respond));
    assert!(
        size < alone + 1024,
        "the handler's future is {alone} bytes, its exchange {size}"
    );
}

#[tokio::test]
async fn connect_is_refused_without_reaching_the_handler() {
    let _limit = crate::test_support::limit();
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = Arc::clone(&handled);
        move |_req: Request<RecvBody>| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Response::new(Empty::<Bytes>::new()) }
        }
    };
    let (addr, _server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let mut raw = raw_client(addr).await;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("svc.test:443")
        .body(())
        .unwrap();
    let (response, _stream) = raw.send_request(req, false).unwrap();
    let resp = response.await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["x-elsinore-error"], "protocol");
    let body = RecvBody::new(resp.into_body(), &HeaderMap::new(), ())
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "CONNECT tunnels are not proxied\n");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn stopping_drains_in_flight_exchanges_and_refuses_new_streams() {
    let _limit = crate::test_support::limit();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let handler = {
        let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
        move |req: Request<RecvBody>| {
            let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
            async move {
                // Streams the server accepted while its GOAWAY was on
                // the way (see below) are answered at once.
                if req.uri().path() == "/late" {
                    return Response::new(frames(vec![Frame::data(Bytes::from_static(
                        b"accepted",
                    ))]));
                }
                entered.notify_one();
                release.notified().await;
                Response::new(frames(vec![Frame::data(Bytes::from_static(b"done"))]))
            }
        }
    };
    let (addr, server) = one_connection(SETTINGS, until(stop_rx), handler).await;
    let tx = client(addr).await;
    let in_flight = {
        let tx = tx.clone();
        tokio::spawn(async move { send(&tx, "GET", "/", Empty::<Bytes>::new()).await })
    };
    entered.notified().await;
    stop_tx.send(()).unwrap();

    // A stream opened after the GOAWAY is refused. A graceful GOAWAY
    // comes in two steps (the final one after a ping's round trip), and
    // streams sent before the final one are still served: retry until
    // the stop has reached the client.
    crate::test_support::wait_until(
        "a new stream after stop to be refused",
        crate::test_support::WAIT,
        || async {
            let late = Request::get("http://svc.test/late")
                .body(Empty::<Bytes>::new())
                .unwrap();
            match tx.send(late).await {
                Err(_) => Ok(()),
                Ok(resp) => Err(format!("accepted: {:?}", text(resp).await)),
            }
        },
    )
    .await;
    assert!(
        !server.is_finished(),
        "an exchange in flight holds the connection open"
    );

    release.notify_one();
    assert_eq!(text(in_flight.await.unwrap()).await, "done");
    let ended = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the drained connection closes")
        .unwrap()
        .unwrap();
    assert_eq!(ended, Ended::Closed);
}

#[tokio::test]
async fn a_drain_that_outlasts_its_timeout_is_cut() {
    let _limit = crate::test_support::limit();
    let settings = Settings {
        drain_timeout: Duration::from_millis(200),
        ..SETTINGS
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let entered = Arc::new(Notify::new());
    let handler = {
        let entered = Arc::clone(&entered);
        move |_req: Request<RecvBody>| {
            entered.notify_one();
            async { std::future::pending::<Response<Empty<Bytes>>>().await }
        }
    };
    let (addr, server) = one_connection(settings, until(stop_rx), handler).await;
    let tx = client(addr).await;
    let stuck = tokio::spawn(async move {
        let req = Request::get("http://svc.test/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        tx.send(req).await.is_err()
    });
    // Stop only once the stream is in the handler.
    entered.notified().await;
    stop_tx.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the drain timeout cuts the connection")
        .unwrap()
        .unwrap();
    assert_eq!(ended, Ended::DrainTimedOut);
    assert!(stuck.await.unwrap(), "the cut stream fails on the client");
}

#[tokio::test]
async fn a_client_that_sends_no_preface_is_closed_after_the_handshake_timeout() {
    let _limit = crate::test_support::limit();
    let settings = Settings {
        handshake_timeout: Duration::from_millis(200),
        ..SETTINGS
    };
    let handler = |_: Request<RecvBody>| async { Response::new(Empty::<Bytes>::new()) };
    let (addr, server) = one_connection(settings, std::future::pending(), handler).await;
    // Connects, and says nothing.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the silent connection is let go")
        .unwrap()
        .unwrap();
    assert_eq!(ended, Ended::PrefaceTimedOut);
    // Closed on the client's side too (after our SETTINGS).
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut rest)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stop_ends_the_wait_for_the_preface() {
    let _limit = crate::test_support::limit();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handler = |_: Request<RecvBody>| async { Response::new(Empty::<Bytes>::new()) };
    let settings = Settings {
        handshake_timeout: Duration::from_secs(3600),
        ..SETTINGS
    };
    let (addr, server) = one_connection(settings, until(stop_rx), handler).await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    stop_tx.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("a stop ends a connection still waiting for its preface")
        .unwrap()
        .unwrap();
    assert_eq!(ended, Ended::Closed);
}

/// What a "rapid reset" client does: open a stream, and reset it once
/// the server has started its exchange (the worst case: each one has
/// started its backend work), again and again. The server must stop it
/// with a GOAWAY (ENHANCE_YOUR_CALM) once the resets run ahead of the
/// answers by the allowance, having started no more exchanges than that.
#[tokio::test]
async fn a_flood_of_streams_reset_after_they_start_gets_a_goaway() {
    let _limit = crate::test_support::limit();
    let started = Arc::new(AtomicUsize::new(0));
    let handler = {
        let started = Arc::clone(&started);
        move |req: Request<RecvBody>| {
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                if req.uri().path() == "/hang" {
                    // The backend that never answers in time.
                    std::future::pending::<()>().await;
                }
                Response::new(Empty::<Bytes>::new())
            }
        }
    };
    let (addr, server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut raw, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let allowance = reset_allowance(&SETTINGS) as usize;

    // Some streams answered first: they do not earn a flood more room.
    for _ in 0..10 {
        let req = Request::get("http://svc.test/ok").body(()).unwrap();
        let (response, _) = raw.send_request(req, true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
    }
    let before = started.load(Ordering::SeqCst);
    let flood = 4 * allowance;
    let mut sent = 0;
    for _ in 0..flood {
        let req = Request::get("http://svc.test/hang").body(()).unwrap();
        let Ok(r) = raw.clone().ready().await else {
            break;
        };
        raw = r;
        let Ok((_response, mut stream)) = raw.send_request(req, false) else {
            break;
        };
        sent += 1;
        let target = before + sent;
        let in_handler = crate::test_support::wait_until(
            "the stream to reach its handler, or the connection to close",
            crate::test_support::WAIT,
            || {
                let (n, closed) = (started.load(Ordering::SeqCst), conn.is_finished());
                std::future::ready(if n >= target {
                    Ok(true)
                } else if closed {
                    Ok(false)
                } else {
                    Err(format!("{n} of {target} started"))
                })
            },
        )
        .await;
        if !in_handler {
            break;
        }
        stream.send_reset(Reason::CANCEL);
    }
    let flooded = started.load(Ordering::SeqCst) - before;
    // The allowance, the reset that crosses it, and the next stream,
    // whose head may come in the same read as that reset.
    assert!(
        flooded <= allowance + 2,
        "{flooded} exchanges started by {sent} reset streams (allowance {allowance})"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the client's connection ends")
        .unwrap();
    let err = ended.expect_err("the server ends the connection with an error");
    assert!(err.is_go_away(), "{err}");
    assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{err}");
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server's side ends")
        .unwrap();
    assert_eq!(
        served.unwrap_err().reason(),
        Some(Reason::ENHANCE_YOUR_CALM)
    );
}

/// The same flood with each HEADERS and its RST_STREAM sent together,
/// in batches too small for h2's own guard (streams reset before they
/// are accepted): a stream found reset when it is accepted starts
/// nothing, and the resets still count towards the GOAWAY.
#[tokio::test]
async fn streams_reset_with_their_headers_start_no_exchange() {
    let _limit = crate::test_support::limit();
    const BATCH: usize = 10;
    let started = Arc::new(AtomicUsize::new(0));
    let handler = {
        let started = Arc::clone(&started);
        move |_: Request<RecvBody>| {
            started.fetch_add(1, Ordering::SeqCst);
            async { std::future::pending::<Response<Empty<Bytes>>>().await }
        }
    };
    let (addr, server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut raw, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let conn = tokio::spawn(conn);
    let batches = 4 * reset_allowance(&SETTINGS) as usize / BATCH;
    let mut sent = 0;
    'flood: for _ in 0..batches {
        for _ in 0..BATCH {
            let req = Request::get("http://svc.test/").body(()).unwrap();
            let Ok(r) = raw.clone().ready().await else {
                break 'flood;
            };
            raw = r;
            let Ok((_response, mut stream)) = raw.send_request(req, false) else {
                break 'flood;
            };
            stream.send_reset(Reason::CANCEL);
            sent += 1;
        }
        // The pong comes after the server has read the batch.
        if pings.ping(h2::Ping::opaque()).await.is_err() {
            break;
        }
    }
    let n = started.load(Ordering::SeqCst);
    assert!(
        n <= BATCH,
        "{n} exchanges started by {sent} streams reset with their headers"
    );
    let served = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server's side ends")
        .unwrap();
    let err = served.expect_err("the server ends the connection with an error");
    assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{err}");
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

/// A client that cancels many streams at once (an egress whose own
/// clients went away together) is not a flood: a burst of streams reset
/// with their headers, more than h2's default guard of 20 but within
/// [`reset_allowance`], leaves the connection serving.
#[tokio::test]
async fn a_burst_of_cancels_within_the_allowance_keeps_the_connection() {
    let _limit = crate::test_support::limit();
    let burst = reset_allowance(&SETTINGS) as usize / 2;
    assert!(burst > 20, "the burst must exceed h2's default guard");
    let handler =
        |_: Request<RecvBody>| async { Response::new(Full::new(Bytes::from_static(b"ok"))) };
    let (addr, _server) = one_connection(SETTINGS, std::future::pending(), handler).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut raw, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let _conn = tokio::spawn(conn);
    for _ in 0..burst {
        let req = Request::get("http://svc.test/").body(()).unwrap();
        raw = raw.ready().await.unwrap();
        let (_response, mut stream) = raw.send_request(req, false).unwrap();
        stream.send_reset(Reason::CANCEL);
    }
    // The pong comes after the server has read the burst.
    pings.ping(h2::Ping::opaque()).await.unwrap();
    let req = Request::get("http://svc.test/after").body(()).unwrap();
    raw = raw
        .ready()
        .await
        .expect("the connection still takes streams");
    let (response, _) = raw.send_request(req, true).unwrap();
    let resp = response
        .await
        .expect("the stream after the burst is answered");
    assert_eq!(resp.status(), StatusCode::OK);
}
