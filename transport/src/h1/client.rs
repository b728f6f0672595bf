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
//! An export has at most [`defaults::MAX_BACKEND_CONNECTIONS`] backend
//! connections open, idle or busy (as Envoy's default circuit breaker);
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

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::backend::Backends;
use super::error::{ErrorKind, ProxyError};
use super::h1::{
    self, BodyError, BoxError, Chunk, Framing, HEAD_CHUNK, MAX_HEAD, MAX_HEADERS, WRITE_COALESCE,
};
use crate::config::{HostPort, defaults};

/// Idle connections kept per export; more are closed when they come back.
/// As many as the streams a busy peer runs at once, so that a steady load
/// does not churn backend connections (an idle one holds no buffer).
pub const MAX_IDLE: usize = 1024;

/// The HTTP/1.1 client of one export: its backends and its idle pool.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct H1Client {
    inner: Arc<Inner>,
}

struct Inner {
    backends: Arc<Backends>,
    connect_timeout: Duration,
    pool: Arc<Pool>,
}

/// Idle keep-alive connections, most recently used last. The lock is held
/// for a push or a pop, never across an `.await`.
struct Pool {
    idle: Mutex<Vec<Idle>>,
    idle_timeout: Duration,
    cap: usize,
    /// One permit per open connection, idle or busy.
    slots: Arc<Semaphore>,
    /// A connection went back to `idle`: for requests waiting for a slot.
    returned: Notify,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One backend connection, the address it was made to (for messages) and
/// its place under the export's connection cap.
struct Conn {
    io: TcpStream,
    addr: HostPort,
    _slot: OwnedSemaphorePermit,
}

impl Pool {
    /// The most recently pooled connection that is still usable. Entries
    /// are in the order they went idle, so once the newest has been idle
    /// too long every other one has too.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() > self.idle_timeout {
                // Closed after the lock is released.
                let expired = std::mem::take(&mut *idle);
                drop(idle);
                drop((entry, expired));
                return None;
            }
            if still_open(&entry.conn.io) {
                return Some(entry.conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest sit at the front; drop those past their time so a busy
        // export does not keep stale sockets at the bottom of the stack.
        let expired = idle
            .iter()
            .take_while(|e| e.since.elapsed() > self.idle_timeout)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        if idle.len() < self.cap {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            drop(idle);
            self.returned.notify_one();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// Whether an idle connection is still open: the reactor has seen nothing
/// readable on it (the common case, no syscall), or a peek finds neither
/// EOF nor stray bytes.
fn still_open(io: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match io.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
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
    pub fn new(backends: Arc<Backends>, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self::with_max_connections(
            backends,
            connect_timeout,
            idle_timeout,
            defaults::MAX_BACKEND_CONNECTIONS,
        )
    }

    /// A client that keeps at most `max_connections` backend connections
    /// open (at least one).
    pub fn with_max_connections(
        backends: Arc<Backends>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_connections: usize,
    ) -> Self {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        H1Client {
            inner: Arc::new(Inner {
                backends,
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
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let mut body = pin!(body);
        let framing = request_framing(&parts.headers, &*body);
        let head = request_head(&parts, framing);
        let req_close = h1::connection_has(&parts.headers, "close");
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
            .backends
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
            h1::BodySource::finish(state);
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
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
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
        out.put_slice(b"host: ");
        out.put_slice(authority.as_str().as_bytes());
        out.put_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
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

fn upstream(kind: ErrorKind, addr: &HostPort, what: impl std::fmt::Display) -> ProxyError {
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
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
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
    mut body: Pin<&mut B>,
    framing: Outgoing,
    addr: &HostPort,
) -> Result<(), WriteError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
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
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    wr.write_all(&out).await.map_err(io_err)?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            let e: BoxError = e.into();
            WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Io,
                format!("reading the request body: {e}"),
            ))
        })?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Outgoing::Length(n) = framing
            && sent > n
        {
            return Err(WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Protocol,
                format!("request body longer than its content-length {n}"),
            )));
        }
        h1::put_data(wr, &mut out, &data, framing == Outgoing::Chunked)
            .await
            .map_err(io_err)?;
    }
    match framing {
        Outgoing::Chunked => h1::put_last_chunk(&mut out, trailers.as_ref()),
        Outgoing::Length(n) if sent != n => {
            return Err(WriteError::Downstream(ProxyError::downstream(
                ErrorKind::Protocol,
                format!("request body ended after {sent} of its {n} bytes"),
            )));
        }
        _ => {}
    }
    if !out.is_empty() {
        wr.write_all(&out).await.map_err(io_err)?;
    }
    Ok(())
}

/// Reads up to the final response head, skipping 1xx interim responses.
/// `Stale::Unanswered` in the failure means not a byte arrived before EOF
/// or a reset.
async fn read_head(
    rd: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    addr: &HostPort,
    is_head: bool,
) -> Result<Head, Failed> {
    let mut got_any = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf, is_head)
                .map_err(|why| Failed::fatal(upstream(ErrorKind::Protocol, addr, why)))?
            {
                Parsed::Final(head, len) => {
                    buf.advance(len);
                    return Ok(head);
                }
                Parsed::Interim(len) => {
                    buf.advance(len);
                    continue;
                }
                Parsed::Partial => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(Failed::fatal(upstream(
                ErrorKind::Protocol,
                addr,
                format_args!("response head larger than {MAX_HEAD} bytes"),
            )));
        }
        buf.reserve(HEAD_CHUNK);
        match rd.read_buf(buf).await {
            Ok(0) => {
                let what = if got_any {
                    "connection closed in the middle of a response head"
                } else {
                    "connection closed before a response"
                };
                return Err(Failed {
                    error: upstream(ErrorKind::Io, addr, what),
                    stale: if got_any {
                        Stale::No
                    } else {
                        Stale::Unanswered
                    },
                });
            }
            Ok(_) => got_any = true,
            Err(e) => {
                let reset = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                );
                return Err(Failed {
                    error: upstream(
                        ErrorKind::Io,
                        addr,
                        format_args!("reading the response: {e}"),
                    ),
                    stale: if reset && !got_any {
                        Stale::Unanswered
                    } else {
                        Stale::No
                    },
                });
            }
        }
    }
}

enum Parsed {
    Partial,
    /// A 1xx response of this length, to skip.
    Interim(usize),
    Final(Head, usize),
}

fn parse_head(buf: &[u8], is_head: bool) -> Result<Parsed, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("more than {MAX_HEADERS} response header fields"));
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let code = resp.code.unwrap_or_default();
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("invalid response status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 switching protocols: upgrades are not proxied".to_owned());
    }
    if status.is_informational() {
        return Ok(Parsed::Interim(len));
    }
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for field in resp.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| format!("invalid response header name {:?}", field.name))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| format!("invalid value for response header {name}"))?;
        headers.append(name, value);
    }
    let mut keep_alive = h1::keeps_alive(version, &headers);
    let read = if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        // No body by definition (RFC 9112 §6.3). One that declares a
        // length may still be followed by those bytes from a careless
        // backend, maybe only after the connection went back to the pool:
        // such a connection is not reused.
        if declares_body(&headers) {
            keep_alive = false;
        }
        Read::Framed(Framing::Length(0))
    } else {
        response_framing(&headers)?
    };
    Ok(Parsed::Final(
        Head {
            status,
            version,
            headers,
            read,
            keep_alive,
        },
        len,
    ))
}

/// Whether a head declares body bytes to follow: a transfer coding, or a
/// content-length other than 0.
fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get_all(header::CONTENT_LENGTH).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|n| n.trim_ascii() != b"0")
        })
}

/// RFC 9112 §6.3 for a response that has a body.
fn response_framing(headers: &HeaderMap) -> Result<Read, String> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .peekable();
    if codings.peek().is_some() {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err("response has both content-length and transfer-encoding".to_owned());
        }
        let all: Vec<&[u8]> = codings.collect();
        return match all.as_slice() {
            [only] if only.eq_ignore_ascii_case(b"chunked") => {
                Ok(Read::Framed(Framing::Chunked(Chunk::Size)))
            }
            _ => Err("response transfer codings other than chunked are not supported".to_owned()),
        };
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    format!(
                        "invalid response content-length {:?}",
                        String::from_utf8_lossy(part)
                    )
                })?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting response content-length values".to_owned());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => Read::Framed(Framing::Length(n)),
        None => Read::Close,
    })
}

/// A response body read from the backend connection it owns while it
/// streams. At a clean end the connection goes back to the export's pool
/// (when reusable); dropped earlier, the connection is closed.
pub type ResponseBody = h1::ConnBody<BodyState>;

pub struct BodyState {
    conn: Conn,
    /// Bytes read past what was handed out.
    buf: BytesMut,
    read: Read,
    reusable: bool,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ResponseBody");
        if let Some(st) = self.source() {
            d.field("backend", &st.conn.addr.to_string())
                .field("read", &st.read)
                .field("reusable", &st.reusable);
        }
        d.finish_non_exhaustive()
    }
}

impl h1::BodySource for BodyState {
    type Error = ProxyError;

    fn length(&self) -> Option<u64> {
        match self.read {
            Read::Framed(Framing::Length(n)) => Some(n),
            _ => None,
        }
    }

    fn finish(self) {
        if self.reusable && self.buf.is_empty() {
            // The buffer is dropped here: an idle connection holds none.
            self.pool.checkin(self.conn);
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Frame<Bytes>>, ProxyError>> {
        let io = &mut self.conn.io;
        let addr = &self.conn.addr;
        match &mut self.read {
            Read::Framed(framing) => {
                let res = ready!(h1::poll_decode(framing, &mut self.buf, cx, |buf, cx| {
                    h1::poll_fill(Pin::new(&mut *io), buf, cx)
                }));
                Poll::Ready(res.map_err(|e| match e {
                    BodyError::Io(e) => upstream(
                        ErrorKind::Io,
                        addr,
                        format_args!("reading the response body: {e}"),
                    ),
                    BodyError::Incomplete => upstream(
                        ErrorKind::Io,
                        addr,
                        "connection closed before the response body ended",
                    ),
                    BodyError::Chunked(why) => upstream(
                        ErrorKind::Protocol,
                        addr,
                        format_args!("malformed chunked response body: {why}"),
                    ),
                }))
            }
            Read::Close => {
                if self.buf.is_empty() {
                    let more = ready!(h1::poll_fill(Pin::new(&mut *io), &mut self.buf, cx))
                        .map_err(|e| {
                            upstream(
                                ErrorKind::Io,
                                addr,
                                format_args!("reading the response body: {e}"),
                            )
                        })?;
                    if !more {
                        return Poll::Ready(Ok(None));
                    }
                }
                Poll::Ready(Ok(Some(Frame::data(self.buf.split().freeze()))))
            }
        }
    }
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::net::TcpListener;

    use super::*;

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

    fn client(addr: SocketAddr) -> H1Client {
        let backends = Backends::new(&[HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        }]);
        // No test here is about the connect timeout: generous, so that a
        // burst of hundreds of loopback connects on a loaded machine (one
        // runtime thread, a busy core) is not mistaken for a dead backend.
        H1Client::new(
            Arc::new(backends),
            Duration::from_secs(20),
            Duration::from_secs(60),
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
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
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
        let backends = Backends::new(&[HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        }]);
        let c = Arc::new(H1Client::with_max_connections(
            Arc::new(backends),
            Duration::from_secs(2),
            Duration::from_secs(60),
            CAP,
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
        let backends = Backends::new(&[HostPort {
            host: b.addr.ip().to_string(),
            port: b.addr.port(),
        }]);
        let c = H1Client::new(
            Arc::new(backends),
            Duration::from_secs(2),
            Duration::from_millis(100),
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
}
