//! The HTTP/2 server side, on the `h2` crate directly, for ingress (peer
//! gateways over mTLS) and egress (apps speaking h2c).
//!
//! Why not hyper's HTTP/2 server: hyper spawns a task per stream, so every
//! request is handed between the connection's task and its own, and each
//! frame that moves wakes the other. Here the streams are served inside
//! the connection's task: one task polls the connection (which moves the
//! frames) and the exchanges that are in flight, and only the exchanges
//! that were woken are polled again.
//!
//! Settings match hyper's server defaults: 1 MiB stream and connection
//! windows, 16 KiB frames and header lists, 400 KiB send buffer, and the
//! caller's limit on concurrent streams. A stream the client resets is
//! dropped, with the exchange it was waiting on (the request to the
//! backend is cancelled as with hyper). `CONNECT` is answered 405 here, as
//! by the HTTP/1.1 server: tunnels are not proxied.
//!
//! What a client can make us do without sending a request to its end is
//! bounded. The connection preface must come within the handshake timeout
//! (and a stop ends the wait), so a connection that sends nothing holds no
//! slot for long. A stream the client reset before it was accepted starts
//! no exchange at all. And since streams are accepted as soon as they
//! arrive, h2's own guard against streams reset before they are accepted
//! (`max_pending_accept_reset_streams`, here as wide as the allowance
//! below) seldom sees one: the same rule is kept here over accepted
//! streams, counting those the client resets
//! before their response head against those answered, and the connection
//! gets a GOAWAY with `ENHANCE_YOUR_CALM` once the resets run more than
//! [`reset_allowance`] ahead (the "rapid reset" flood, CVE-2023-44487,
//! where every HEADERS + RST_STREAM pair would start a backend exchange).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::Reason;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::body::{self as h2body, RecvBody};
use crate::http::Handler;

const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// h2's guard on streams it had to reset itself for a protocol error
/// before the connection gets a GOAWAY, set here rather than left to its
/// default (the same) so that it stays on whatever h2 version is built.
/// Its other guard, on streams reset while waiting to be accepted, is set
/// to [`reset_allowance`] in [`serve`]: h2's default of 20 ended the
/// connection between two gateways whenever the egress cancelled more
/// than 20 streams at once (its clients going away together; measured in
/// the data-plane benchmark), and this loop's own count of early resets
/// against answers bounds a flood anyway.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Responses finished before the connection writes them, instead of
/// writing all that a pass finished at once: the peer starts on the first
/// while the rest are still read from the backends.
const RESPOND_EVERY: usize = 16;

/// How one connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    /// How long the exchanges in flight get to finish once the connection
    /// is told to stop, before it is closed under them.
    pub drain_timeout: Duration,
    /// How long the client gets to send its connection preface.
    pub handshake_timeout: Duration,
}

/// How far the streams a client resets before their response may run
/// ahead of the streams answered on a connection: twice the streams it may
/// have open, so that a client cancelling all it has in flight, twice, is
/// never taken for a flood.
pub fn reset_allowance(settings: &Settings) -> u64 {
    2 * u64::from(settings.max_concurrent_streams.max(1))
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it, or it was stopped and drained.
    Closed,
    /// It was stopped and exchanges were still in flight after the drain
    /// timeout; they were cut.
    DrainTimedOut,
    /// The client sent no connection preface within the handshake timeout.
    PrefaceTimedOut,
}

/// Serves HTTP/2 on `io` (after TLS, or h2c with prior knowledge) until
/// the client closes, or until `stop` resolves; then the connection is shut
/// down gracefully (GOAWAY) and the exchanges in flight get
/// `settings.drain_timeout` to finish. Each request goes to `handler`; its
/// response is sent back on the stream. A client that resets streams
/// faster than they are answered (see [`reset_allowance`]) gets a GOAWAY
/// with `ENHANCE_YOUR_CALM`, returned as the error.
///
/// Long because the accept, the exchanges in flight, the reset guard and
/// the graceful stop are polled together in this one task.
pub async fn serve<T, H>(
    io: T,
    settings: Settings,
    stop: impl Future<Output = ()>,
    handler: H,
) -> Result<Ended, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Handler<RecvBody>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_pending_accept_reset_streams(
            usize::try_from(reset_allowance(&settings)).unwrap_or(usize::MAX),
        )
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut stop = pin!(stop);
    // Until the preface, nothing else watches the connection: a client
    // that sends nothing would hold it for ever.
    let mut conn = tokio::select! {
        biased;
        () = stop.as_mut() => return Ok(Ended::Closed),
        preface = tokio::time::timeout(settings.handshake_timeout, handshake) => match preface {
            Ok(conn) => conn?,
            Err(_) => return Ok(Ended::PrefaceTimedOut),
        },
    };
    // Set once stopping: when the drain ends.
    let mut drain: Option<Pin<Box<Sleep>>> = None;
    let mut exchanges = FuturesUnordered::new();
    // Early resets may run this far ahead of answers; below 0, the client
    // is told to calm down.
    let allowance = i64::try_from(reset_allowance(&settings)).unwrap_or(i64::MAX);
    let mut balance = allowance;
    let mut calmed = false;
    poll_fn(|cx| {
        if drain.is_none() && stop.as_mut().poll(cx).is_ready() {
            conn.graceful_shutdown();
            drain = Some(Box::pin(tokio::time::sleep(settings.drain_timeout)));
        }
        if let Some(timer) = drain.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(Ended::DrainTimedOut));
        }
        loop {
            // Exchanges first: what they queued is written by the
            // connection poll below, in the same pass, and every
            // RESPOND_EVERY finished exchanges on the way.
            let mut finished = 0;
            while let Poll::Ready(Some(answered)) = exchanges.poll_next_unpin(cx) {
                finished += 1;
                if answered {
                    balance = (balance + 1).min(allowance);
                } else {
                    balance -= 1;
                }
                if finished % RESPOND_EVERY == 0 {
                    // How the connection ended, if it did, is for
                    // `poll_accept` below to say.
                    let _ = conn.poll_closed(cx);
                }
            }
            if balance < 0 && !calmed {
                calmed = true;
                tracing::debug!(
                    allowance,
                    "client resets streams faster than they are answered; GOAWAY"
                );
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, mut respond)))) => {
                    if calmed {
                        continue;
                    }
                    // Reset in the frames read with its head: nothing to
                    // start.
                    if respond.poll_reset(cx).is_ready() {
                        balance -= 1;
                        continue;
                    }
                    if req.method() == Method::CONNECT {
                        refuse_connect(respond);
                        continue;
                    }
                    let (parts, recv) = req.into_parts();
                    let body = RecvBody::new(recv, &parts.headers, ());
                    let req = Request::from_parts(parts, body);
                    exchanges.push(exchange(&handler, req, respond));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // Closed: no stream can move any more.
                Poll::Ready(None) if calmed => {
                    return Poll::Ready(Err(h2::Error::from(Reason::ENHANCE_YOUR_CALM)));
                }
                Poll::Ready(None) => return Poll::Ready(Ok(Ended::Closed)),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Answers a CONNECT request 405 (tunnels are not proxied) with the
/// HTTP/1.1 server's refusal: the reason as text and
/// `x-elsinore-error: protocol`.
fn refuse_connect(mut respond: SendResponse<Bytes>) {
    let (head, body) = crate::h1::server::refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        crate::h1::server::CONNECT_REFUSED,
    )
    .into_parts();
    if let Ok(mut tx) = respond.send_response(Response::from_parts(head, ()), false) {
        let _ = tx.send_data(body, true);
    }
}

/// One stream: the handler's response (unless the client resets the stream
/// first), then its body. The handler's future is made here, in place: taken
/// as an argument, it would be kept twice in this future's state (as the
/// argument and pinned), and that state is allocated and filled for every
/// request. Resolves to whether the stream got its response head (false:
/// the client reset it first).
async fn exchange<H: Handler<RecvBody>>(
    handler: &H,
    req: Request<RecvBody>,
    mut respond: SendResponse<Bytes>,
) -> bool {
    let mut response = pin!(handler(req));
    let response = poll_fn(|cx| {
        if let Poll::Ready(r) = response.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let Some(response) = response else {
        tracing::debug!("stream reset by the client before its response");
        return false;
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let mut tx = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(tx) => tx,
        Err(error) => {
            tracing::debug!(%error, "response head not sent");
            return false;
        }
    };
    if !end && let Err(error) = h2body::pipe(body, &mut tx, Reason::INTERNAL_ERROR).await {
        tracing::debug!(%error, "response body not sent whole");
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
