//! The HTTP/1.1 wire rules the [`server`](super::server) and the
//! [`client`](super::client) share, in one copy: how a head's fields are
//! taken from httparse, which framing its `Content-Length` and
//! `Transfer-Encoding` fields give, keep-alive, the chunked decoder (chunk
//! size lines, extensions, trailer sections) and the body writer. Where a
//! request and a response are read differently on purpose (a list in one
//! `Content-Length` field, an empty transfer coding), the function takes
//! the difference as a parameter or returns what the caller decides on,
//! and the caller says why.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::http::{BoxError, BytesBody};

/// The largest message head (request or status line and fields) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one message head (or trailer section).
pub const MAX_HEADERS: usize = 128;
/// First allocation for a message head; grows while the head is incomplete.
pub(crate) const HEAD_CHUNK: usize = 4 * 1024;
/// Read size while a message body streams.
pub(crate) const BODY_CHUNK: usize = 16 * 1024;
/// Message bytes gathered before a write (head and small bodies go out in
/// one syscall).
pub(crate) const WRITE_COALESCE: usize = 16 * 1024;

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

/// Why a field httparse read is not a valid HTTP field.
pub(crate) enum BadField<'a> {
    /// Its name, as sent.
    Name(&'a str),
    /// The value of the field with this name.
    Value(HeaderName),
}

/// The fields of a head (or trailer section) httparse read, in order.
pub(crate) fn header_map<'a>(fields: &[httparse::Header<'a>]) -> Result<HeaderMap, BadField<'a>> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| BadField::Name(field.name))?;
        let value =
            HeaderValue::from_bytes(field.value).map_err(|_| BadField::Value(name.clone()))?;
        map.append(name, value);
    }
    Ok(map)
}

/// The version of a head httparse read (it reads only 1.0 and 1.1).
pub(crate) fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// The elements of a head's `Transfer-Encoding` fields, in order and
/// trimmed, empty ones included: the server refuses those, the client
/// skips them (see each).
pub(crate) fn transfer_codings(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Whether transfer codings are `chunked` alone, the only ones either side
/// decodes.
pub(crate) fn only_chunked(codings: &[&[u8]]) -> bool {
    matches!(codings, [only] if only.eq_ignore_ascii_case(b"chunked"))
}

/// Why the `Content-Length` fields of a head give no length.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadLength<'a> {
    /// Not a decimal number: these bytes, as the caller's message shows
    /// them (the whole field, or the list element).
    Invalid(&'a [u8]),
    /// Two fields, or two list elements, differ.
    Conflicting,
}

/// The body length the `Content-Length` fields of a head give (RFC 9112
/// §6.3), `None` without one: every field (and, with `lists`, every element
/// of a comma-separated list in one) is digits only and all are equal.
/// `lists` says whether one field may hold such a list (RFC 9110 §8.6 lets a
/// recipient accept `5, 5`): the server refuses it, as hyper's server does,
/// the client reads it from a backend.
pub(crate) fn content_length(
    headers: &HeaderMap,
    lists: bool,
) -> Result<Option<u64>, BadLength<'_>> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let field = value.as_bytes();
        for element in field.split(|&b| lists && b == b',') {
            let text = element.trim_ascii();
            let n = std::str::from_utf8(text)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(BadLength::Invalid(if lists { text } else { field }))?;
            if length.is_some_and(|l| l != n) {
                return Err(BadLength::Conflicting);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// The length a message we are about to write declares in its (first)
/// `Content-Length` field, if it reads as a number: what framing the body
/// goes out with, its own size hint aside.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Writes one field line.
pub(crate) fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
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

/// Why a framed body could not be read ([`poll_decode`]). The messages are
/// worded for request bodies, the ones the server loop reads; the backend
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
/// bodies the server reads and the response bodies the client reads.
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
            let map = header_map(fields).map_err(|bad| match bad {
                BadField::Name(_) => "invalid trailer name",
                BadField::Value(_) => "invalid trailer value",
            })?;
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

/// How an outgoing body is delimited, once its head is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delimit {
    /// By `content-length`: more data is refused, less is reported.
    Length(u64),
    /// In chunks, ending with the last chunk and the trailer section.
    Chunked,
    /// By closing the connection (an HTTP/1.0 client's response).
    Close,
}

/// Why writing a body stopped short. The server and the client each turn
/// it into their own error, naming the side at fault.
#[derive(Debug)]
pub(crate) enum WriteBodyError {
    /// The connection failed.
    Write(io::Error),
    /// The body's source failed.
    Source(BoxError),
    /// The body carried more than its `content-length`; nothing past it
    /// was written.
    Longer { declared: u64, got: u64 },
    /// The body ended before its `content-length`; what came is gathered
    /// in `out`, unwritten.
    Shorter { declared: u64, got: u64 },
}

/// Writes `body` after the head already gathered in `out`, delimited as
/// `delimit` says, gathering small pieces into writes of up to
/// [`WRITE_COALESCE`] bytes and writing what is gathered whenever the body
/// has nothing ready. The rules both the server (responses) and the client
/// (requests) follow. On success the tail (last chunk, trailers) is left
/// in `out` for the caller to write with whatever it adds; trailers reach
/// the peer only in a chunked body.
pub(crate) async fn write_body<W, B>(
    wr: &mut W,
    out: &mut BytesMut,
    mut body: Pin<&mut B>,
    delimit: Delimit,
) -> Result<(), WriteBodyError>
where
    W: AsyncWrite + Unpin,
    B: BytesBody + ?Sized,
{
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        // Take what the body has ready; write what is gathered before
        // waiting for more.
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    wr.write_all(out).await.map_err(WriteBodyError::Write)?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| WriteBodyError::Source(e.into()))?;
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
        if let Delimit::Length(n) = delimit
            && sent > n
        {
            return Err(WriteBodyError::Longer {
                declared: n,
                got: sent,
            });
        }
        put_data(wr, out, &data, delimit == Delimit::Chunked)
            .await
            .map_err(WriteBodyError::Write)?;
    }
    match delimit {
        Delimit::Chunked => put_last_chunk(out, trailers.as_ref()),
        Delimit::Length(n) if sent != n => {
            return Err(WriteBodyError::Shorter {
                declared: n,
                got: sent,
            });
        }
        _ => {}
    }
    Ok(())
}

/// The end of a chunked body: the last chunk and the trailer section.
pub(crate) fn put_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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

    /// Runs [`write_body`] over `frames` after the head `HEAD`, into a
    /// vector standing for the connection; returns what reached it, what
    /// was left gathered, and the outcome.
    fn write_frames(
        frames: Vec<Frame<Bytes>>,
        delimit: Delimit,
    ) -> (Vec<u8>, Vec<u8>, Result<(), WriteBodyError>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let stream = futures_util::stream::iter(
                frames.into_iter().map(Ok::<_, std::convert::Infallible>),
            );
            let mut body = http_body_util::StreamBody::new(stream);
            let mut wire = Vec::new();
            let mut out = BytesMut::from(&b"HEAD\r\n"[..]);
            let res = write_body(&mut wire, &mut out, Pin::new(&mut body), delimit).await;
            (wire, out.to_vec(), res)
        })
    }

    fn data(s: &str) -> Frame<Bytes> {
        Frame::data(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn a_body_is_written_as_delimited() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        let frames = || {
            vec![
                data("hel"),
                data(""),
                data("lo"),
                Frame::trailers(trailers.clone()),
            ]
        };
        let all = |(wire, out, res): (Vec<u8>, Vec<u8>, Result<(), WriteBodyError>)| {
            assert!(res.is_ok(), "{res:?}");
            String::from_utf8([wire, out].concat()).unwrap()
        };
        assert_eq!(
            all(write_frames(frames(), Delimit::Chunked)),
            "HEAD\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\nx-sum: 7\r\n\r\n"
        );
        // Trailers reach the peer only in a chunked body.
        assert_eq!(
            all(write_frames(frames(), Delimit::Length(5))),
            "HEAD\r\nhello"
        );
        assert_eq!(all(write_frames(frames(), Delimit::Close)), "HEAD\r\nhello");
    }

    #[test]
    fn a_body_longer_than_its_length_stops_before_the_excess() {
        let (wire, out, res) = write_frames(vec![data("he"), data("llo")], Delimit::Length(3));
        assert!(
            matches!(
                res,
                Err(WriteBodyError::Longer {
                    declared: 3,
                    got: 5
                })
            ),
            "{res:?}"
        );
        // Nothing of the piece that went past the length was written or
        // gathered.
        assert_eq!([wire, out].concat(), b"HEAD\r\nhe");
    }

    #[test]
    fn a_body_shorter_than_its_length_is_reported_with_what_came() {
        let (wire, out, res) = write_frames(vec![data("hello")], Delimit::Length(9));
        assert!(
            matches!(
                res,
                Err(WriteBodyError::Shorter {
                    declared: 9,
                    got: 5
                })
            ),
            "{res:?}"
        );
        assert_eq!([wire, out].concat(), b"HEAD\r\nhello");
    }

    #[test]
    fn a_large_piece_is_written_whole_after_what_was_gathered() {
        let big = "x".repeat(WRITE_COALESCE);
        let (wire, out, res) = write_frames(vec![data("ab"), data(&big)], Delimit::Chunked);
        assert!(res.is_ok(), "{res:?}");
        let head = format!("HEAD\r\n2\r\nab\r\n{:x}\r\n", big.len());
        // The gathered part and the large piece reached the connection
        // before the end; the tail waits in `out` for the caller.
        assert_eq!(wire, [head.as_bytes(), big.as_bytes()].concat());
        assert_eq!(out, b"\r\n0\r\n\r\n");
    }
}
