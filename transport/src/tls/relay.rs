//! The egress's direct path: a plain socket's bytes read straight into
//! record slots and sealed where they landed, with no copy between the two
//! sockets' buffers.

use std::cell::RefCell;
use std::io;
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;

use super::*;

/// What [`TlsStream::poll_relay_from`] did.
#[derive(Debug)]
pub enum Relayed {
    /// This many bytes were read, sealed, and sent or queued.
    Moved(usize),
    /// The source reached EOF.
    Eof,
    /// The direct path cannot be taken now (a key must be replaced first):
    /// copy through `poll_write` instead.
    Unavailable,
}

/// Which side failed in [`TlsStream::poll_relay_from`].
#[derive(Debug)]
pub enum RelayError {
    Read(io::Error),
    Write(io::Error),
}

/// Records one relay read fills: as many as a write may queue.
pub const RELAY_RECORDS: usize = OUT_HIGH / MAX_PLAINTEXT;
/// The largest record slot: header, TLS 1.2 explicit nonce, plaintext,
/// TLS 1.3 content type, tag.
pub(super) const RELAY_SLOT: usize = HEADER + 8 + MAX_PLAINTEXT + 1 + TAG;

thread_local! {
    /// Record slots the relay reads plaintext into and seals in place,
    /// shared by a thread's connections (used within one call only).
    static RELAY_SLAB: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl TlsStream {
    /// Moves what `src` holds to the peer without copying it between
    /// buffers: one vectored read puts the plaintext straight into record
    /// slots, each is sealed where it landed, and the records go out in one
    /// write. What the socket does not take is queued as by `poll_write`.
    /// Records queued earlier go first; until they are out this waits.
    pub fn poll_relay_from(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
    ) -> Poll<Result<Relayed, RelayError>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(RelayError::Write(e)));
        }
        if self.write_closed {
            return Poll::Ready(Err(RelayError::Write(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: write after close_notify",
            ))));
        }
        if !self.outbuf.is_empty() {
            ready!(self.poll_drain(cx)).map_err(RelayError::Write)?;
        }
        if self.inbound.update_owed {
            // Our answer to the peer's request goes before our next data.
            self.update_tx_key().map_err(RelayError::Write)?;
            ready!(self.poll_drain(cx)).map_err(RelayError::Write)?;
        }
        if self.tx.seq.saturating_add(RELAY_RECORDS as u64) >= self.tx_limit {
            return Poll::Ready(Ok(Relayed::Unavailable));
        }
        RELAY_SLAB.with(|cell| {
            let Ok(mut slab) = cell.try_borrow_mut() else {
                return Poll::Ready(Ok(Relayed::Unavailable));
            };
            if slab.is_empty() {
                *slab = vec![0; RELAY_RECORDS * RELAY_SLOT];
            }
            self.relay_through(cx, src, &mut slab)
        })
    }

    pub(super) fn relay_through(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        slab: &mut [u8],
    ) -> Poll<Result<Relayed, RelayError>> {
        let tls13 = self.tx.framing == Framing::Tls13;
        let prefix = HEADER + self.tx.explicit_len();
        let suffix = usize::from(tls13) + TAG;
        // Full records lie back to back: the sealed bytes are contiguous.
        let stride = prefix + MAX_PLAINTEXT + suffix;
        let read = loop {
            ready!(src.poll_read_ready(cx)).map_err(RelayError::Read)?;
            let mut slots: Vec<io::IoSliceMut<'_>> = slab
                .chunks_mut(stride)
                .take(RELAY_RECORDS)
                .map(|slot| io::IoSliceMut::new(&mut slot[prefix..prefix + MAX_PLAINTEXT]))
                .collect();
            match src.try_read_vectored(&mut slots) {
                Ok(0) => return Poll::Ready(Ok(Relayed::Eof)),
                Ok(n) => break n,
                // Readiness was stale; poll_read_ready registers us again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(RelayError::Read(e))),
            }
        };
        let mut end = 0;
        let mut left = read;
        for slot in slab.chunks_mut(stride) {
            if left == 0 {
                break;
            }
            let len = left.min(MAX_PLAINTEXT);
            left -= len;
            let rec = &mut slot[..prefix + len + suffix];
            if tls13 {
                rec[prefix + len] = APPLICATION_DATA;
            }
            self.tx
                .seal_record(rec, APPLICATION_DATA)
                .map_err(RelayError::Write)?;
            end += rec.len();
        }
        let sealed = &slab[..end];
        let written = match self.io.try_write(sealed) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Poll::Ready(Err(RelayError::Write(e))),
        };
        if written < end {
            if self.outbuf.capacity() == 0 {
                self.outbuf = spare::take();
            }
            self.outbuf.extend_from_slice(&sealed[written..]);
            // Registers for room; the rest goes out first next time.
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Poll::Ready(Err(RelayError::Write(e)));
            }
        }
        Poll::Ready(Ok(Relayed::Moved(read)))
    }
}
