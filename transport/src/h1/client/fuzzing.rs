//! A sans-I/O handle on the backend client's response-head parser, for the
//! fuzz targets in `fuzz/` (reached through [`crate::fuzzing`]). It calls the
//! function the client calls, on bytes instead of a socket; response bodies
//! go through [`crate::h1::fuzzing::BodyDecoder`], the decoder the client
//! shares with the server. Not an API.

use http::{HeaderMap, StatusCode, Version};

use super::{Framing, Parsed, Read};
use crate::h1::fuzzing::BodyFraming;

/// How a final response delimits its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// By length or chunked, as a request body would be.
    Framed(BodyFraming),
    /// Until the backend closes the connection.
    Close,
}

/// A final response head as the client sees it.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    pub keep_alive: bool,
}

/// What the client makes of the bytes at the start of a response.
#[derive(Debug)]
pub enum ResponseVerdict {
    Partial,
    /// A 1xx response of this many bytes, skipped.
    Interim(usize),
    /// A final head of this many bytes.
    Final(ResponseHead, usize),
    /// The response is refused (the backend connection is closed).
    Error(String),
}

/// Parses the response head at the start of `buf`; `is_head` says whether
/// the request was a HEAD.
pub fn parse_response_head(buf: &[u8], is_head: bool) -> ResponseVerdict {
    match super::parse_head(buf, is_head) {
        Ok(Parsed::Partial) => ResponseVerdict::Partial,
        Ok(Parsed::Interim(len)) => ResponseVerdict::Interim(len),
        Ok(Parsed::Final(head, len)) => ResponseVerdict::Final(
            ResponseHead {
                status: head.status,
                version: head.version,
                headers: head.headers,
                framing: match head.read {
                    Read::Framed(Framing::Length(n)) => {
                        ResponseFraming::Framed(BodyFraming::Length(n))
                    }
                    Read::Framed(Framing::Chunked(_)) => {
                        ResponseFraming::Framed(BodyFraming::Chunked)
                    }
                    Read::Close => ResponseFraming::Close,
                },
                keep_alive: head.keep_alive,
            },
            len,
        ),
        Err(why) => ResponseVerdict::Error(why),
    }
}
