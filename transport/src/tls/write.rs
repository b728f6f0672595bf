//! The sending side of a [`TlsStream`]: records sealed in place in the
//! outgoing buffer, our key replaced before its limit (TLS 1.3) or the
//! connection closed at it (TLS 1.2), fatal alerts, and `AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use tokio::io::AsyncWrite;

use super::*;

impl TlsStream {
    /// Seals `data` as one record of type `typ` onto `outbuf`.
    pub(super) fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        let start = self.begin_record(data.len());
        self.outbuf.extend_from_slice(data);
        self.finish_record(start, typ).inspect_err(|_| {
            // Never leave an unsealed record to be sent.
            self.outbuf.truncate(start);
        })
    }

    /// Ends the connection for a fault of the peer's: the fatal `alert`
    /// (RFC 8446 §6.2) is sealed under the current key, nothing is sealed
    /// after it, and every later read or write fails with this error. The
    /// caller sends what is queued before returning the error.
    pub(super) fn fatal(&mut self, alert: u8, what: &str) -> io::Error {
        let message = format!("tls: {what}");
        if !self.write_closed {
            // Sequence numbers exhausted: no alert can be sealed, the error stands.
            let _ = self.seal(ALERT, &[FATAL, alert]);
            self.write_closed = true;
        }
        self.failed = Some(message.clone());
        io::Error::new(io::ErrorKind::InvalidData, message)
    }

    /// The error an earlier failure left, if any.
    pub(super) fn failed(&self) -> Option<io::Error> {
        let message = self.failed.as_ref()?;
        Some(io::Error::new(io::ErrorKind::InvalidData, message.clone()))
    }

    /// Starts a record of up to `len` bytes of plaintext on `outbuf`: room
    /// for the header and explicit nonce. Returns where it starts.
    pub(super) fn begin_record(&mut self, len: usize) -> usize {
        let start = self.outbuf.len();
        let prefix = HEADER + self.tx.explicit_len();
        if self.outbuf.capacity() == 0 {
            self.outbuf = spare::take();
        }
        self.outbuf.reserve(prefix + len + 1 + TAG);
        self.outbuf.extend_from_slice(&[0; HEADER + 8][..prefix]);
        start
    }

    /// Seals the record begun at `start` of `outbuf` (its plaintext runs to
    /// the end): content type, header, nonce, encryption, tag.
    pub(super) fn finish_record(&mut self, start: usize, typ: u8) -> io::Result<()> {
        let outer = if self.tx.framing == Framing::Tls13 {
            self.outbuf.extend_from_slice(&[typ]);
            APPLICATION_DATA
        } else {
            typ
        };
        self.outbuf.extend_from_slice(&[0; TAG]);
        self.tx.seal_record(&mut self.outbuf[start..], outer)
    }

    /// Before the next record: a key update if the peer asked for one or
    /// this key has sealed enough (RFC 8446 §4.6.3).
    pub(super) fn update_tx_key(&mut self) -> io::Result<()> {
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        self.tx = Keys::new(self.kernel.update_tx().map_err(tls_err)?, true)?;
        self.key_updates_sent += 1;
        self.inbound.update_owed = false;
        Ok(())
    }

    /// A TLS 1.2 key that has sealed all it may cannot be replaced: the
    /// connection says close_notify (so the peer sees an orderly end, not a
    /// truncation) and takes no more writes.
    pub(super) fn close_at_key_limit(&mut self) -> io::Error {
        if !self.write_closed {
            let _ = self.seal(ALERT, &[WARNING, CLOSE_NOTIFY]);
            self.write_closed = true;
        }
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "tls: this TLS 1.2 connection has sealed all the records its key may (TLS 1.2 cannot replace keys); it was closed with close_notify",
        )
    }

    /// Seals up to [`OUT_HIGH`] bytes of `bufs` as full records, copying
    /// straight into the outgoing buffer. Returns the bytes taken.
    pub(super) fn seal_slices(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut left = total.min(
            OUT_HIGH
                .saturating_sub(self.outbuf.len())
                .max(MAX_PLAINTEXT),
        );
        let mut taken = left;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = &[];
        while left > 0 {
            if self.tx.framing != Framing::Tls13 && self.tx.seq >= self.tx_limit {
                if left < taken {
                    // What was sealed goes out; the next write ends it.
                    taken -= left;
                    break;
                }
                return Err(self.close_at_key_limit());
            }
            if self.inbound.update_owed || self.tx.seq >= self.tx_limit {
                self.update_tx_key()?;
            }
            let size = left.min(MAX_PLAINTEXT);
            let start = self.begin_record(size);
            let mut need = size;
            while need > 0 {
                if current.is_empty() {
                    current = slices.next().unwrap_or_default();
                }
                let n = need.min(current.len());
                self.outbuf.extend_from_slice(&current[..n]);
                current = &current[n..];
                need -= n;
            }
            self.finish_record(start, APPLICATION_DATA)?;
            left -= size;
        }
        Ok(taken)
    }

    /// Writes queued records until none are left.
    pub(super) fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outbuf.advance(n);
        }
        // Drained: give the memory back; an idle connection holds none.
        spare::give(std::mem::take(&mut self.outbuf));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failed() {
            return Poll::Ready(Err(e));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: write after close_notify",
            )));
        }
        if this.outbuf.len() >= OUT_HIGH {
            // Full: make room first; what the socket took makes room.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            if this.outbuf.len() >= OUT_HIGH {
                return Poll::Pending;
            }
        }
        let taken = match this.seal_slices(bufs) {
            Ok(taken) => taken,
            Err(e) => {
                // The close_notify, if one was sealed; best effort.
                let _ = this.poll_drain(cx);
                return Poll::Ready(Err(e));
            }
        };
        // Send now; what the socket refuses waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.seal(ALERT, &[WARNING, CLOSE_NOTIFY])?;
            this.write_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
