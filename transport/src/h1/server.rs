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

use crate::error::ErrorKind;
use crate::handoff;

/// The largest request head (request line and fields) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one request head (or trailer section).
pub const MAX_HEADERS: usize = 128;
/// First allocation for a request head; grows while the head is incomplete.
pub(crate) const HEAD_CHUNK: usize = 4 * 1024;
/// Read size while a request body streams.
pub(crate) const BODY_CHUNK: usize = 16 * 1024;
/// Response bytes gathered before a write (head and small bodies go out in
/// one syscall).
pub(crate) const WRITE_COALESCE: usize = 16 * 1024;
/// How long a finished response waits for the request body to be handed
/// back before the connection is closed instead of reused.
const BODY_RETURN: Duration = Duration::from_secs(1);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
pub async fn serve<F, Fut, B>(
    tcp: TcpStream,
    settings: &Settings,
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
            *settings,
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

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked(Chunk),
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
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

/// Whether a `Connection` field of `headers` holds `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
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
pub(crate) fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
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
    pub(crate) fn new(state: S) -> Self {
        ConnBody { state: Some(state) }
    }

    pub fn empty() -> Self {
        ConnBody { state: None }
    }

    pub(crate) fn source(&self) -> Option<&S> {
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
pub(crate) fn poll_fill<R: tokio::io::AsyncRead>(
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
pub(crate) fn poll_decode<F>(
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
pub(crate) async fn put_data<W: AsyncWrite + Unpin>(
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
pub(crate) fn put_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
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
    yield_every: u32,
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
        handoff::handed_off(yield_every);
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
    handoff::handed_off(yield_every);
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
