//! The HTTP/1.1 server side of egress: one connection from a local app,
//! requests read one after the other (pipelined bytes are kept for the next),
//! each handed to egress as an [`http::Request`] and its response written
//! back with the framing the client can read.
//!
//! Why not hyper's server here: a keep-alive client that sits idle between
//! requests is the common case for a sidecar-less gateway, and hyper keeps its
//! read and write buffers (8 KiB and more) for the life of the connection.
//! This loop waits for the next request with no buffer at all, allocates one
//! only while a request head or body is being read, and frees it after;
//! an idle client costs the socket and a small task.
//!
//! What it implements (RFC 9112): request heads of up to [`MAX_HEAD`] bytes
//! and [`MAX_HEADERS`] fields, bodies framed by `Content-Length` or chunked
//! (trailers passed on), `Expect: 100-continue`, HTTP/1.0 keep-alive,
//! pipelining, and responses framed by length, chunked, or by closing for an
//! HTTP/1.0 client. What it refuses, with a status and `connection: close`:
//! malformed heads (400), heads too large (431), a body with both
//! `Content-Length` and `Transfer-Encoding`, conflicting lengths, a list of
//! lengths in one field, or `Transfer-Encoding` in HTTP/1.0 (400, the
//! request-smuggling shapes), transfer codings other than chunked (501),
//! and `CONNECT` (405; tunnels are not proxied). Chunk-size lines are read
//! to the letter of RFC 9112 §7.1 and trailer lines must end in CRLF.
//! Repeated identical `Content-Length` fields are folded into one, as
//! hyper does. A client that opens a connection and sends no complete head
//! within the header timeout is closed. `differential_tests` holds this
//! loop to hyper's reading of the same bytes.

use std::fmt::Write as _;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::framing::{
    self, BadField, BadLength, BodyError, BodySource, Chunk, ConnBody, Delimit, Framing,
    HEAD_CHUNK, MAX_HEAD, MAX_HEADERS, WriteBodyError, connection_has, keeps_alive, poll_decode,
    poll_fill,
};
use crate::error::ErrorKind;
use crate::handoff;
use crate::http::{BytesBody, Handler};

/// How long a finished response waits for the request body to be handed
/// back before the connection is closed instead of reused.
const BODY_RETURN: Duration = Duration::from_secs(1);

pub use crate::http::BoxError;

/// Timeouts and hand-offs of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// For the first request, from the connection's start to the end of
    /// its head; for later ones, from the first byte of a head to its end.
    pub header_timeout: Duration,
    /// Between requests on a kept-alive connection.
    pub idle_timeout: Duration,
    /// Responses written between two yields of the core to the client
    /// ([`handoff`]); 0 never yields. A setting of the loop, not of the
    /// process: each listener passes what its config says.
    pub yield_every: u32,
}

/// Why a connection ended other than by the client closing it.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("reading from the client: {0}")]
    Read(io::Error),
    #[error("writing to the client: {0}")]
    Write(io::Error),
    #[error("request head not received within {0:?}")]
    HeadTimeout(Duration),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("response body failed: {0}")]
    ResponseBody(BoxError),
    #[error("response body length {got} differs from its content-length {declared}")]
    ResponseLength { declared: u64, got: u64 },
}

/// How [`serve`] ended without an error.
#[derive(Debug)]
pub enum Served {
    /// The client closed, went idle, or the gateway is shutting down.
    Closed,
    /// The connection opened with the HTTP/2 connection preface (h2c with
    /// prior knowledge): handed back untouched, nothing consumed.
    H2Preface(TcpStream),
}

/// Whether the bytes waiting on a fresh connection start with "PRI", the
/// method of the HTTP/2 preface and of no HTTP/1.1 request. A client that
/// speaks h2c sends its 24-byte preface in one write. Peeks only.
async fn opens_with_h2_preface(rd: &mut OwnedReadHalf) -> bool {
    let mut first = [0u8; 3];
    matches!(rd.peek(&mut first).await, Ok(3)) && &first == b"PRI"
}

/// Waits, holding as little as it can, until the client sends (true), or
/// the idle timeout passes or shutdown begins (false). This is the state of
/// every idle keep-alive connection, so it polls the socket's readiness
/// directly instead of keeping a readiness future beside the timer.
async fn next_request(
    reader: &OwnedReadHalf,
    idle: Duration,
    shutdown: &CancellationToken,
) -> io::Result<bool> {
    let mut cancelled = pin!(shutdown.cancelled());
    let mut expired = pin!(tokio::time::sleep(idle));
    poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(false));
        }
        let tcp: &TcpStream = reader.as_ref();
        if let Poll::Ready(ready) = tcp.poll_read_ready(cx) {
            return Poll::Ready(ready.map(|()| true));
        }
        expired.as_mut().poll(cx).map(|()| Ok(false))
    })
    .await
}

/// Serves requests on `tcp` until the client closes, an error, the idle
/// timeout, or `shutdown` (checked between requests: one in flight is
/// finished first).
pub async fn serve<H>(
    tcp: TcpStream,
    settings: &Settings,
    shutdown: &CancellationToken,
    handler: H,
) -> Result<Served, ConnError>
where
    H: Handler<RequestBody, Body: Unpin>,
{
    let (rd, mut wr) = tcp.into_split();
    // The first request head is due `header_timeout` after the connection
    // opened, not after its first byte: a client that connects and sends
    // nothing, or a trickle, holds a connection slot no longer than that
    // (as hyper's header read timeout does). Later heads get the idle
    // timeout to begin and `header_timeout` from their first byte.
    let mut first_head_due = Some(Instant::now() + settings.header_timeout);
    let mut rd = Some(rd);
    // Bytes read past the previous request (pipelining); empty otherwise.
    let mut buf = BytesMut::new();
    loop {
        let Some(reader) = rd.as_mut() else {
            return Ok(Served::Closed);
        };
        if buf.is_empty() {
            // Idle: hold no buffer while waiting for the next request.
            buf = BytesMut::new();
            let wait = match first_head_due {
                Some(due) => due.saturating_duration_since(Instant::now()),
                None => settings.idle_timeout,
            };
            if !next_request(reader, wait, shutdown)
                .await
                .map_err(ConnError::Read)?
            {
                if first_head_due.is_some() && !shutdown.is_cancelled() {
                    return Err(ConnError::HeadTimeout(settings.header_timeout));
                }
                return Ok(Served::Closed);
            }
        }
        let first = first_head_due.take();
        let head_due = first.unwrap_or_else(|| Instant::now() + settings.header_timeout);
        if first.is_some() {
            match tokio::time::timeout_at(head_due, opens_with_h2_preface(reader)).await {
                Err(_) => return Err(ConnError::HeadTimeout(settings.header_timeout)),
                Ok(false) => {}
                Ok(true) => {
                    let Some(reader) = rd.take() else {
                        return Ok(Served::Closed);
                    };
                    return Ok(reader.reunite(wr).map_or(Served::Closed, Served::H2Preface));
                }
            }
        }
        // One request and its response, boxed: an idle connection's task
        // then holds only the wait above, not the state of an exchange.
        let keep_alive = Box::pin(exchange(
            &mut rd, &mut wr, &mut buf, head_due, *settings, &handler,
        ))
        .await?;
        if !keep_alive || shutdown.is_cancelled() {
            let _ = wr.shutdown().await;
            return Ok(Served::Closed);
        }
    }
}

/// Reads one request, has it handled and writes the response. Returns
/// whether the connection may carry another request.
async fn exchange<H>(
    rd: &mut Option<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    head_due: Instant,
    settings: Settings,
    handler: &H,
) -> Result<bool, ConnError>
where
    H: Handler<RequestBody, Body: Unpin>,
{
    let Some(reader) = rd.as_mut() else {
        return Ok(false);
    };
    let head = tokio::time::timeout_at(head_due, read_head(reader, buf)).await;
    let head = match head {
        Err(_) => return Err(ConnError::HeadTimeout(settings.header_timeout)),
        Ok(Err(HeadError::Io(e))) => return Err(ConnError::Read(e)),
        Ok(Err(HeadError::Closed)) => return Ok(false),
        Ok(Err(HeadError::Refused(status, why))) => {
            let _ = write_refusal(wr, status, &why, settings.yield_every).await;
            return Err(ConnError::BadRequest(why));
        }
        Ok(Ok(head)) => head,
    };
    let Head {
        method,
        uri,
        version,
        headers,
        framing,
        mut keep_alive,
        expect_continue,
    } = head;

    if expect_continue && framing != Framing::Length(0) {
        wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(ConnError::Write)?;
    }
    let (body, returned) = match framing {
        Framing::Length(0) => (RequestBody::empty(), None),
        framing => {
            let (tx, rx) = oneshot::channel();
            let Some(reader) = rd.take() else {
                return Ok(false);
            };
            let state = BodyState {
                rd: reader,
                buf: std::mem::take(buf),
                framing,
                give_back: tx,
            };
            (RequestBody::new(state), Some(rx))
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;

    let resp = handler(req).await;
    write_response(
        wr,
        resp,
        &method,
        version,
        &mut keep_alive,
        settings.yield_every,
    )
    .await?;

    if let Some(rx) = returned {
        match tokio::time::timeout(BODY_RETURN, rx).await {
            Ok(Ok((reader, rest))) => {
                *rd = Some(reader);
                *buf = rest;
            }
            // The body was not read to its end: the stream is not at a
            // request boundary any more.
            _ => keep_alive = false,
        }
    }
    Ok(keep_alive)
}

pub(super) struct Head {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) expect_continue: bool,
}

pub(super) enum HeadError {
    /// The client closed before sending a byte of a new request.
    Closed,
    Io(io::Error),
    Refused(StatusCode, String),
}

fn refused(status: StatusCode, why: impl Into<String>) -> HeadError {
    HeadError::Refused(status, why.into())
}

async fn read_head(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Head, HeadError> {
    loop {
        if !buf.is_empty()
            && let Some((head, len)) = parse_head(buf)?
        {
            buf.advance(len);
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD {
            return Err(refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("request head larger than {MAX_HEAD} bytes"),
            ));
        }
        buf.reserve(HEAD_CHUNK);
        match rd.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(HeadError::Closed),
            Ok(0) => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "connection closed in the middle of a request head",
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// Parses a complete request head at the start of `buf`: `None` if more
/// bytes are needed.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                format!("malformed request head: {e}"),
            ));
        }
    };
    let bad = |why: String| refused(StatusCode::BAD_REQUEST, why);
    let method_text = req.method.unwrap_or_default();
    let method = Method::from_bytes(method_text.as_bytes())
        .map_err(|_| bad(format!("invalid method {method_text:?}")))?;
    if method == Method::CONNECT {
        return Err(refused(StatusCode::METHOD_NOT_ALLOWED, CONNECT_REFUSED));
    }
    let target = req.path.unwrap_or_default();
    let uri: Uri = target
        .parse()
        .map_err(|_| bad(format!("invalid request target {target:?}")))?;
    let version = framing::version(req.version);
    let mut headers = framing::header_map(req.headers).map_err(|e| match e {
        BadField::Name(name) => bad(format!("invalid header name {name:?}")),
        BadField::Value(name) => bad(format!("invalid value for header {name}")),
    })?;

    let framing = request_framing(&mut headers, version)?;
    let keep_alive = keeps_alive(version, &headers);
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // Framing is ours to carry now; the forwarded request carries its own.
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::EXPECT);
    Ok(Some((
        Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

/// The framing of a request body (RFC 9112 §6.3), as hyper's server reads
/// it where both are safe: repeated identical `Content-Length` fields are
/// folded into one (the forwarded request carries a single field), while a
/// list in one field (`5, 5`), differing values, both `Content-Length` and
/// `Transfer-Encoding`, and `Transfer-Encoding` in an HTTP/1.0 request
/// (§6.1: faulty framing) are refused.
fn request_framing(headers: &mut HeaderMap, version: Version) -> Result<Framing, HeadError> {
    let bad = |why: &str| refused(StatusCode::BAD_REQUEST, why);
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(bad(
                "an HTTP/1.0 request cannot carry Transfer-Encoding (faulty framing)",
            ));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(bad("request has both Content-Length and Transfer-Encoding"));
        }
        let all: Vec<&[u8]> = framing::transfer_codings(headers).collect();
        // Empty elements (an empty field, `chunked,`) are refused, not
        // skipped as RFC 9110 §5.6.1 lets a recipient do: hyper reads
        // `chunked` followed by an empty field as not chunked, and two
        // readings of one request's framing is what smuggling needs.
        if all.iter().any(|c| c.is_empty()) {
            return Err(bad("empty element in Transfer-Encoding"));
        }
        return if framing::only_chunked(&all) {
            Ok(Framing::Chunked(Chunk::Size))
        } else {
            Err(refused(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            ))
        };
    }
    // No lists in one field: hyper's server refuses `5, 5`, and a request
    // read two ways is the smuggling shape.
    let length = framing::content_length(headers, false).map_err(|e| match e {
        BadLength::Invalid(field) => refused(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid Content-Length {:?}",
                String::from_utf8_lossy(field)
            ),
        ),
        BadLength::Conflicting => bad("conflicting Content-Length values"),
    })?;
    // One field goes on, the first as sent (hyper's choice too).
    if headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .nth(1)
        .is_some()
        && let Some(first) = headers.get(header::CONTENT_LENGTH).cloned()
    {
        headers.insert(header::CONTENT_LENGTH, first);
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// The body of a request read from the client connection. It owns the
/// connection's read half while the body streams and hands it back, with any
/// bytes read past the body, when the body ends.
pub type RequestBody = ConnBody<BodyState>;

pub struct BodyState {
    rd: OwnedReadHalf,
    buf: BytesMut,
    framing: Framing,
    give_back: oneshot::Sender<(OwnedReadHalf, BytesMut)>,
}

impl BodySource for BodyState {
    type Error = BodyError;

    fn length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    fn finish(self) {
        // The connection may have gone already; nothing to hand back then.
        let _ = self.give_back.send((self.rd, self.buf));
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, BodyError>> {
        let rd = &mut self.rd;
        poll_decode(&mut self.framing, &mut self.buf, cx, |buf, cx| {
            poll_fill(Pin::new(&mut *rd), buf, cx)
        })
    }
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes one response: head, then the body by its framing. Long because
/// the head and small bodies are coalesced into one write and each framing
/// (length, chunked with trailers, close) ends differently.
async fn write_response<B>(
    wr: &mut OwnedWriteHalf,
    resp: Response<B>,
    method: &Method,
    version: Version,
    keep_alive: &mut bool,
    yield_every: u32,
) -> Result<(), ConnError>
where
    B: BytesBody + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");

    let declared = framing::declared_length(&parts.headers);
    let bodiless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Out::None
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if body.is_end_stream() {
        Out::Length(0)
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if version == Version::HTTP_11 {
        Out::Chunked
    } else {
        *keep_alive = false;
        Out::Close
    };
    if connection_has(&parts.headers, "close") {
        *keep_alive = false;
    }
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        framing::put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Out::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Out::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Out::None => {
            // A HEAD response says how long the body would have been.
            let would_be = declared.or_else(|| {
                (method == Method::HEAD)
                    .then(|| body.size_hint().exact())
                    .flatten()
            });
            if let Some(n) = would_be {
                let _ = write!(out, "content-length: {n}\r\n");
            }
        }
        Out::Close => {}
    }
    if !*keep_alive {
        out.put_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");

    if framing == Out::None {
        drop(body);
        wr.write_all(&out).await.map_err(ConnError::Write)?;
        handoff::handed_off(yield_every);
        return Ok(());
    }
    let delimit = match framing {
        Out::Length(n) => Delimit::Length(n),
        Out::Chunked => Delimit::Chunked,
        Out::Close | Out::None => Delimit::Close,
    };
    match framing::write_body(wr, &mut out, Pin::new(&mut body), delimit).await {
        Ok(()) => {}
        Err(WriteBodyError::Write(e)) => return Err(ConnError::Write(e)),
        Err(WriteBodyError::Source(e)) => return Err(ConnError::ResponseBody(e)),
        Err(WriteBodyError::Longer { declared, got }) => {
            return Err(ConnError::ResponseLength { declared, got });
        }
        Err(WriteBodyError::Shorter { declared, got }) => {
            // What came goes out before the connection closes.
            let _ = wr.write_all(&out).await;
            return Err(ConnError::ResponseLength { declared, got });
        }
    }
    wr.write_all(&out).await.map_err(ConnError::Write)?;
    handoff::handed_off(yield_every);
    if framing == Out::Close {
        let _ = wr.shutdown().await;
    }
    Ok(())
}

/// The fields a response head does not carry from the handler: the
/// hop-by-hop ones, and `Trailer`, as this loop frames the body itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::http::is_hop_by_hop(name) || *name == header::TRAILER
}

/// Why `CONNECT` is refused, by this server and by the HTTP/2 one.
pub const CONNECT_REFUSED: &str = "CONNECT tunnels are not proxied";

/// The answer to a request refused for its protocol: `status`, the reason
/// as text and `x-elsinore-error: protocol`.
pub fn refusal(status: StatusCode, why: &str) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(format!("{why}\n")));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        "x-elsinore-error",
        HeaderValue::from_static(ErrorKind::Protocol.as_str()),
    );
    resp
}

/// Refuses a request the loop cannot read: status, reason, close.
async fn write_refusal(
    wr: &mut OwnedWriteHalf,
    status: StatusCode,
    why: &str,
    yield_every: u32,
) -> Result<(), ConnError> {
    let resp = refusal(status, why).map(http_body_util::Full::new);
    let mut keep_alive = false;
    write_response(
        wr,
        resp,
        &Method::GET,
        Version::HTTP_11,
        &mut keep_alive,
        yield_every,
    )
    .await?;
    wr.shutdown().await.map_err(ConnError::Write)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests;
