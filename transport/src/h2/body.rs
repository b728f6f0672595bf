//! Bodies on HTTP/2 streams, shared by the client ([`super::client`])
//! and the server ([`super::server`]) built on the `h2` crate:
//! [`RecvBody`] reads a stream as an [`http_body::Body`], giving the window
//! back as data is taken, and [`pipe`] writes a body into a stream as the
//! peer's window allows.

use std::fmt;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;
use crate::http::BytesBody;

/// A body read straight from its HTTP/2 stream. `G` is held for as long as
/// the body lives (the client counts open streams with it).
pub struct RecvBody<G = ()> {
    recv: RecvStream,
    data_done: bool,
    /// What is left of the message's `content-length`, for the size hint.
    length: Option<u64>,
    _guard: G,
}

impl<G> RecvBody<G> {
    /// The body of a message whose head is `headers`.
    pub fn new(recv: RecvStream, headers: &HeaderMap, guard: G) -> Self {
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        RecvBody {
            recv,
            data_done: false,
            length,
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for RecvBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    if let Some(left) = this.length.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) if !self.data_done => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Why [`pipe`] stopped before the body's end was sent.
#[derive(Debug)]
pub enum PipeError {
    /// The peer reset the stream (it wants no more of the body).
    Reset(Reason),
    /// The stream or connection failed under us.
    Stream(h2::Error),
    /// The body failed; the stream was reset with the reason given to
    /// [`pipe`].
    Body(BoxError),
}

impl fmt::Display for PipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipeError::Reset(reason) => write!(f, "the peer reset the stream ({reason})"),
            PipeError::Stream(e) => write!(f, "the stream failed: {e}"),
            PipeError::Body(e) => write!(f, "the body failed: {e}"),
        }
    }
}

/// Writes `body` into `tx` until its end (the last data frame or the
/// trailers carry END_STREAM), as the peer's window allows. A chunk goes
/// out once the stream has any send capacity; h2 holds the rest of it until
/// the window opens, within its send buffer. A body that fails resets the
/// stream with `on_body_error`. A reset from the peer ends the pipe even
/// while the body is waiting for data.
pub async fn pipe<B>(
    body: B,
    tx: &mut SendStream<Bytes>,
    on_body_error: Reason,
) -> Result<(), PipeError>
where
    B: BytesBody,
{
    let mut body = pin!(body);
    // A chunk in hand that waits for capacity, and whether it is the last.
    let mut held: Option<(Bytes, bool)> = None;
    poll_fn(|cx| {
        loop {
            if let Poll::Ready(reset) = tx.poll_reset(cx) {
                return Poll::Ready(Err(match reset {
                    Ok(reason) => PipeError::Reset(reason),
                    Err(e) => PipeError::Stream(e),
                }));
            }
            if let Some((data, last)) = held.take() {
                if tx.capacity() == 0 {
                    match tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(PipeError::Stream(e))),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(PipeError::Stream(h2::Error::from(
                                Reason::STREAM_CLOSED,
                            ))));
                        }
                        Poll::Pending => {
                            held = Some((data, last));
                            return Poll::Pending;
                        }
                    }
                    held = Some((data, last));
                    continue;
                }
                tx.send_data(data, last).map_err(PipeError::Stream)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(body.as_mut().poll_frame(cx)) {
                None => {
                    return Poll::Ready(
                        tx.send_data(Bytes::new(), true).map_err(PipeError::Stream),
                    );
                }
                Some(Err(e)) => {
                    tx.send_reset(on_body_error);
                    return Poll::Ready(Err(PipeError::Body(e.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let last = body.is_end_stream();
                        if data.is_empty() {
                            // Needs no window; an empty last frame still
                            // has to carry END_STREAM.
                            tx.send_data(data, last).map_err(PipeError::Stream)?;
                            if last {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // Claim a little of the window, not the whole chunk:
                        // a stream waiting for capacity then does not hold
                        // the connection's window against the others.
                        tx.reserve_capacity(1);
                        held = Some((data, last));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            tx.reserve_capacity(0);
                            return Poll::Ready(
                                tx.send_trailers(trailers).map_err(PipeError::Stream),
                            );
                        }
                    }
                },
            }
        }
    })
    .await
}
