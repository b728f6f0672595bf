//! Proxy errors. Every failure on the data plane records which side failed
//! (the downstream client, the upstream backend or peer, or ourselves), what
//! kind of failure it was and whether retrying the request elsewhere is safe.
//! [`ProxyError::status`] is the one place that maps a failure to an HTTP
//! status; [`ProxyError::label`] and [`ProxyError::grpc_code`] give the metric
//! label and gRPC status code from the same kind, so the three never disagree.

use std::fmt;
use std::io;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::splice::{self, SpliceError};

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client that connected to us (a peer gateway on ingress, a local
    /// app on egress).
    Downstream,
    /// Where we forward to (a local backend on ingress, the owner's ingress
    /// on egress).
    Upstream,
    /// Our own state or configuration.
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A TCP connect was refused or failed.
    ConnectFailed,
    /// A TCP connect did not complete within `connectTimeout`.
    ConnectTimeout,
    /// The TLS handshake failed (bad certificate, wrong SAN, protocol error).
    HandshakeFailed,
    /// The TLS handshake did not complete within `handshakeTimeout`.
    HandshakeTimeout,
    /// Nothing routes there (unknown SNI, VIP or Host), or no backend is
    /// configured.
    NoRoute,
    /// The peer is unknown or may not reach the service.
    Unauthorized,
    /// The request's Host / :authority names another service than the
    /// connection's SNI.
    MisdirectedRequest,
    /// Response headers did not arrive within `requestTimeout`.
    RequestTimeout,
    /// No bytes moved in either direction for `idleTimeout`.
    IdleTimeout,
    /// Connection cap reached, or no healthy backend left.
    Overloaded,
    /// A read or write failed on an established connection.
    Io,
    /// The other side broke the HTTP/TLS protocol.
    Protocol,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::HandshakeFailed => "handshake_failed",
            ErrorKind::HandshakeTimeout => "handshake_timeout",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::MisdirectedRequest => "misdirected_request",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Io => "io",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// Human words for the kind, used in messages and response bodies.
    fn words(self) -> &'static str {
        match self {
            ErrorKind::ConnectFailed => "connect failed",
            ErrorKind::ConnectTimeout => "connect timed out",
            ErrorKind::HandshakeFailed => "tls handshake failed",
            ErrorKind::HandshakeTimeout => "tls handshake timed out",
            ErrorKind::NoRoute => "no route",
            ErrorKind::Unauthorized => "not authorized",
            ErrorKind::MisdirectedRequest => "misdirected request",
            ErrorKind::RequestTimeout => "request timed out",
            ErrorKind::IdleTimeout => "idle timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Io => "i/o error",
            ErrorKind::Protocol => "protocol error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.words())
    }
}

/// A data-plane failure: who failed, how, and whether a retry is safe.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{side} {kind}: {message}")]
pub struct ProxyError {
    pub side: Side,
    pub kind: ErrorKind,
    /// True when the request certainly never reached the upstream (connect
    /// or handshake failures), so sending it elsewhere cannot duplicate it.
    pub retry_safe: bool,
    pub message: String,
}

impl ProxyError {
    /// A failure with the default retry safety for its kind.
    pub fn new(side: Side, kind: ErrorKind, message: impl Into<String>) -> Self {
        let retry_safe = side == Side::Upstream
            && matches!(
                kind,
                ErrorKind::ConnectFailed
                    | ErrorKind::ConnectTimeout
                    | ErrorKind::HandshakeFailed
                    | ErrorKind::HandshakeTimeout
            );
        ProxyError {
            side,
            kind,
            retry_safe,
            message: message.into(),
        }
    }

    pub fn upstream(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::new(Side::Upstream, kind, message)
    }

    pub fn downstream(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::new(Side::Downstream, kind, message)
    }

    pub fn internal(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::new(Side::Internal, kind, message)
    }

    /// An I/O error on the given side; a timeout-kind io error stays `Io`
    /// (our own timers produce the timeout kinds).
    pub fn io(side: Side, context: &str, err: &io::Error) -> Self {
        Self::new(side, ErrorKind::Io, format!("{context}: {err}"))
    }

    /// Overrides the retry safety decided from the kind.
    pub fn with_retry_safe(mut self, retry_safe: bool) -> Self {
        self.retry_safe = retry_safe;
        self
    }

    /// The HTTP status a client gets for this failure. The one mapping.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::ConnectFailed | ErrorKind::HandshakeFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::Io | ErrorKind::Protocol => match self.side {
                // A client breaking its own request is its fault.
                Side::Downstream => StatusCode::BAD_REQUEST,
                Side::Upstream => StatusCode::BAD_GATEWAY,
                Side::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ErrorKind::ConnectTimeout
            | ErrorKind::HandshakeTimeout
            | ErrorKind::RequestTimeout
            | ErrorKind::IdleTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NoRoute => match self.side {
                // No backend left to try for a known route is unavailability;
                // a name nothing routes to is the client's mistake.
                Side::Upstream => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::NOT_FOUND,
            },
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::Unauthorized => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status code for this failure (for `grpc-status` on gRPC
    /// requests), derived from the same kind as [`ProxyError::status`].
    pub fn grpc_code(&self) -> u32 {
        // Numeric codes from grpc/status.proto.
        const INTERNAL: u32 = 13;
        const UNAVAILABLE: u32 = 14;
        const DEADLINE_EXCEEDED: u32 = 4;
        const PERMISSION_DENIED: u32 = 7;
        const NOT_FOUND: u32 = 5;
        const RESOURCE_EXHAUSTED: u32 = 8;
        match self.kind {
            ErrorKind::ConnectFailed | ErrorKind::HandshakeFailed => UNAVAILABLE,
            ErrorKind::Io | ErrorKind::Protocol => match self.side {
                Side::Upstream => UNAVAILABLE,
                _ => INTERNAL,
            },
            ErrorKind::ConnectTimeout | ErrorKind::HandshakeTimeout => UNAVAILABLE,
            ErrorKind::RequestTimeout | ErrorKind::IdleTimeout => DEADLINE_EXCEEDED,
            ErrorKind::NoRoute => match self.side {
                Side::Upstream => UNAVAILABLE,
                _ => NOT_FOUND,
            },
            ErrorKind::Overloaded => RESOURCE_EXHAUSTED,
            ErrorKind::MisdirectedRequest => UNAVAILABLE,
            ErrorKind::Unauthorized => PERMISSION_DENIED,
        }
    }

    /// A bounded label for metrics and logs: the kind, e.g. `connect_failed`.
    pub fn label(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The short text body sent with an error response, naming the side:
    /// `upstream connect failed: 10.0.0.1:80: connection refused`.
    pub fn body(&self) -> String {
        format!("{self}\n")
    }

    /// The one response for a failed request, at the egress and the
    /// ingress alike: the status from [`ProxyError::status`] with the
    /// [`ProxyError::body`] text, or for gRPC a trailers-only response
    /// carrying the matching `grpc-status` and the percent-encoded
    /// `grpc-message`; both name the failure in `x-elsinore-error`.
    pub fn response(&self, grpc: bool) -> Response<Full<Bytes>> {
        let mut resp = if grpc {
            let mut resp = Response::new(Full::new(Bytes::new()));
            let headers = resp.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.grpc_code()));
            if let Ok(message) = HeaderValue::from_str(&grpc_message(&self.to_string())) {
                headers.insert("grpc-message", message);
            }
            resp
        } else {
            let mut resp = Response::new(Full::new(Bytes::from(self.body())));
            *resp.status_mut() = self.status();
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        };
        if let Ok(label) = HeaderValue::from_str(self.label()) {
            resp.headers_mut().insert("x-elsinore-error", label);
        }
        resp
    }
}

/// Whether a request is gRPC (its content type), so that its failure is
/// told in gRPC's terms.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Percent-encodes a `grpc-message` as the gRPC spec asks: everything
/// outside printable ASCII, and `%` itself.
pub fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A splice's failure, told as a proxy failure: an idle splice is our
/// timer (internal), a failed read or write is the side's, and a TLS record
/// that does not open is that side breaking the protocol.
impl From<SpliceError> for ProxyError {
    fn from(e: SpliceError) -> Self {
        match e {
            SpliceError::IdleTimeout { .. } => {
                ProxyError::internal(ErrorKind::IdleTimeout, e.to_string())
            }
            SpliceError::Io {
                side, ref error, ..
            } => {
                let side = match side {
                    splice::Side::Downstream => Side::Downstream,
                    splice::Side::Upstream => Side::Upstream,
                };
                let kind = match error.kind() {
                    io::ErrorKind::InvalidData => ErrorKind::Protocol,
                    _ => ErrorKind::Io,
                };
                ProxyError::new(side, kind, e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_message("a b%ü"), "a b%25%C3%BC");
        assert_eq!(grpc_message("a b%\n"), "a b%25%0A");
    }

    #[test]
    fn splice_failures_keep_their_side_and_kind() {
        let idle = ProxyError::from(SpliceError::IdleTimeout {
            idle_timeout: std::time::Duration::from_secs(30),
            sent_upstream: 1,
            sent_downstream: 2,
        });
        assert_eq!(
            (idle.side, idle.kind),
            (Side::Internal, ErrorKind::IdleTimeout)
        );
        assert_eq!(
            idle.message,
            "no bytes moved for 30s (1 bytes sent upstream, 2 bytes sent downstream)"
        );
        let reset = ProxyError::from(SpliceError::Io {
            side: splice::Side::Upstream,
            op: "read",
            error: io::Error::from(io::ErrorKind::ConnectionReset),
        });
        assert_eq!((reset.side, reset.kind), (Side::Upstream, ErrorKind::Io));
        assert!(reset.message.starts_with("read: "), "{reset}");
        assert!(!reset.retry_safe);
        let bad_record = ProxyError::from(SpliceError::Io {
            side: splice::Side::Downstream,
            op: "read",
            error: io::Error::new(io::ErrorKind::InvalidData, "bad record mac"),
        });
        assert_eq!(
            (bad_record.side, bad_record.kind),
            (Side::Downstream, ErrorKind::Protocol)
        );
        assert_eq!(bad_record.message, "read: bad record mac");
    }

    #[test]
    fn statuses() {
        let up = |k| ProxyError::upstream(k, "x").status();
        assert_eq!(up(ErrorKind::ConnectFailed), StatusCode::BAD_GATEWAY);
        assert_eq!(up(ErrorKind::ConnectTimeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(up(ErrorKind::RequestTimeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(up(ErrorKind::NoRoute), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(up(ErrorKind::Overloaded), StatusCode::SERVICE_UNAVAILABLE);
        let down = |k| ProxyError::downstream(k, "x").status();
        assert_eq!(
            down(ErrorKind::MisdirectedRequest),
            StatusCode::MISDIRECTED_REQUEST
        );
        assert_eq!(down(ErrorKind::Unauthorized), StatusCode::FORBIDDEN);
        assert_eq!(down(ErrorKind::NoRoute), StatusCode::NOT_FOUND);
    }

    #[test]
    fn display_names_side_and_kind() {
        let e = ProxyError::upstream(ErrorKind::ConnectFailed, "127.0.0.1:1: refused");
        assert_eq!(
            e.to_string(),
            "upstream connect failed: 127.0.0.1:1: refused"
        );
        assert_eq!(e.label(), "connect_failed");
        assert!(e.retry_safe);
        assert!(!ProxyError::upstream(ErrorKind::RequestTimeout, "x").retry_safe);
        assert_eq!(Side::Downstream.to_string(), "downstream");
    }
}
