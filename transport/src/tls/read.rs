//! The receiving side of a [`TlsStream`]: reads sized to what is flowing,
//! records opened in the connection's buffer by [`Inbound`], plaintext
//! handed out with one copy, key updates answered, buffers given back when
//! drained, and `AsyncRead`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

impl TlsStream {
    /// Opens the next whole record in `inbuf`, if there is one. Returns
    /// false when more bytes must be read first.
    pub(super) fn open_record(&mut self) -> io::Result<bool> {
        match self.inbound.open(&mut self.inbuf, &mut self.kernel) {
            Ok(None) => Ok(false),
            Ok(Some((record, data))) => {
                self.record = record;
                self.plain = data;
                Ok(true)
            }
            Err(Refused::Alert(alert, what)) => Err(self.fatal(alert, &what)),
            Err(Refused::PeerAlert(message)) => {
                self.failed = Some(message.clone());
                // Nothing more is sent on a connection the peer ended.
                self.write_closed = true;
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, message))
            }
            Err(Refused::Io(e)) => Err(e),
        }
    }

    /// Sends what is queued: the answer to a key update the peer asked for
    /// (even if we never write) and anything before it.
    pub(super) fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.outbuf.is_empty() {
                ready!(self.poll_drain(cx))?;
            }
            if !self.inbound.update_owed || self.write_closed {
                return Poll::Ready(Ok(()));
            }
            self.update_tx_key()?;
        }
    }

    /// Waiting for the rest of a record (at most [`READ_SMALL`] bytes): what
    /// is held moves to a buffer of one record's size, so a peer that
    /// trickles partial records cannot keep a bulk buffer reserved per
    /// connection. Once bytes are there, the read takes a kept buffer again
    /// (at the cost of copying less than a record, twice per wait): a bulk
    /// transfer still reads [`READ_BIG`] per syscall.
    pub(super) fn shrink_waiting(&mut self) {
        if self.inbuf.is_empty() || self.in_small {
            return;
        }
        let mut small = BytesMut::with_capacity(READ_SMALL);
        small.extend_from_slice(&self.inbuf);
        spare::give(std::mem::replace(&mut self.inbuf, small));
        self.in_small = true;
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failed() {
            return Poll::Ready(Err(e));
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let at = this.plain.start;
                buf.put_slice(&this.inbuf[at..at + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.release_record();
                    // A key update the peer asked for before this data is
                    // answered now, not at our next write or read: a reader
                    // that got what it wanted may not read again until the
                    // peer hears back. Requests that came together were
                    // already merged into one answer; a blocked socket
                    // leaves it owed (one flag, no queue), and an error
                    // shows on the next call.
                    if this.inbound.update_owed {
                        let _ = this.poll_owed(cx);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            this.release_record();
            if this.inbound.closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The fatal alert, if one was sealed; best effort.
                    if !this.outbuf.is_empty() {
                        let _ = this.poll_drain(cx);
                    }
                    return Poll::Ready(Err(e));
                }
            }
            if let Poll::Ready(Err(e)) = this.poll_owed(cx) {
                return Poll::Ready(Err(e));
            }
            // Wait for bytes before taking a buffer for them: a connection
            // waiting for its peer holds none, or one record's worth.
            if this.io.poll_read_ready(cx)?.is_pending() {
                this.shrink_waiting();
                return Poll::Pending;
            }
            // What is held is the start of one record, shorter than one.
            let want = if this.flowing || this.in_small {
                READ_BIG
            } else {
                READ_SMALL.saturating_sub(this.inbuf.len()).max(1)
            };
            if this.inbuf.capacity() == 0 {
                this.inbuf = spare::take();
                this.in_small = false;
            }
            if this.inbuf.capacity() - this.inbuf.len() < want {
                if this.in_small {
                    // Reading again: a kept buffer rather than a new one.
                    let mut big = spare::take();
                    big.reserve(this.inbuf.len() + want);
                    big.extend_from_slice(&this.inbuf);
                    this.inbuf = big;
                }
                this.in_small = false;
            }
            // At most `want`, however much room the buffer has: a reader
            // that is not flowing takes one record and leaves the rest in
            // the socket. Draining the socket at every read left it empty
            // at the next, so the reader slept and every write of a bulk
            // sender paid for waking it on the other core (measured with
            // `records --workloads bulk`: 1.6 context switches per sender
            // write, 11 Gbit/s; bounded, 0.35 and 28 Gbit/s).
            this.inbuf.reserve(want);
            let mut limited = BufMut::limit(&mut this.inbuf, want);
            match this.io.try_read_buf(&mut limited) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls: the peer closed the connection without sending close_notify",
                    )));
                }
                Ok(n) => this.flowing = n == want,
                // Readiness was stale; poll_read_ready registers us again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.release_record(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl TlsStream {
    /// Drops the record handed out (or handled) at the front of `inbuf`,
    /// and the buffer itself once nothing is left in it.
    pub(super) fn release_record(&mut self) {
        if self.record > 0 {
            self.inbuf.advance(self.record);
            self.record = 0;
            self.plain = 0..0;
        }
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            spare::give(std::mem::take(&mut self.inbuf));
            self.flowing = false;
            self.in_small = false;
        }
    }
}
