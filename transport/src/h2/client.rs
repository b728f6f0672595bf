//! The HTTP/2 client side of egress, on the `h2` crate directly.
//!
//! Why not hyper's HTTP/2 client: hyper hands every request through a
//! channel to the connection's task and spawns one more task per request to
//! wait for the response and pass it back over a oneshot, so each request
//! costs two task hand-offs and a spawn before the body moves. Here the
//! request's own task opens the stream and waits on it; the connection task
//! only moves frames, except that every [`FLUSH_EVERY`]th request's task
//! writes what is queued itself, so a burst does not leave in one piece.
//! A request body that is not empty is piped by a task of its own (flow
//! control may hold it back while the response already streams), as in
//! hyper.
//!
//! Settings match hyper's client defaults: 2 MiB stream and 5 MiB
//! connection windows, 16 KiB frames and header lists, 1 MiB send buffer,
//! no server push. While streams are open, a ping every
//! [`KEEPALIVE_INTERVAL`] that is not answered within [`KEEPALIVE_TIMEOUT`]
//! closes the connection, so a dead peer is found before a request is lost
//! on it. An idle connection is not pinged (as with hyper's default), so
//! the pool's and the peer's idle timeouts still close it.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, Reason};
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::body::{self as h2body, RecvBody};
use crate::http::BytesBody;

/// How often a connection with open streams is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// One HTTP/2 connection's request handle; clones share the connection.
#[derive(Clone)]
pub struct Sender {
    tx: SendRequest<Bytes>,
    state: Arc<ConnState>,
    conn: Arc<dyn Flush>,
}

/// Requests a sender queues before it writes them itself, instead of
/// leaving them all to the connection task. The connection task runs after
/// every request task the runtime woke with it, so without this a burst of
/// requests leaves in one write and the peer idles until the whole burst
/// is handled; in parts, the peer starts on the first while this side
/// works on the rest.
const FLUSH_EVERY: usize = 16;

/// The connection, shared between its task and the senders: one lock for
/// both, taken once per poll.
struct Shared<T>(std::sync::Mutex<Driven<T>>);

struct Driven<T> {
    /// Taken out when the connection task ends, which closes it.
    conn: Option<h2::client::Connection<T, Bytes>>,
    /// The connection task's waker: whoever polls the connection polls it
    /// on the task's behalf.
    waker: Option<std::task::Waker>,
}

trait Flush: Send + Sync {
    /// Polls the connection once, which writes what is queued.
    fn flush(&self);
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Flush for Shared<T> {
    fn flush(&self) {
        let Ok(mut driven) = self.0.try_lock() else {
            return;
        };
        let Driven {
            conn: Some(conn),
            waker: Some(waker),
        } = &mut *driven
        else {
            return;
        };
        let mut cx = std::task::Context::from_waker(waker);
        if std::pin::Pin::new(conn).poll(&mut cx).is_ready() {
            // Ended: its task finds out on its next poll.
            waker.wake_by_ref();
        }
    }
}

/// What the request side and the connection task share.
#[derive(Default)]
struct ConnState {
    /// The connection task has ended.
    closed: AtomicBool,
    /// Streams whose response is not done (or dropped) yet; pings go out
    /// only while there are some, so an idle connection stays idle and
    /// the peer's idle timeout can close it.
    open: AtomicUsize,
    /// Requests queued since the connection last wrote.
    queued: AtomicUsize,
}

/// One open stream, counted in [`ConnState::open`] until dropped.
pub struct OpenStream(Arc<ConnState>);

impl OpenStream {
    fn new(state: &Arc<ConnState>) -> Self {
        state.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(state))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request got no response.
pub enum SendError<B> {
    /// The connection was gone before the stream opened, or the peer
    /// refused the stream of a bodiless request unprocessed
    /// (REFUSED_STREAM): the request comes back whole, to go again.
    Unsent(Box<Request<B>>, h2::Error),
    /// The stream opened and then failed.
    Failed(h2::Error),
}

/// HTTP/2 over `io` (already TLS with ALPN h2): the handshake, then a task
/// that drives the connection (and its keep-alive pings) until it closes.
pub async fn handshake<T>(io: T, span: tracing::Span) -> Result<Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    handshake_pinging(io, span, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT).await
}

async fn handshake_pinging<T>(
    io: T,
    span: tracing::Span,
    interval: Duration,
    timeout: Duration,
) -> Result<Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let state = Arc::new(ConnState::default());
    let pings = conn.ping_pong();
    let shared = Arc::new(Shared(std::sync::Mutex::new(Driven {
        conn: Some(conn),
        waker: None,
    })));
    tokio::spawn(
        drive(
            Arc::clone(&shared),
            pings,
            Arc::clone(&state),
            interval,
            timeout,
        )
        .instrument(span),
    );
    Ok(Sender {
        tx,
        state,
        conn: shared,
    })
}

/// Polls the connection to its end, pinging it while streams are open.
async fn drive<T>(
    shared: Arc<Shared<T>>,
    mut pings: Option<h2::PingPong>,
    state: Arc<ConnState>,
    interval: Duration,
    timeout: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = poll_fn(|cx| {
        state.queued.store(0, Ordering::Relaxed);
        let Ok(mut driven) = shared.0.lock() else {
            return Poll::Ready(Ok(()));
        };
        if !driven
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            driven.waker = Some(cx.waker().clone());
        }
        match driven.conn.as_mut() {
            Some(conn) => std::pin::Pin::new(conn).poll(cx),
            None => Poll::Ready(Ok(())),
        }
    });
    let timer = tokio::time::sleep(interval);
    tokio::pin!(timer);
    let mut awaiting_pong = false;
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(error) = ended {
                    tracing::debug!(%error, "pooled HTTP/2 connection ended with an error");
                }
                break;
            }
            () = timer.as_mut() => {
                if awaiting_pong {
                    tracing::debug!("no ping answer within {timeout:?}; closing");
                    break;
                }
                if state.open.load(Ordering::Relaxed) == 0 {
                    timer.as_mut().reset(tokio::time::Instant::now() + interval);
                    continue;
                }
                let Some(p) = pings.as_mut() else { break };
                if p.send_ping(Ping::opaque()).is_err() {
                    break;
                }
                awaiting_pong = true;
                timer.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
            pong = poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => Poll::Pending,
            }), if awaiting_pong => {
                if pong.is_err() {
                    break;
                }
                awaiting_pong = false;
                timer.as_mut().reset(tokio::time::Instant::now() + interval);
            }
        }
    }
    state.closed.store(true, Ordering::Release);
    // Dropped here, not with the last sender: this closes the socket.
    if let Ok(mut driven) = shared.0.lock() {
        driven.conn = None;
    }
}

impl Sender {
    /// Whether the connection has ended (it takes no more requests).
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    /// Sends one request and waits for the response head. The request must
    /// carry an absolute URI and no connection-specific fields.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, SendError<B>>
    where
        B: BytesBody + Send + 'static,
    {
        let mut tx = self.tx.clone();
        if let Err(e) = poll_fn(|cx| tx.poll_ready(cx)).await {
            return Err(SendError::Unsent(Box::new(req), e));
        }
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        // A peer may refuse a stream unprocessed (REFUSED_STREAM, RFC 9113
        // §8.7): one that counts a stream we just reset as still open
        // while the next takes its slot does. Such a request may go again
        // whatever its method; without a body it can be rebuilt whole.
        let again = end.then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.version,
                parts.headers.clone(),
            )
        });
        let head = Request::from_parts(parts, ());
        let (response, mut stream) = match tx.send_request(head, end) {
            Ok(sent) => sent,
            // The head is gone with it; only a closed connection or a
            // malformed head get here, neither worth a retry.
            Err(e) => return Err(SendError::Failed(e)),
        };
        if self.state.queued.fetch_add(1, Ordering::Relaxed) + 1 >= FLUSH_EVERY {
            self.state.queued.store(0, Ordering::Relaxed);
            self.conn.flush();
        }
        let open = OpenStream::new(&self.state);
        let mut kept = None;
        if end {
            kept = Some(body);
        } else {
            tokio::spawn(
                async move {
                    if let Err(error) = h2body::pipe(body, &mut stream, Reason::CANCEL).await {
                        tracing::debug!(%error, "request body not sent whole");
                    }
                }
                .in_current_span(),
            );
        }
        let resp = match response.await {
            Ok(resp) => resp,
            Err(e) if e.reason() == Some(Reason::REFUSED_STREAM) && e.is_remote() => {
                match (again, kept) {
                    (Some((method, uri, version, headers)), Some(body)) => {
                        let mut req = Request::new(body);
                        *req.method_mut() = method;
                        *req.uri_mut() = uri;
                        *req.version_mut() = version;
                        *req.headers_mut() = headers;
                        return Err(SendError::Unsent(Box::new(req), e));
                    }
                    _ => return Err(SendError::Failed(e)),
                }
            }
            Err(e) => return Err(SendError::Failed(e)),
        };
        let (parts, recv) = resp.into_parts();
        let body = RecvBody::new(recv, &parts.headers, open);
        Ok(Response::from_parts(parts, body))
    }
}

/// A response body read from its stream; it keeps the connection pinged
/// while it lives.
pub type ResponseBody = RecvBody<OpenStream>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::test_support::recording;
    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::net::{TcpListener, TcpStream};

    /// A real HTTP/2 server (hyper) that echoes the request body back,
    /// followed by trailers naming the method and the byte count.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let method = req.method().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut trailers = HeaderMap::new();
                        trailers.insert("x-method", method.parse().unwrap());
                        trailers.insert("x-len", body.len().to_string().parse().unwrap());
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(body)),
                            Ok(Frame::trailers(trailers)),
                        ];
                        Ok::<_, Infallible>(Response::new(StreamBody::new(
                            futures_util::stream::iter(frames),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn connect(addr: SocketAddr) -> Sender {
        let tcp = TcpStream::connect(addr).await.unwrap();
        handshake(tcp, tracing::Span::none()).await.unwrap()
    }

    fn request<B>(addr: SocketAddr, method: &str, body: B) -> Request<B> {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}/echo"))
            .body(body)
            .unwrap()
    }

    async fn sent<B>(tx: &Sender, req: Request<B>) -> Response<ResponseBody>
    where
        B: BytesBody + Send + 'static,
    {
        match tx.send(req).await {
            Ok(resp) => resp,
            Err(SendError::Unsent(_, e) | SendError::Failed(e)) => panic!("send failed: {e}"),
        }
    }

    #[tokio::test]
    async fn bodies_and_trailers_cross_in_both_directions() {
        let _limit = crate::test_support::limit();
        let addr = echo_server().await;
        let tx = connect(addr).await;

        // A body larger than the default 64 KiB window, in pieces.
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let pieces: Vec<Result<Frame<Bytes>, Infallible>> = payload
            .chunks(7_000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(pieces));
        let resp = sent(&tx, request(addr, "POST", body)).await;
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(collected.to_bytes(), payload);
        assert_eq!(trailers["x-method"], "POST");
        assert_eq!(trailers["x-len"], "300000");

        // An empty body goes out with the head (END_STREAM on HEADERS).
        let resp = sent(&tx, request(addr, "GET", Empty::<Bytes>::new())).await;
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-len"], "0");
    }

    #[tokio::test]
    async fn a_burst_of_requests_leaves_in_parts() {
        let _limit = crate::test_support::limit();
        let addr = echo_server().await;
        // For every write: how many request tasks had started by then.
        let started = Arc::new(AtomicUsize::new(0));
        let (io, writes) = recording(TcpStream::connect(addr).await.unwrap(), &started);
        let tx = handshake(io, tracing::Span::none()).await.unwrap();
        // The handshake's own frames go out first: a whole exchange has
        // crossed once its response is read.
        let warm = sent(&tx, request(addr, "GET", Empty::<Bytes>::new())).await;
        warm.into_body().collect().await.unwrap();
        writes.lock().unwrap().clear();

        // 64 request tasks woken together, as a burst of app requests is:
        // on this current-thread runtime they run one after another, and
        // the connection task only after all of them.
        let burst = 4 * FLUSH_EVERY;
        let tasks: Vec<_> = (0..burst)
            .map(|_| {
                let (tx, started) = (tx.clone(), Arc::clone(&started));
                tokio::spawn(async move {
                    started.fetch_add(1, Ordering::Relaxed);
                    let resp = sent(&tx, request(addr, "GET", Empty::<Bytes>::new())).await;
                    resp.into_body().collect().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let writes = writes.lock().unwrap().clone();
        let first = writes.first().copied().unwrap_or(burst);
        assert!(
            first <= FLUSH_EVERY,
            "the first requests went out only after {first} of {burst} tasks had run: {writes:?}"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_hands_the_request_back_unsent() {
        let _limit = crate::test_support::limit();
        // A server that answers the handshake and then closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            conn.graceful_shutdown();
            while conn.accept().await.is_some() {}
        });
        let tx = connect(addr).await;
        crate::test_support::wait_until(
            "the connection end to be noticed",
            crate::test_support::WAIT,
            || {
                std::future::ready(if tx.is_closed() {
                    Ok(())
                } else {
                    Err("open".to_owned())
                })
            },
        )
        .await;
        let body = Full::new(Bytes::from_static(b"kept"));
        match tx.send(request(addr, "PUT", body)).await {
            Err(SendError::Unsent(req, _)) => {
                assert_eq!(req.method(), "PUT");
                let kept = req.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(kept, "kept");
            }
            Ok(_) => panic!("a closed connection answered"),
            Err(SendError::Failed(e)) => panic!("request lost instead of handed back: {e}"),
        }
    }

    #[tokio::test]
    async fn a_refused_stream_hands_a_bodiless_request_back_unsent() {
        let _limit = crate::test_support::limit();
        // A server that refuses every stream unprocessed, as one does that
        // still counts a just-reset stream against its limit.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(Reason::REFUSED_STREAM);
            }
        });
        let tx = connect(addr).await;
        let mut get = request(addr, "POST", Empty::<Bytes>::new());
        get.headers_mut()
            .insert("x-kept", http::HeaderValue::from_static("1"));
        match tx.send(get).await {
            Err(SendError::Unsent(req, e)) => {
                assert_eq!(e.reason(), Some(Reason::REFUSED_STREAM));
                assert_eq!(req.method(), "POST");
                assert_eq!(req.uri().to_string(), format!("http://{addr}/echo"));
                assert_eq!(req.headers()["x-kept"], "1");
            }
            Ok(_) => panic!("a refused stream answered"),
            Err(SendError::Failed(e)) => panic!("a refused request was lost: {e}"),
        }
        // A body may be gone with the stream: that request fails.
        let put = request(addr, "PUT", Full::new(Bytes::from_static(b"body")));
        match tx.send(put).await {
            Err(SendError::Failed(e)) => assert_eq!(e.reason(), Some(Reason::REFUSED_STREAM)),
            Ok(_) => panic!("a refused stream answered"),
            Err(SendError::Unsent(..)) => panic!("a request whose body was sent came back"),
        }
    }

    #[tokio::test]
    async fn an_unanswered_ping_closes_the_connection_an_answered_one_does_not() {
        let _limit = crate::test_support::limit();
        // Answers pings: a served connection.
        let live = echo_server().await;
        // Never answer: the handshake completes, then the server stops
        // reading (the connection is held, not polled).
        let silent = || async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let held = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let conn: h2::server::Connection<TcpStream, Bytes> =
                    h2::server::handshake(s).await.unwrap();
                conn
            });
            (addr, held)
        };
        let (busy, busy_held) = silent().await;
        let (idle, idle_held) = silent().await;
        // Short periods, real time: what matters is the order of events.
        let (interval, timeout) = (Duration::from_millis(50), Duration::from_millis(1000));
        let pinging = |addr| async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            handshake_pinging(tcp, tracing::Span::none(), interval, timeout)
                .await
                .unwrap()
        };
        let live = pinging(live).await;
        let busy = pinging(busy).await;
        let idle = pinging(idle).await;
        let _held = (busy_held.await.unwrap(), idle_held.await.unwrap());

        // Pings go out only while a stream is open: one request that never
        // finishes on the live and on the busy connection, none on idle.
        let never_ends = || {
            StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, Infallible>,
            >())
        };
        let authority = SocketAddr::from(([127, 0, 0, 1], 80));
        for tx in [live.clone(), busy.clone()] {
            let req = request(authority, "POST", never_ends());
            tokio::spawn(async move { tx.send(req).await.map(|_| ()) });
        }

        crate::test_support::wait_until(
            "a peer that never answers a ping to be dropped",
            crate::test_support::WAIT,
            || {
                std::future::ready(if busy.is_closed() {
                    Ok(())
                } else {
                    Err("open".to_owned())
                })
            },
        )
        .await;
        // Not an ordering wait: that nothing closes the others is seen only
        // once time passes. They must outlive a further whole ping period
        // (unanswered, the busy one took no longer than that).
        tokio::time::sleep(interval + timeout).await;
        assert!(!live.is_closed(), "a peer that answers pings is kept");
        assert!(
            !idle.is_closed(),
            "a connection without streams is not pinged (the peer's idle timeout applies)"
        );
    }
}
