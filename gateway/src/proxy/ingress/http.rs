//! The ingress's HTTP stage: an authorized connection of an HTTP, HTTP/2 or
//! gRPC export is served as HTTP (HTTP/2 when the peer negotiated h2,
//! otherwise HTTP/1.1 or HTTP/2 with prior knowledge), and each request is
//! checked (Host / `:authority` must name the SNI's service), stripped of
//! hop-by-hop and identity headers, given the verified peer identity and
//! forwarded through the route's pooled client within the request timeout.
//! Failures answer with [`ProxyError::response`]. It must not decide who
//! may connect (the handshake did) nor build clients (the routes do).

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use elsinore_transport::h1::client::ResponseBody;
use elsinore_transport::h2::server as h2server;
use futures_util::FutureExt;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::handshake::Inner;
use super::routes::{HttpBackend, check_authority, sni_authority};
use super::stats::{IngressStats, bump};
use super::{PeerBody, PeerStream};
use crate::proxy::activity::{Activity, watched};
use crate::proxy::error::{ErrorKind, ProxyError, Side, is_grpc};
use crate::proxy::{
    IdentityTrailersStripped, PEER_IDENTITY_HEADER, refuse_userinfo, strip_identity_headers,
};

type ProxyBody = Either<Either<ResponseBody, Incoming>, Full<Bytes>>;

/// What every request of one authorized HTTP connection needs.
pub(super) struct HttpConn {
    pub(super) sni: String,
    pub(super) peer_header: HeaderValue,
    pub(super) client: HttpBackend,
    pub(super) request_timeout: Duration,
    pub(super) stats: Arc<IngressStats>,
    /// The (peer, export) request latency histogram, looked up once per
    /// connection.
    pub(super) latency: Arc<crate::metrics::Histogram>,
}

/// Serves one authorized connection as HTTP until the peer closes, it idles
/// out or the drain ends it. About a hundred lines because it keeps the two
/// ways of serving side by side (HTTP/2 by ALPN in this task; otherwise
/// hyper's auto builder, whose first request is due within the request
/// timeout), each with its own close conditions.
pub(super) async fn serve_http(tls: PeerStream, conn: Arc<HttpConn>, inner: &Inner) {
    let tuning = inner.tuning();
    let activity = Arc::new(Activity::new());
    let h2 = tls.alpn_protocol() == Some(b"h2");
    let io = watched(tls, &activity);
    let idle = tuning.idle_timeout;
    if h2 {
        // What peer gateways speak: HTTP/2, served in this task.
        let stop = async {
            let reason = activity.idle_or_shutdown(idle, &inner.ctx.shutdown).await;
            tracing::debug!(reason, "closing ingress http connection gracefully");
        };
        let settings = h2server::Settings {
            max_concurrent_streams: tuning.http2_max_concurrent_streams,
            drain_timeout: inner.ctx.drain_timeout,
            handshake_timeout: tuning.handshake_timeout,
        };
        let conn = &*conn;
        let served = h2server::serve(io, settings, stop, |req| {
            proxy_request(req.map(Either::Right), conn)
        })
        .await;
        match served {
            Ok(h2server::Ended::Closed) => {}
            Ok(h2server::Ended::PrefaceTimedOut) => tracing::debug!(
                handshake_timeout = ?tuning.handshake_timeout,
                "ingress http connection sent no HTTP/2 preface in time; closed"
            ),
            Ok(h2server::Ended::DrainTimedOut) => {
                tracing::debug!(
                    drain_timeout = ?inner.ctx.drain_timeout,
                    "ingress http connection still busy after the drain timeout; closed"
                );
            }
            Err(e) => tracing::debug!(error = %e, "ingress http connection ended with an error"),
        }
        return;
    }
    // Without ALPN h2: HTTP/1.1, or HTTP/2 with prior knowledge.
    let io = TokioIo::new(io);
    let h2 = Arc::clone(&conn);
    let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requested_in = Arc::clone(&requested);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        requested_in.store(true, Ordering::Relaxed);
        let conn = Arc::clone(&h2);
        async move { Ok::<_, Infallible>(proxy_request(req.map(Either::Left), &conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(tuning.request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(tuning.http2_max_concurrent_streams);
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut idle_check = pin!(activity.idle(idle));
    // hyper's header read timeout starts only once the protocol is known
    // (the first bytes read), so the first request is also due here:
    // `requestTimeout` from the connection's start, as on egress. Otherwise
    // a peer that sends nothing, or a prefix of the h2 preface byte by
    // byte, holds a connection for the idle timeout and more.
    let mut first_request = pin!(tokio::time::sleep(tuning.request_timeout));
    let mut awaiting_first = true;
    let mut draining = false;
    loop {
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "ingress http connection ended with an error");
                }
                return;
            }
            _ = first_request.as_mut(), if awaiting_first && !draining => {
                awaiting_first = false;
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!(
                        "no request within {:?} of the ingress http connection's start; closing",
                        tuning.request_timeout
                    );
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = inner.ctx.shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_check.as_mut(), if !draining => {
                tracing::debug!("ingress http connection idle for {idle:?}; closing");
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn proxy_request(req: Request<PeerBody>, conn: &HttpConn) -> Response<ProxyBody> {
    bump(&conn.stats.http_requests);
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    // Boxed: the exchange's state (2 KiB and more) stays put on the heap
    // while the stream's future is moved into its place in the connection
    // (or into hyper's task).
    let resp = match Box::pin(forward(req, conn)).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.kind {
                ErrorKind::MisdirectedRequest => bump(&conn.stats.misdirected),
                _ if e.side == Side::Upstream => bump(&conn.stats.upstream_errors),
                _ => {}
            }
            tracing::warn!(error = %e, label = e.label(), status = e.status().as_u16(), "ingress request failed");
            error_response(&e, grpc)
        }
    };
    conn.latency.observe(started.elapsed());
    resp
}

/// One request's way to the backend: the Host / `:authority` checks, the
/// header rewrites, then the exchange in the backend's framing. Long
/// because the two clients want different requests (origin-form HTTP/1.1
/// with a Host header; an absolute URI over h2c) and the parts are moved
/// through it once, without a copy; `proxy_request` boxes it whole.
async fn forward(
    req: Request<PeerBody>,
    conn: &HttpConn,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // Trailers are fields too: a peer's identity headers go from them as
    // from the header section.
    let body = IdentityTrailersStripped(body);

    // The request must address the service the SNI routed (and authorized)
    // the connection to. Both the URI authority (HTTP/2 :authority, HTTP/1
    // absolute-form) and the Host header count when present; neither may
    // carry userinfo, which the host comparison would look past.
    refuse_userinfo(&parts.uri, &parts.headers)?;
    let uri_authority = parts.uri.authority().cloned();
    if let Some(a) = &uri_authority {
        check_authority(a.host(), &conn.sni)?;
    }
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host_header = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(ProxyError::downstream(
            ErrorKind::MisdirectedRequest,
            "more than one host header",
        ));
    }
    if let Some(h) = &host_header {
        let authority = h
            .to_str()
            .ok()
            .and_then(|s| s.parse::<Authority>().ok())
            .ok_or_else(|| {
                ProxyError::downstream(
                    ErrorKind::MisdirectedRequest,
                    format!("unparsable host header {h:?}"),
                )
            })?;
        check_authority(authority.host(), &conn.sni)?;
    }

    strip_hop_by_hop(&mut parts.headers);
    strip_identity_headers(&mut parts.headers);
    parts
        .headers
        .insert(PEER_IDENTITY_HEADER, conn.peer_header.clone());

    let client = match &conn.client {
        HttpBackend::H1(client) => {
            // Origin-form on the wire; Host is the peer's, or the SNI.
            if host_header.is_none() {
                let authority = uri_authority.unwrap_or_else(|| sni_authority(&conn.sni));
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
            parts.version = Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            let response = within(conn.request_timeout, client.send(request)).await?;
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // An intermediary answers in its own version (RFC 9110 §6.2),
            // whatever the backend's: hyper then frames the body for the
            // peer's version (chunked when an HTTP/1.0 backend's body is
            // delimited by its close) and keeps the peer's connection
            // open. It still answers an HTTP/1.0 peer in HTTP/1.0.
            parts.version = Version::HTTP_11;
            return Ok(Response::from_parts(
                parts,
                Either::Left(Either::Left(body)),
            ));
        }
        HttpBackend::H2(client) => client,
    };

    // hyper's client wants an absolute URI (its pool key, and :authority).
    let authority = match (&uri_authority, &host_header) {
        (Some(a), _) => a.clone(),
        (None, Some(h)) => h
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| sni_authority(&conn.sni)),
        (None, None) => sni_authority(&conn.sni),
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| {
            ProxyError::downstream(ErrorKind::Protocol, format!("bad request uri: {e}"))
        })?;
    // :authority carries it; a Host header alongside is redundant.
    parts.headers.remove(HOST);
    parts.version = Version::HTTP_2;

    let request = Request::from_parts(parts, body);
    let response = within(conn.request_timeout, async {
        client.request(request).await.map_err(|e| client_error(&e))
    })
    .await?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        Either::Left(Either::Right(body)),
    ))
}

/// `exchange` bounded by the request timeout: no response head within it
/// is a 504. A combinator, not an `async fn`: an `async fn` would keep the
/// exchange both as its argument and inside the timeout, doubling the
/// state of every request.
pub(super) fn within<T>(
    limit: Duration,
    exchange: impl Future<Output = Result<T, ProxyError>>,
) -> impl Future<Output = Result<T, ProxyError>> {
    tokio::time::timeout(limit, exchange).map(move |r| match r {
        Ok(r) => r,
        Err(_) => Err(ProxyError::upstream(
            ErrorKind::RequestTimeout,
            format!("no response headers within {limit:?}"),
        )),
    })
}

/// Removes the headers that describe one hop, not the message: those named
/// in `Connection`, the hop-by-hop set, and `TE` except `trailers` (which
/// gRPC needs end to end). A `Connection` token never drops the identity
/// header we add ourselves.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    elsinore_transport::http::strip_hop_by_hop(
        headers,
        &elsinore_transport::http::Strip {
            proxy_auth: false,
            te: elsinore_transport::http::Te::Trailers,
            keep: &[PEER_IDENTITY_HEADER],
        },
    );
}

/// Finds our own error in the client error's causes (connect failures carry
/// the [`ProxyError`] from
/// [`Backends::connect`](crate::proxy::backend::Backends::connect));
/// anything else is an upstream failure of the exchange.
fn client_error(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut cause: Option<&(dyn StdError + 'static)> = e.source();
    let mut detail = String::new();
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<ProxyError>() {
            return p.clone();
        }
        if !detail.is_empty() {
            detail.push_str(": ");
        }
        detail.push_str(&c.to_string());
        cause = c.source();
    }
    if detail.is_empty() {
        detail = e.to_string();
    }
    if e.is_connect() {
        ProxyError::upstream(ErrorKind::ConnectFailed, detail)
    } else {
        ProxyError::upstream(
            ErrorKind::Io,
            format!("exchange with backend failed: {detail}"),
        )
    }
}

/// [`ProxyError::response`] with the ingress's body type.
fn error_response(e: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    e.response(grpc).map(Either::Right)
}
