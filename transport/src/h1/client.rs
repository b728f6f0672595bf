//! The HTTP/1.1 client of ingress for HTTP exports: each request is written
//! to a pooled keep-alive backend connection and its response read back by
//! the task that serves the peer's request, with no connection task, no
//! channel and no hand-off in between. The response body reads straight
//! from the backend socket when hyper polls it, and hands the connection
//! back to the export's idle pool when it ends cleanly.
//!
//! Why not hyper-util's client here: it runs a task per backend connection
//! and every request crosses to it through a channel and back through a
//! oneshot, with the body streaming through another channel. On the
//! keep-alive path those hand-offs cost more CPU than the exchange itself.
//!
//! What it implements (RFC 9112): requests in origin-form with `Host` added
//! when missing, bodies sent with `Content-Length` when their size is known
//! and chunked (trailers passed on) otherwise, head and small bodies
//! coalesced into one write; response heads of up to [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, 1xx interim responses skipped, bodies framed by
//! length, chunked (trailers passed on as a trailers frame) or by the
//! backend closing, none for `HEAD`, 204 and 304. A pooled connection the
//! backend closed while idle is retried once on a fresh connection when the
//! request has no body and either was not written whole (a write error) or
//! is idempotent (EOF or a reset before the first response byte): RFC 9112
//! §9.3.1 forbids retrying a POST or PATCH the backend may have acted on.
//! A connection is pooled again only after a complete response with length
//! or chunked framing, no `connection: close` on either side and the
//! request body sent whole; pooled connections hold no buffer and are
//! dropped once idle longer than `idleTimeout`. A response to `HEAD`, or a
//! 204 or 304, that declares a body (`Content-Length` above 0 or
//! `Transfer-Encoding`) ends its connection: its length is the GET's, and a
//! backend that sends those bytes anyway would have them read as the next
//! request's response.
//!
//! An export has at most [`Settings::max_connections`] backend
//! connections open, idle or busy (the gateway's default is Envoy's
//! default circuit breaker);
//! requests beyond it wait for one to come back or close (within the
//! caller's request timeout), so no peer can make us open connections to a
//! backend without bound.
//!
//! What it refuses, as an upstream error (502): malformed or oversized
//! response heads, `101 Switching Protocols` (upgrades are not proxied),
//! transfer codings other than chunked, `Content-Length` together with
//! `Transfer-Encoding`, invalid or conflicting lengths (the
//! response-smuggling shapes), and malformed chunked bodies. A response
//! that arrives before the request body is sent whole ends the upload there
//! (the connection is then closed): full-duplex exchanges are not proxied.
//!
//! Which backend a new connection goes to is the caller's business: it
//! passes a [`Connect`] (the gateway's round robin over an export's
//! backends, with its name resolution and dead marks).

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::framing::{self, Delimit, Framing, HEAD_CHUNK, WRITE_COALESCE, WriteBodyError};
use crate::error::{ErrorKind, ProxyError};
use crate::http::BytesBody;

/// Idle connections kept per export; more are closed when they come back.
/// As many as the streams a busy peer runs at once, so that a steady load
/// does not churn backend connections (an idle one holds no buffer).
pub const MAX_IDLE: usize = 1024;

/// A new backend connection on its way: the stream and the address it was
/// made to (named in errors), or why none could be made.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<(TcpStream, String), ProxyError>> + Send + 'a>>;

/// Opens the connections an [`H1Client`] sends requests on.
pub trait Connect: Send + Sync {
    /// A new connection, made within `timeout`.
    fn connect(&self, timeout: Duration) -> Connecting<'_>;
}

/// How an [`H1Client`] connects and pools.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Dialing a backend.
    pub connect_timeout: Duration,
    /// A pooled connection idle longer than this is closed, not reused.
    pub idle_timeout: Duration,
    /// The most backend connections open at once, idle or busy (at least
    /// one).
    pub max_connections: usize,
}

/// The HTTP/1.1 client of one export: its backends and its idle pool.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct H1Client {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
    pool: Arc<Pool>,
}

/// How the request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    /// No body (and no framing header beyond a possible `content-length: 0`).
    Empty,
    Length(u64),
    Chunked,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Framed(Framing),
    /// Until the backend closes.
    Close,
}

/// A parsed final response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    read: Read,
    keep_alive: bool,
}

/// Why one attempt failed, and whether it looks like a pooled connection
/// the backend had closed.
struct Failed {
    error: ProxyError,
    stale: Stale,
}

/// How much of an exchange on a connection that turned out closed reached
/// the backend: what decides whether it may go again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// Not a pooled connection closing under us: never retried.
    No,
    /// Writing the request (a head alone) failed: the backend got part of
    /// it at most, and cannot have acted on it.
    Unsent,
    /// The request was written whole and the connection closed before a
    /// byte of response: the backend may have acted on it.
    Unanswered,
}

impl Failed {
    fn fatal(error: ProxyError) -> Self {
        Failed {
            error,
            stale: Stale::No,
        }
    }
}

/// Whether a request may be sent again after the backend may have received
/// it: the idempotent methods of RFC 9110 §9.2.2.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl H1Client {
    /// A client whose new connections come from `connector`.
    pub fn new(connector: Arc<dyn Connect>, settings: Settings) -> Self {
        let Settings {
            connect_timeout,
            idle_timeout,
            max_connections,
        } = settings;
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        H1Client {
            inner: Arc::new(Inner {
                connector,
                connect_timeout,
                pool: Arc::new(Pool {
                    idle: Mutex::new(Vec::new()),
                    idle_timeout,
                    cap: MAX_IDLE.min(max_connections),
                    slots: Arc::new(Semaphore::new(max_connections)),
                    returned: Notify::new(),
                }),
            }),
        }
    }

    /// Sends `req` to a backend (a pooled connection, or a new one) and
    /// returns the response once its head is read; the body streams from
    /// the connection as it is polled. The request's URI gives only the
    /// path and query (and `Host` when the headers carry none); its headers
    /// go as they are, except the framing ones, which are ours.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, ProxyError>
    where
        B: BytesBody + Send,
    {
        let (parts, body) = req.into_parts();
        let mut body = pin!(body);
        let framing = request_framing(&parts.headers, &*body);
        let head = request_head(&parts, framing);
        let req_close = framing::connection_has(&parts.headers, "close");
        let is_head = parts.method == Method::HEAD;
        let may_resend = idempotent(&parts.method);

        let (mut conn, mut reused) = match self.inner.pool.checkout() {
            Some(c) => (c, true),
            None => Box::pin(self.acquire()).await?,
        };
        loop {
            let attempt = exchange(&mut conn, &head, body.as_mut(), framing, is_head).await;
            match attempt {
                Ok((resp_head, buf, sent_whole)) => {
                    let reusable = resp_head.keep_alive && !req_close && sent_whole;
                    return Ok(self.response(conn, resp_head, buf, reusable));
                }
                // Only a request with no body can go again (nothing of it
                // was taken from the peer), and once written whole only an
                // idempotent one (RFC 9112 §9.3.1).
                Err(f)
                    if reused
                        && framing == Outgoing::Empty
                        && (f.stale == Stale::Unsent
                            || (f.stale == Stale::Unanswered && may_resend)) =>
                {
                    tracing::debug!(backend = %conn.addr, error = %f.error, "pooled backend connection was closed; retrying on a new one");
                    // The closed connection's slot goes to its successor.
                    let Conn {
                        io, _slot: slot, ..
                    } = conn;
                    drop(io);
                    conn = Box::pin(self.connect(slot)).await?;
                    reused = false;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// A pooled connection, or a new one once the export is below its
    /// connection cap, whichever comes first; the bool says pooled.
    async fn acquire(&self) -> Result<(Conn, bool), ProxyError> {
        let pool = &self.inner.pool;
        if let Ok(slot) = Arc::clone(&pool.slots).try_acquire_owned() {
            return Ok((self.connect(slot).await?, false));
        }
        loop {
            // Registered before looking, so a connection coming back in
            // between is not missed.
            let mut returned = pin!(pool.returned.notified());
            returned.as_mut().enable();
            if let Some(conn) = pool.checkout() {
                return Ok((conn, true));
            }
            tokio::select! {
                slot = Arc::clone(&pool.slots).acquire_owned() => {
                    let slot = slot.map_err(|_| {
                        ProxyError::internal(ErrorKind::Overloaded, "backend connection slots closed")
                    })?;
                    return Ok((self.connect(slot).await?, false));
                }
                () = returned => {}
            }
        }
    }

    async fn connect(&self, slot: OwnedSemaphorePermit) -> Result<Conn, ProxyError> {
        let (io, addr) = self
            .inner
            .connector
            .connect(self.inner.connect_timeout)
            .await?;
        Ok(Conn {
            io,
            addr,
            _slot: slot,
        })
    }

    fn response(
        &self,
        conn: Conn,
        head: Head,
        buf: BytesMut,
        reusable: bool,
    ) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::empty());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        let state = BodyState {
            conn,
            buf,
            read: head.read,
            reusable: reusable && head.read != Read::Close,
            pool: Arc::clone(&self.inner.pool),
        };
        if head.read == Read::Framed(Framing::Length(0)) {
            // No body: the connection is free now, before hyper writes.
            framing::BodySource::finish(state);
        } else {
            *resp.body_mut() = ResponseBody::new(state);
        }
        resp
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.pool.len()
    }
}

/// The framing of the request body: its exact size when the body or the
/// peer's `Content-Length` tells it, chunked otherwise.
fn request_framing<B: Body>(headers: &HeaderMap, body: &B) -> Outgoing {
    if body.is_end_stream() {
        return Outgoing::Empty;
    }
    if let Some(n) = body.size_hint().exact() {
        return Outgoing::Length(n);
    }
    match framing::declared_length(headers) {
        Some(n) => Outgoing::Length(n),
        None => Outgoing::Chunked,
    }
}

/// The request line and fields, framing fields ours.
fn request_head(parts: &http::request::Parts, framing: Outgoing) -> BytesMut {
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.put_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
    {
        framing::put_field(&mut out, b"host", authority.as_str().as_bytes());
    }
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue;
        }
        framing::put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Outgoing::Empty => {
            // Methods whose requests carry content say "none" explicitly.
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                || parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                out.put_slice(b"content-length: 0\r\n");
            }
        }
        Outgoing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Outgoing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
    out
}

fn upstream(kind: ErrorKind, addr: &str, what: impl std::fmt::Display) -> ProxyError {
    ProxyError::upstream(kind, format!("backend {addr}: {what}"))
}

/// One request and response head on `conn`. Returns the head, the bytes
/// read past it, and whether the request body was sent whole.
async fn exchange<B>(
    conn: &mut Conn,
    head: &[u8],
    body: Pin<&mut B>,
    framing: Outgoing,
    is_head: bool,
) -> Result<(Head, BytesMut, bool), Failed>
where
    B: BytesBody,
{
    let addr = &conn.addr;
    let (mut rd, mut wr) = conn.io.split();
    let mut buf = BytesMut::with_capacity(HEAD_CHUNK);
    if framing == Outgoing::Empty {
        if let Err(e) = wr.write_all(head).await {
            return Err(Failed {
                error: upstream(
                    ErrorKind::Io,
                    addr,
                    format_args!("writing the request: {e}"),
                ),
                stale: Stale::Unsent,
            });
        }
        let parsed = read_head(&mut rd, &mut buf, addr, is_head).await?;
        return Ok((parsed, buf, true));
    }

    // With a body, the response is read while the body is written: a
    // backend may answer (413, 401) without reading all of it.
    let mut written: Option<Result<(), WriteError>> = None;
    let parsed = {
        let mut write = pin!(write_body(&mut wr, head, body, framing, addr));
        let mut read = pin!(read_head(&mut rd, &mut buf, addr, is_head));
        loop {
            tokio::select! {
                biased;
                r = read.as_mut() => break r,
                w = write.as_mut(), if written.is_none() => {
                    if let Err(WriteError::Downstream(e)) = w {
                        return Err(Failed::fatal(e));
                    }
                    written = Some(w);
                }
            }
        }
    };
    match (parsed, written) {
        (Ok(h), w) => Ok((h, buf, matches!(w, Some(Ok(()))))),
        // A write failure explains a missing response better than the EOF.
        (Err(_), Some(Err(WriteError::Upstream(e)))) => Err(Failed::fatal(e)),
        (Err(f), _) => Err(Failed::fatal(f.error)),
    }
}

enum WriteError {
    /// The backend connection failed.
    Upstream(ProxyError),
    /// The peer's request body failed or broke its declared length.
    Downstream(ProxyError),
}

/// Writes the head and the body, gathering what the body has ready into
/// one write and writing before waiting for more.
async fn write_body<B>(
    wr: &mut WriteHalf<'_>,
    head: &[u8],
    body: Pin<&mut B>,
    framing: Outgoing,
    addr: &str,
) -> Result<(), WriteError>
where
    B: BytesBody,
{
    let io_err = |e: io::Error| {
        WriteError::Upstream(upstream(
            ErrorKind::Io,
            addr,
            format_args!("writing the request: {e}"),
        ))
    };
    let mut out = BytesMut::with_capacity(head.len().max(WRITE_COALESCE / 4));
    out.put_slice(head);
    let delimit = match framing {
        Outgoing::Chunked => Delimit::Chunked,
        Outgoing::Length(n) => Delimit::Length(n),
        // Not called for a bodiless request; were it, no byte may follow.
        Outgoing::Empty => Delimit::Length(0),
    };
    match framing::write_body(wr, &mut out, body, delimit).await {
        Ok(()) => {}
        Err(WriteBodyError::Write(e)) => return Err(io_err(e)),
        Err(WriteBodyError::Source(e)) => {
            return Err(WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Io,
                format!("reading the request body: {e}"),
            )));
        }
        Err(WriteBodyError::Longer { declared, .. }) => {
            return Err(WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Protocol,
                format!("request body longer than its content-length {declared}"),
            )));
        }
        Err(WriteBodyError::Shorter { declared, got }) => {
            return Err(WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Protocol,
                format!("request body ended after {got} of its {declared} bytes"),
            )));
        }
    }
    if !out.is_empty() {
        wr.write_all(&out).await.map_err(io_err)?;
    }
    Ok(())
}
mod pool;
mod response;

use pool::{Conn, Pool};
pub use response::{BodyState, ResponseBody};
use response::{Parsed, parse_head, read_head};

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
