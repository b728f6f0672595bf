//! The response side of an exchange: the head read and parsed (1xx
//! skipped, the smuggling shapes refused), how its body is delimited, and
//! the body itself, read straight from the backend socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap};
use http_body::Frame;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::ReadHalf;

/// Idle connections kept per export; more are closed when they come back.
use super::*;
use crate::error::{ErrorKind, ProxyError};
use crate::h1::framing::{
    self, BadField, BadLength, BodyError, Chunk, Framing, HEAD_CHUNK, MAX_HEAD, MAX_HEADERS,
};

/// Reads up to the final response head, skipping 1xx interim responses.
/// `Stale::Unanswered` in the failure means not a byte arrived before EOF
/// or a reset.
pub(super) async fn read_head(
    rd: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    addr: &str,
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

pub(super) enum Parsed {
    Partial,
    /// A 1xx response of this length, to skip.
    Interim(usize),
    Final(Head, usize),
}

pub(super) fn parse_head(buf: &[u8], is_head: bool) -> Result<Parsed, String> {
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
    let version = framing::version(resp.version);
    let headers = framing::header_map(resp.headers).map_err(|e| match e {
        BadField::Name(name) => format!("invalid response header name {name:?}"),
        BadField::Value(name) => format!("invalid value for response header {name}"),
    })?;
    let mut keep_alive = framing::keeps_alive(version, &headers);
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
pub(super) fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get_all(header::CONTENT_LENGTH).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|n| n.trim_ascii() != b"0")
        })
}

/// RFC 9112 §6.3 for a response that has a body.
pub(super) fn response_framing(headers: &HeaderMap) -> Result<Read, String> {
    // Empty elements are skipped, as RFC 9110 §5.6.1 lets a recipient do
    // (the server refuses them in a request).
    let mut codings = framing::transfer_codings(headers)
        .filter(|c| !c.is_empty())
        .peekable();
    if codings.peek().is_some() {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err("response has both content-length and transfer-encoding".to_owned());
        }
        let all: Vec<&[u8]> = codings.collect();
        return if framing::only_chunked(&all) {
            Ok(Read::Framed(Framing::Chunked(Chunk::Size)))
        } else {
            Err("response transfer codings other than chunked are not supported".to_owned())
        };
    }
    // A list of equal lengths in one field (`5, 5`) is read as one.
    let length = framing::content_length(headers, true).map_err(|e| match e {
        BadLength::Invalid(part) => format!(
            "invalid response content-length {:?}",
            String::from_utf8_lossy(part)
        ),
        BadLength::Conflicting => "conflicting response content-length values".to_owned(),
    })?;
    Ok(match length {
        Some(n) => Read::Framed(Framing::Length(n)),
        None => Read::Close,
    })
}

/// A response body read from the backend connection it owns while it
/// streams. At a clean end the connection goes back to the export's pool
/// (when reusable); dropped earlier, the connection is closed.
pub type ResponseBody = framing::ConnBody<BodyState>;

pub struct BodyState {
    pub(super) conn: Conn,
    /// Bytes read past what was handed out.
    pub(super) buf: BytesMut,
    pub(super) read: Read,
    pub(super) reusable: bool,
    pub(super) pool: Arc<Pool>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ResponseBody");
        if let Some(st) = self.source() {
            d.field("backend", &st.conn.addr)
                .field("read", &st.read)
                .field("reusable", &st.reusable);
        }
        d.finish_non_exhaustive()
    }
}

impl framing::BodySource for BodyState {
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
                let res = ready!(framing::poll_decode(
                    framing,
                    &mut self.buf,
                    cx,
                    |buf, cx| { framing::poll_fill(Pin::new(&mut *io), buf, cx) }
                ));
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
                    let more = ready!(framing::poll_fill(Pin::new(&mut *io), &mut self.buf, cx))
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
