//! Sans-I/O handles on the HTTP/1.1 server's request-head parser and body
//! decoder, for the fuzz targets in `fuzz/` (reached through
//! [`crate::fuzzing`]). They call the very functions the connection loop
//! calls, on bytes instead of a socket; nothing here is used by the gateway
//! itself, and it is not an API: it follows whatever the parser becomes.

use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body::Frame;

use super::framing::{self, BodyError, Chunk, Framing};
use super::server::{self, HeadError};

/// How a parsed head delimits its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(u64),
    Chunked,
}

/// A request head as the server loop sees it after parsing.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// As forwarded: `Transfer-Encoding` and `Expect` already removed.
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// What the server makes of the bytes at the start of a request. One lives
/// at a time, in a fuzz target: boxing the head would buy nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum HeadVerdict {
    /// More bytes are needed.
    Partial,
    /// A head of this many bytes.
    Complete(RequestHead, usize),
    /// Refused with this status and reason.
    Refused(StatusCode, String),
}

/// Parses the request head at the start of `buf`, as the server does each
/// time more bytes arrive.
pub fn parse_request_head(buf: &[u8]) -> HeadVerdict {
    match server::parse_head(buf) {
        Ok(None) => HeadVerdict::Partial,
        Ok(Some((head, len))) => HeadVerdict::Complete(
            RequestHead {
                method: head.method,
                uri: head.uri,
                version: head.version,
                headers: head.headers,
                framing: match head.framing {
                    Framing::Length(n) => BodyFraming::Length(n),
                    Framing::Chunked(_) => BodyFraming::Chunked,
                },
                keep_alive: head.keep_alive,
                expect_continue: head.expect_continue,
            },
            len,
        ),
        Err(HeadError::Refused(status, why)) => HeadVerdict::Refused(status, why),
        // Only reading from a socket produces these.
        Err(HeadError::Closed) => HeadVerdict::Refused(StatusCode::BAD_REQUEST, "closed".into()),
        Err(HeadError::Io(e)) => HeadVerdict::Refused(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The body decoder shared by the server (request bodies) and the backend
/// client (response bodies), fed from memory.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    framing: Framing,
}

impl BodyDecoder {
    pub fn new(framing: BodyFraming) -> Self {
        BodyDecoder {
            framing: match framing {
                BodyFraming::Length(n) => Framing::Length(n),
                BodyFraming::Chunked => Framing::Chunked(Chunk::Size),
            },
        }
    }

    /// The body is complete: every frame has been handed out.
    pub fn is_done(&self) -> bool {
        self.framing == Framing::Length(0)
    }

    /// The next frame decoded from `buf`. When the decoder needs more bytes
    /// it calls `more`, which appends some to `buf` and returns `false` at
    /// the end of the input (the peer closed). Bytes past the body stay in
    /// `buf`.
    pub fn next_frame(
        &mut self,
        buf: &mut BytesMut,
        more: &mut dyn FnMut(&mut BytesMut) -> bool,
    ) -> Result<Option<Frame<Bytes>>, BodyError> {
        let mut cx = Context::from_waker(Waker::noop());
        match framing::poll_decode(&mut self.framing, buf, &mut cx, |buf, _| {
            Poll::Ready(Ok(more(buf)))
        }) {
            Poll::Ready(result) => result,
            // `more` never returns Pending, so neither does the decoder.
            Poll::Pending => Err(BodyError::Incomplete),
        }
    }
}
