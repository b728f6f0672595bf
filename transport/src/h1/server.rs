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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::ErrorKind;
use super::handoff;

/// The largest request head (request line and fields) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one request head (or trailer section).
pub const MAX_HEADERS: usize = 128;
/// First allocation for a request head; grows while the head is incomplete.
pub(super) const HEAD_CHUNK: usize = 4 * 1024;
/// Read size while a request body streams.
pub(super) const BODY_CHUNK: usize = 16 * 1024;
/// Response bytes gathered before a write (head and small bodies go out in
/// one syscall).
pub(super) const WRITE_COALESCE: usize = 16 * 1024;
/// How long a finished response waits for the request body to be handed
/// back before the connection is closed instead of reused.
const BODY_RETURN: Duration = Duration::from_secs(1);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Timeouts of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// For the first request, from the connection's start to the end of
    /// its head; for later ones, from the first byte of a head to its end.
    pub header_timeout: Duration,
    /// Between requests on a kept-alive connection.
    pub idle_timeout: Duration,
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
pub async fn serve<F, Fut, B>(
    tcp: TcpStream,
    settings: Settings,
    shutdown: &CancellationToken,
    mut handler: F,
) -> Result<Served, ConnError>
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
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
            &mut rd,
            &mut wr,
            &mut buf,
            head_due,
            settings,
            &mut handler,
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
async fn exchange<F, Fut, B>(
    rd: &mut Option<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    head_due: Instant,
    settings: Settings,
    handler: &mut F,
) -> Result<bool, ConnError>
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
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
            let _ = write_refusal(wr, status, &why).await;
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
    write_response(wr, resp, &method, version, &mut keep_alive).await?;

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

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Length(u64),
    Chunked(Chunk),
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

enum HeadError {
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

/// Whether a `Connection` field of `headers` holds `token`.
pub(super) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a message lets its connection carry another one (RFC 9112
/// §9.3): never when it says close, whatever else it says; otherwise
/// HTTP/1.0 only when it asks for keep-alive, HTTP/1.1 always.
pub(super) fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    if connection_has(headers, "close") {
        return false;
    }
    match version {
        Version::HTTP_10 => connection_has(headers, "keep-alive"),
        _ => true,
    }
}

/// Parses a complete request head at the start of `buf`: `None` if more
/// bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
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
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| bad(format!("invalid header name {:?}", field.name)))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| bad(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }

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
        let all: Vec<&[u8]> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        // Empty elements (an empty field, `chunked,`) are refused, not
        // skipped as RFC 9110 §5.6.1 lets a recipient do: hyper reads
        // `chunked` followed by an empty field as not chunked, and two
        // readings of one request's framing is what smuggling needs.
        if all.iter().any(|c| c.is_empty()) {
            return Err(bad("empty element in Transfer-Encoding"));
        }
        return match all.as_slice() {
            [only] if only.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked(Chunk::Size)),
            _ => Err(refused(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            )),
        };
    }
    let mut length = None;
    let mut fields = 0;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        fields += 1;
        let text = value.as_bytes().trim_ascii();
        let n = std::str::from_utf8(text)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                refused(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "invalid Content-Length {:?}",
                        String::from_utf8_lossy(value.as_bytes())
                    ),
                )
            })?;
        if length.is_some_and(|l| l != n) {
            return Err(bad("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    // One field goes on, the first as sent (hyper's choice too).
    if fields > 1
        && let Some(first) = headers.get(header::CONTENT_LENGTH).cloned()
    {
        headers.insert(header::CONTENT_LENGTH, first);
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// A body streamed from a connection by the task that polls it: frames
/// until the end, then the connection goes back where it came from
/// ([`BodySource::finish`]); after an error the state is dropped, and the
/// connection closes with it.
pub struct ConnBody<S> {
    state: Option<S>,
}

/// What a [`ConnBody`] reads from.
pub trait BodySource {
    type Error;
    /// The next frame, or `None` when the body is complete.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Frame<Bytes>>, Self::Error>>;
    /// What is left of a body framed by length; `None` for other framings.
    fn length(&self) -> Option<u64>;
    /// The body ended cleanly: hand the connection back.
    fn finish(self);
}

impl<S: BodySource> ConnBody<S> {
    pub(super) fn new(state: S) -> Self {
        ConnBody { state: Some(state) }
    }

    pub fn empty() -> Self {
        ConnBody { state: None }
    }

    pub(super) fn source(&self) -> Option<&S> {
        self.state.as_ref()
    }

    fn finish(&mut self) {
        if let Some(state) = self.state.take() {
            state.finish();
        }
    }
}

impl<S: BodySource + Unpin> Body for ConnBody<S> {
    type Data = Bytes;
    type Error = S::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, S::Error>>> {
        let Some(state) = self.state.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(state.poll_next(cx)) {
            Ok(Some(frame)) => {
                if state.length() == Some(0) {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Ok(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Err(e) => {
                self.state = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            None => SizeHint::with_exact(0),
            Some(state) => state
                .length()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
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

/// Why a framed body could not be read ([`poll_decode`]). The messages are
/// worded for request bodies, the ones this server loop reads; the backend
/// client words its own for response bodies.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the request body: {0}")]
    Io(io::Error),
    #[error("client closed the connection before the request body ended")]
    Incomplete,
    #[error("malformed chunked request body: {0}")]
    Chunked(&'static str),
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

/// Reads more bytes into `buf` (reserving [`BODY_CHUNK`]); `Ready(Ok(false))`
/// at EOF.
pub(super) fn poll_fill<R: tokio::io::AsyncRead>(
    rd: Pin<&mut R>,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    buf.reserve(BODY_CHUNK);
    let n = ready!(tokio_util::io::poll_read_buf(rd, cx, buf))?;
    Poll::Ready(Ok(n > 0))
}

/// Decodes the next frame of a body framed by `framing` from `buf`,
/// calling `fill` (which reads more into `buf`, `false` at EOF) when it
/// needs bytes. `None` when the body is complete (`framing` is then
/// `Length(0)`); bytes past the body stay in `buf`. Shared by the request
/// bodies read here and the response bodies read by the ingress client.
pub(super) fn poll_decode<F>(
    framing: &mut Framing,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    mut fill: F,
) -> Poll<Result<Option<Frame<Bytes>>, BodyError>>
where
    F: FnMut(&mut BytesMut, &mut Context<'_>) -> Poll<io::Result<bool>>,
{
    let mut fill = |buf: &mut BytesMut, cx: &mut Context<'_>| -> Poll<Result<(), BodyError>> {
        match ready!(fill(buf, cx)) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Ready(Err(BodyError::Incomplete)),
            Err(e) => Poll::Ready(Err(BodyError::Io(e))),
        }
    };
    loop {
        match *framing {
            Framing::Length(0) => return Poll::Ready(Ok(None)),
            Framing::Length(left) => {
                if buf.is_empty() {
                    ready!(fill(buf, cx))?;
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                *framing = Framing::Length(left - take as u64);
                return Poll::Ready(Ok(Some(Frame::data(buf.split_to(take).freeze()))));
            }
            Framing::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    ready!(fill(buf, cx))?;
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let rest = left - take as u64;
                *framing = Framing::Chunked(if rest == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rest)
                });
                return Poll::Ready(Ok(Some(Frame::data(buf.split_to(take).freeze()))));
            }
            Framing::Chunked(Chunk::DataEnd) => {
                if buf.len() < 2 {
                    ready!(fill(buf, cx))?;
                    continue;
                }
                if &buf[..2] != b"\r\n" {
                    return Poll::Ready(Err(BodyError::Chunked("chunk data not followed by CRLF")));
                }
                buf.advance(2);
                *framing = Framing::Chunked(Chunk::Size);
            }
            Framing::Chunked(Chunk::Size) => {
                match parse_chunk_size(buf).map_err(BodyError::Chunked)? {
                    Some((size, len)) => {
                        buf.advance(len);
                        *framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    None => ready!(fill(buf, cx))?,
                }
            }
            Framing::Chunked(Chunk::Trailers) => {
                match parse_trailers(buf).map_err(BodyError::Chunked)? {
                    Some((trailers, len)) => {
                        buf.advance(len);
                        *framing = Framing::Length(0);
                        if !trailers.is_empty() {
                            return Poll::Ready(Ok(Some(Frame::trailers(trailers))));
                        }
                    }
                    None => {
                        if buf.len() > MAX_HEAD {
                            return Poll::Ready(Err(BodyError::Chunked(
                                "trailer section too large",
                            )));
                        }
                        ready!(fill(buf, cx))?;
                    }
                }
            }
        }
    }
}

/// A chunk-size line (RFC 9112 §7.1): the size and the line's length, or
/// `None` if the line is not complete yet. Strict where parsers have
/// disagreed (the smuggling shapes): the size starts the line, whitespace
/// is allowed only before a `;` or around an `=` of an extension (BWS),
/// extensions are `;name[=token or quoted-string]`, and the line ends in
/// CRLF, never a bare LF or CR.
fn parse_chunk_size(buf: &[u8]) -> Result<Option<(u64, usize)>, &'static str> {
    const MAX_LINE: usize = 4 * 1024;
    let Some(lf) = buf.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err("chunk-size line too long")
        } else {
            Ok(None)
        };
    };
    let line = buf[..lf]
        .strip_suffix(b"\r")
        .ok_or("chunk-size line not ended by CRLF")?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 {
        return Err("invalid chunk size");
    }
    let mut size: u64 = 0;
    for &d in &line[..digits] {
        let v = u64::from((d as char).to_digit(16).ok_or("invalid chunk size")?);
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(v))
            .ok_or("chunk size over 64 bits")?;
    }
    chunk_extensions(&line[digits..])?;
    Ok(Some((size, lf + 1)))
}

/// Checks `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`.
fn chunk_extensions(mut rest: &[u8]) -> Result<(), &'static str> {
    const BAD: &str = "malformed chunk extension";
    fn bws(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        &s[n..]
    }
    fn token(s: &[u8]) -> usize {
        s.iter().take_while(|&&b| is_tchar(b)).count()
    }
    while !rest.is_empty() {
        rest = bws(rest).strip_prefix(b";").ok_or(BAD)?;
        rest = bws(rest);
        let name = token(rest);
        if name == 0 {
            return Err(BAD);
        }
        rest = &rest[name..];
        if let Some(value) = bws(rest).strip_prefix(b"=") {
            let value = bws(value);
            let len = if value.first() == Some(&b'"') {
                quoted_string(value).ok_or(BAD)?
            } else {
                token(value)
            };
            if len == 0 {
                return Err(BAD);
            }
            rest = &value[len..];
        }
    }
    Ok(())
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The length of the quoted-string (RFC 9110 §5.6.4) that `s` starts
/// with, or `None` if it is not one.
fn quoted_string(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    loop {
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                let escaped = *s.get(i + 1)?;
                if !(escaped == b'\t' || escaped == b' ' || escaped >= 0x21 && escaped != 0x7f) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80.. => i += 1,
            _ => return None,
        }
    }
}

/// The trailer section after the last chunk, up to and including its empty
/// line: the fields and the section's length, or `None` if incomplete.
/// Every line ends in CRLF: httparse would also end lines (and the
/// section) at a bare LF, where hyper reads on to the next CRLF CRLF, so
/// the two would disagree on where the next request starts.
fn parse_trailers(buf: &[u8]) -> Result<Option<(HeaderMap, usize)>, &'static str> {
    let mut line = 0;
    let len = loop {
        let Some(lf) = buf[line..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let at = line + lf;
        if at == 0 || buf[at - 1] != b'\r' {
            return Err("trailer line not ended by CRLF");
        }
        if at == line + 1 {
            break at + 1;
        }
        line = at + 1;
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(&buf[..len], &mut fields) {
        Ok(httparse::Status::Complete((parsed, fields))) if parsed == len => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| "invalid trailer name")?;
                let value =
                    HeaderValue::from_bytes(f.value).map_err(|_| "invalid trailer value")?;
                map.append(name, value);
            }
            Ok(Some((map, len)))
        }
        _ => Err("malformed trailer section"),
    }
}

/// Adds one piece of body data to `out`, as a chunk when `chunked`, and
/// writes once `out` is full; a large piece goes out in a write of its own
/// right after what was gathered, not copied.
pub(super) async fn put_data<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut BytesMut,
    data: &[u8],
    chunked: bool,
) -> io::Result<()> {
    if chunked {
        let _ = write!(out, "{:x}\r\n", data.len());
    }
    if data.len() >= WRITE_COALESCE {
        wr.write_all(out).await?;
        out.clear();
        wr.write_all(data).await?;
    } else {
        out.put_slice(data);
    }
    if chunked {
        out.put_slice(b"\r\n");
    }
    if out.len() >= WRITE_COALESCE {
        wr.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The end of a chunked body: the last chunk and the trailer section.
pub(super) fn put_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
    Close,
}

async fn write_response<B>(
    wr: &mut OwnedWriteHalf,
    resp: Response<B>,
    method: &Method,
    version: Version,
    keep_alive: &mut bool,
) -> Result<(), ConnError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");

    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
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
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
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
        handoff::handed_off();
        return Ok(());
    }
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        // Take what the body has ready; write what is gathered before
        // waiting for more.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    wr.write_all(&out).await.map_err(ConnError::Write)?;
                    out.clear();
                }
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ConnError::ResponseBody(e.into()))?;
        let frame = match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if let Out::Length(n) = framing
                    && sent > n
                {
                    return Err(ConnError::ResponseLength {
                        declared: n,
                        got: sent,
                    });
                }
                put_data(wr, &mut out, &data, framing == Out::Chunked)
                    .await
                    .map_err(ConnError::Write)?;
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    match framing {
        // Trailers reach a client only in a chunked body.
        Out::Chunked => put_last_chunk(&mut out, trailers.as_ref()),
        Out::Length(n) if sent != n => {
            let _ = wr.write_all(&out).await;
            return Err(ConnError::ResponseLength {
                declared: n,
                got: sent,
            });
        }
        _ => {}
    }
    wr.write_all(&out).await.map_err(ConnError::Write)?;
    handoff::handed_off();
    if framing == Out::Close {
        let _ = wr.shutdown().await;
    }
    Ok(())
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Why `CONNECT` is refused, by this server and by the HTTP/2 one.
pub(super) const CONNECT_REFUSED: &str = "CONNECT tunnels are not proxied";

/// The answer to a request refused for its protocol: `status`, the reason
/// as text and `x-elsinore-error: protocol`.
pub(super) fn refusal(status: StatusCode, why: &str) -> Response<Bytes> {
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
) -> Result<(), ConnError> {
    let resp = refusal(status, why).map(http_body_util::Full::new);
    let mut keep_alive = false;
    write_response(wr, resp, &Method::GET, Version::HTTP_11, &mut keep_alive).await?;
    wr.shutdown().await.map_err(ConnError::Write)
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod differential_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
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
                    let _ = serve(s, settings, &token, echo).await;
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
        let addr = server(settings()).await;
        crate::proxy::handoff::set_every(4);
        let before = crate::proxy::handoff::yields_on_this_thread();
        let mut raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".repeat(7);
        raw.extend_from_slice(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let got = exchange(addr, &raw).await;
        assert_eq!(got.matches("HTTP/1.1 200").count(), 8, "{got}");
        // The server runs on this test's thread: every 4th response yielded.
        assert_eq!(crate::proxy::handoff::yields_on_this_thread() - before, 2);
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
                &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
                "400",
            ),
            (&b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..], "400"),
            (&b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"[..], "501"),
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
        let served = serve(server, SLOW_HEAD, &token, echo).await;
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
        let served = serve(server, SLOW_HEAD, &token, echo).await;
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
        let served = serve(server, SLOW_HEAD, &token, echo).await;
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
        let served = serve(server, settings(), &token, echo).await.unwrap();
        let Served::H2Preface(mut tcp) = served else {
            panic!("expected the connection back, got {served:?}");
        };
        let mut preface = [0u8; 24];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    }

    /// One edit of a byte string; indexes are taken modulo its length.
    #[derive(Debug, Clone)]
    pub(super) enum Edit {
        Flip(proptest::sample::Index, u8),
        Insert(proptest::sample::Index, u8),
        Delete(proptest::sample::Index),
        Truncate(proptest::sample::Index),
        /// A whole field line inserted at the start of a line.
        InsertLine(proptest::sample::Index, &'static str),
    }

    /// Chunk extensions (RFC 9112 7.1.1), with and without values, quoted
    /// strings and whitespace before the semicolon.
    pub(super) const CHUNK_EXTENSIONS: &[&str] = &[
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

    pub(super) fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
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
    pub(super) fn apply(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
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

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a\r\n").unwrap(), Some((26, 4)));
        assert_eq!(parse_chunk_size(b"0;x=y\r\n").unwrap(), Some((0, 7)));
        assert_eq!(parse_chunk_size(b"1a").unwrap(), None);
        assert_eq!(parse_chunk_size(b"1a\r").unwrap(), None);
        assert_eq!(parse_chunk_size(b"1a;x=\"y").unwrap(), None);
        assert!(parse_chunk_size(b"g\r\n").is_err());
        assert!(
            parse_chunk_size(b"11111111111111111\r\n").is_err(),
            "over 64 bits"
        );
        // Leading zeros do not count against the 64 bits (as in hyper).
        assert_eq!(
            parse_chunk_size(b"000000000000000000000005\r\n").unwrap(),
            Some((5, 26))
        );
        assert!(parse_chunk_size(&[b'0'; 5000]).is_err(), "line too long");
    }

    /// RFC 9112 §7.1: `chunk-size [ chunk-ext ] CRLF`, `chunk-ext =
    /// *( BWS ";" BWS name [ BWS "=" BWS value ] )`.
    #[test]
    fn chunk_size_lines_are_read_to_the_letter() {
        for ok in [
            "5\r\n",
            "5;a\r\n",
            "5 ;a\r\n",
            "5\t; a\r\n",
            "5;a=b\r\n",
            "5;a = b\r\n",
            "5;a=b;c;d=e\r\n",
            "5;a=\"x y;z\"\r\n",
            "5;a=\"q\\\"\\\\\"\r\n",
            "5;a=\"\"\r\n",
            "5;!#$%&'*+-.^_`|~09aZ=!#$%&'*+-.^_`|~\r\n",
        ] {
            assert_eq!(
                parse_chunk_size(ok.as_bytes()),
                Ok(Some((5, ok.len()))),
                "{ok:?}"
            );
        }
        for bad in [
            "5 \r\n",
            " 5\r\n",
            "\t5\r\n",
            "5\t\r\n",
            "5;ext\n",
            "5\n",
            "5\r\r\n",
            "5\rx\r\n",
            "5;a\rb\r\n",
            "5;\r\n",
            "5;a=\r\n",
            "5;=b\r\n",
            "5;a \r\n",
            "5;a=b \r\n",
            "5;a b\r\n",
            "5;a=b c\r\n",
            "5 5\r\n",
            "5a;\"q\"\r\n",
            "5;a=\"x\r\n",
            "5;a=\"x\"y\r\n",
            "5;a=\"\x7f\"\r\n",
            "5;a=\"\\\x01\"\r\n",
            "5;a\x00\r\n",
            "+5\r\n",
            "0x5\r\n",
            "\r\n",
        ] {
            assert!(
                parse_chunk_size(bad.as_bytes()).is_err(),
                "{bad:?} accepted: {:?}",
                parse_chunk_size(bad.as_bytes())
            );
        }
    }

    /// RFC 9112 §9.3: `close` ends the connection whatever else the
    /// Connection fields say, in HTTP/1.0 too (as hyper reads them).
    #[test]
    fn close_wins_over_keep_alive() {
        let fields = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::CONNECTION, HeaderValue::from_static(l));
            }
            h
        };
        for v in [Version::HTTP_10, Version::HTTP_11] {
            assert!(!keeps_alive(v, &fields(&["close", "keep-alive"])));
            assert!(!keeps_alive(v, &fields(&["keep-alive, close"])));
            assert!(keeps_alive(v, &fields(&["keep-alive"])));
        }
        assert!(!keeps_alive(Version::HTTP_10, &fields(&[])));
        assert!(keeps_alive(Version::HTTP_11, &fields(&[])));
    }

    #[test]
    fn trailer_sections_end_in_crlf_only() {
        let (map, len) = parse_trailers(b"X-A: 1\r\nX-B: 2\r\n\r\nGET")
            .unwrap()
            .unwrap();
        assert_eq!((map.len(), len), (2, 18));
        assert_eq!(parse_trailers(b"\r\nGET").unwrap().unwrap().1, 2);
        assert!(parse_trailers(b"X-A: 1\r\n").unwrap().is_none());
        assert!(parse_trailers(b"X-A: 1\r\n\r").unwrap().is_none());
        for bad in [
            &b"X-A: 1\r\n\nGET / HTTP/1.1\r\n\r\n"[..],
            b"X-A: 1\nX-B: 2\r\n\r\n",
            b"\n",
            b"X-A: 1\r\n \r\n\r\n",
            b"X-A 1\r\n\r\n",
        ] {
            assert!(
                parse_trailers(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
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
}
