//! HTTP, HTTP2 and gRPC imports: the app is served HTTP/1.1 or h2c, each
//! request is routed (by listener, or by Host on a shared port or the
//! catch-all), rewritten for the owner (`:authority`, scheme, hop-by-hop
//! fields gone) and forwarded over a pooled HTTP/2 connection, trying the
//! endpoints in round-robin order. Failures are answered here, once, with
//! [`ProxyError::response`]; it must not build a response of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use elsinore_transport::h1::server::{self as h1, BoxError};
use elsinore_transport::h2::client::SendError;
use elsinore_transport::h2::server as h2server;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::routes::{AuthorityMemo, Route, Routes, View, no_endpoints, request_host, split_host};
use super::stats::EgressStats;
use super::{Egress, RespBody};
use crate::catalog::routes::{Mode, VipEntry};
use crate::proxy::activity::{Activity, watched};
use crate::proxy::error::{ErrorKind, ProxyError, Side, is_grpc};

impl Egress {
    /// Serves HTTP/1.1 or h2c (prior knowledge) to a local app.
    pub(super) async fn serve_http(
        self: Arc<Self>,
        tcp: TcpStream,
        client: SocketAddr,
        route: Route,
        permit: elsinore_transport::accept::Permit,
    ) {
        let tuning = &self.ctx.tuning;
        // An app gets `requestTimeout` to send request headers, as on ingress.
        let settings = h1::Settings {
            header_timeout: tuning.request_timeout,
            idle_timeout: tuning.idle_timeout,
            yield_every: elsinore_transport::handoff::every(tuning.yield_to_clients),
        };
        let egress = &self;
        let served = h1::serve(tcp, &settings, &self.ctx.shutdown, |req| {
            egress.handle(client, route, req)
        })
        .await;
        match served {
            Ok(h1::Served::Closed) => {}
            // Boxed so that HTTP/1.1 connections, the common case, do not
            // carry hyper's HTTP/2 connection state in their task.
            Ok(h1::Served::H2Preface(tcp)) => {
                Box::pin(self.clone().serve_h2c(tcp, client, route)).await;
            }
            Err(error) => {
                tracing::debug!(client.addr = %client, %error, "downstream HTTP/1.1 connection ended with an error");
            }
        }
        drop(permit);
    }

    async fn serve_h2c(self: Arc<Self>, tcp: TcpStream, client: SocketAddr, route: Route) {
        let activity = Arc::new(Activity::new());
        let io = watched(tcp, &activity);
        let idle = self.ctx.tuning.idle_timeout;
        let stop = async {
            let reason = activity.idle_or_shutdown(idle, &self.ctx.shutdown).await;
            tracing::debug!(reason, "closing downstream h2c connection gracefully");
        };
        let settings = h2server::Settings {
            max_concurrent_streams: self.ctx.tuning.http2_max_concurrent_streams,
            drain_timeout: self.ctx.drain_timeout,
            handshake_timeout: self.ctx.tuning.handshake_timeout,
            // Identity headers are the ingress's to strip.
        };
        let egress = &*self;
        let served =
            h2server::serve(io, settings, stop, |req| egress.handle(client, route, req)).await;
        match served {
            Ok(h2server::Ended::Closed) => {}
            Ok(h2server::Ended::PrefaceTimedOut) => tracing::debug!(
                handshake_timeout = ?self.ctx.tuning.handshake_timeout,
                "downstream h2c connection sent no HTTP/2 preface in time; closed"
            ),
            Ok(h2server::Ended::DrainTimedOut) => tracing::debug!(
                drain_timeout = ?self.ctx.drain_timeout,
                "downstream h2c connection still busy after the drain timeout; closed"
            ),
            Err(error) => {
                tracing::debug!(%error, "downstream h2c connection ended with an error");
            }
        }
    }

    async fn handle<B>(
        &self,
        client: SocketAddr,
        route: Route,
        req: Request<B>,
    ) -> Response<RespBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        EgressStats::bump(&self.stats.requests);
        let started = Instant::now();
        let grpc = is_grpc(req.headers());
        // Before routing: a Host or :authority with userinfo would be
        // routed (or passed to the owner) under a name the owner's ingress
        // reads differently.
        if let Err(e) = crate::proxy::refuse_userinfo(req.uri(), req.headers()) {
            return self.failed(&e, client, None, grpc);
        }
        // The entry and its routes from one view of the table.
        let (entry, routes) = {
            let view = self.view.load();
            match self.route(&view, route, &req) {
                Ok(entry) => {
                    let routes = self.routes(&view, &entry);
                    (entry, routes)
                }
                Err(e) => return self.failed(&e, client, None, grpc),
            }
        };
        let span =
            tracing::debug_span!("request", service = %entry.fqdn, peer = %entry.import.peer);
        let resp = match self.forward(&entry, &routes, req).instrument(span).await {
            Ok(resp) => resp,
            Err(e) => self.failed(&e, client, Some(&entry), grpc),
        };
        routes.latency.observe(started.elapsed());
        resp
    }

    /// Counts and logs a failed request and answers it.
    fn failed(
        &self,
        e: &ProxyError,
        client: SocketAddr,
        entry: Option<&VipEntry>,
        grpc: bool,
    ) -> Response<RespBody> {
        self.stats.error(e);
        let service = entry.map(|e| tracing::field::display(&e.fqdn));
        let peer = entry.map(|e| tracing::field::display(&e.import.peer));
        if e.side == Side::Downstream {
            tracing::debug!(client.addr = %client, service, peer, error = %e, "request refused");
        } else {
            tracing::warn!(client.addr = %client, service, peer, error = %e, side = %e.side, "request failed");
        }
        error_response(e, grpc)
    }

    fn route<B>(
        &self,
        view: &View,
        route: Route,
        req: &Request<B>,
    ) -> Result<Arc<VipEntry>, ProxyError> {
        match route {
            Route::Vip(addr) => view.lookup_vip(addr).ok_or_else(|| {
                ProxyError::upstream(
                    ErrorKind::NoRoute,
                    format!("{addr} is no longer an imported service"),
                )
            }),
            Route::Port(port) => {
                let host = request_host(req).ok_or_else(|| {
                    ProxyError::downstream(
                        ErrorKind::NoRoute,
                        format!("request has no Host; port {port} of the shared egress address routes by Host"),
                    )
                })?;
                let (name, _) = split_host(host);
                view.table.lookup_http(port, name).cloned().ok_or_else(|| {
                    ProxyError::downstream(
                        ErrorKind::NoRoute,
                        format!("no HTTP import named {name:?} on port {port}"),
                    )
                })
            }
            Route::CatchAll => {
                let host = request_host(req).ok_or_else(|| {
                    ProxyError::downstream(
                        ErrorKind::NoRoute,
                        "request has no Host; this listener routes by Host to imported services",
                    )
                })?;
                let (name, _) = split_host(host);
                let entry = view.table.lookup_name(name).cloned().ok_or_else(|| {
                    ProxyError::downstream(
                        ErrorKind::NoRoute,
                        format!("no imported service is named {name:?}"),
                    )
                })?;
                if entry.mode != Mode::Http {
                    let protocol = entry
                        .import
                        .service
                        .instances
                        .first()
                        .map_or("TCP", |i| i.protocol.as_str());
                    return Err(ProxyError::downstream(
                        ErrorKind::Protocol,
                        format!(
                            "{} is a {protocol} import, not HTTP: connect to {}:{} instead",
                            entry.fqdn, entry.vip, entry.port
                        ),
                    ));
                }
                Ok(entry)
            }
        }
    }

    /// Forwards one request over a pooled HTTP/2 connection, trying the
    /// endpoints in round-robin order until one can be reached.
    async fn forward<B>(
        &self,
        entry: &VipEntry,
        routes: &Routes,
        req: Request<B>,
    ) -> Result<Response<RespBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let targets = &routes.http;
        if targets.is_empty() {
            return Err(no_endpoints(entry));
        }
        let version = req.version();
        let mut req = upstream_request(req, entry, &routes.authority)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        'targets: for k in 0..targets.len() {
            let target = &targets[(start + k) % targets.len()];
            let (endpoint, key) = (&target.endpoint, target.pool.key());
            let sni = key.sni.as_str();
            // A pooled connection may close between the lease and the send;
            // the request comes back unsent then and goes on a fresh lease.
            for _ in 0..2 {
                // The config is looked up per dial, not per request: a
                // rotation reaches the next pooled connection.
                let dial = || {
                    Box::pin(async move {
                        let config = self.client_config(entry, true)?;
                        self.dial_h2(entry, endpoint, sni, config).await
                    })
                };
                let lease = match self.pool.get(&target.pool, dial).await {
                    Ok(lease) => lease,
                    Err(e) if e.retry_safe => {
                        tracing::debug!(error = %e, "endpoint failed; trying the next");
                        last = Some(e);
                        continue 'targets;
                    }
                    Err(e) => return Err(e),
                };
                let in_flight = lease.in_flight;
                let timeout = self.ctx.tuning.request_timeout;
                let sent = tokio::time::timeout(timeout, lease.sender.send(req)).await;
                match sent {
                    Err(_) => {
                        return Err(ProxyError::upstream(
                            ErrorKind::RequestTimeout,
                            format!("no response from {} within {timeout:?}", key.endpoint),
                        ));
                    }
                    Ok(Ok(resp)) => {
                        let (mut parts, body) = resp.into_parts();
                        parts.version = version;
                        // The stream counts as load on its connection until
                        // the body is done (or dropped).
                        let body = body
                            .map_frame(move |frame| {
                                let _stream = &in_flight;
                                frame
                            })
                            .boxed();
                        return Ok(Response::from_parts(parts, body));
                    }
                    Ok(Err(SendError::Unsent(unsent, e))) => {
                        tracing::debug!(error = %e, "pooled connection closed; sending on another");
                        req = *unsent;
                    }
                    Ok(Err(SendError::Failed(e))) => {
                        return Err(ProxyError::upstream(
                            ErrorKind::Protocol,
                            format!("{}: {e}", key.endpoint),
                        ));
                    }
                }
            }
            last = Some(ProxyError::upstream(
                ErrorKind::ConnectFailed,
                format!("{}: connections keep closing", key.endpoint),
            ));
        }
        Err(last.unwrap_or_else(|| no_endpoints(entry)))
    }
}

/// Removes what describes the app's hop, not the request: the hop-by-hop
/// fields and the ones `Connection` names, the proxy authentication meant
/// for us, and `te` unless it is exactly `trailers` (HTTP/2 allows only
/// that; gRPC needs it). `Host` goes too (HTTP/2 carries `:authority`),
/// on its own as every HTTP/1.1 request has one.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    headers.remove(header::HOST);
    elsinore_transport::http::strip_hop_by_hop(
        headers,
        &elsinore_transport::http::Strip {
            proxy_auth: true,
            te: elsinore_transport::http::Te::Exact,
            keep: &[],
        },
    );
}

/// The request as it goes to the owner's ingress over HTTP/2: the path and
/// query kept as they are, scheme and `:authority` set.
fn upstream_request<B>(
    req: Request<B>,
    entry: &VipEntry,
    memo: &AuthorityMemo,
) -> Result<Request<B>, ProxyError> {
    let authority = memo.get(request_host(&req), entry)?;
    let (mut parts, body) = req.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(authority);
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| {
        ProxyError::downstream(
            ErrorKind::Protocol,
            format!("cannot forward the request: {e}"),
        )
    })?;
    parts.version = Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    Ok(Request::from_parts(parts, body))
}

/// [`ProxyError::response`] with the egress's body type.
fn error_response(e: &ProxyError, grpc: bool) -> Response<RespBody> {
    e.response(grpc)
        .map(|body| body.map_err(|never| match never {}).boxed())
}
