//! Test support: a stream that records, for every write, the value a
//! counter had at that moment, so a test can tell how much work was done
//! before bytes went out.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Recording<T> {
    inner: T,
    counter: Arc<AtomicUsize>,
    writes: Arc<Mutex<Vec<usize>>>,
}

impl<T> Recording<T> {
    /// Wraps `inner`; each write records `counter`'s value in the returned
    /// list.
    pub fn new(inner: T, counter: &Arc<AtomicUsize>) -> (Self, Arc<Mutex<Vec<usize>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let io = Recording {
            inner,
            counter: Arc::clone(counter),
            writes: Arc::clone(&writes),
        };
        (io, writes)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Recording<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let seen = self.counter.load(Ordering::SeqCst);
        if let Ok(mut writes) = self.writes.lock() {
            writes.push(seen);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
