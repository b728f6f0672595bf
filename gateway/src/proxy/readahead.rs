//! Read-ahead under TLS. rustls asks its transport for at most 4 KiB per
//! read, so a 16 KiB record costs four or five `read` syscalls and a burst of
//! multiplexed HTTP/2 frames as many more. [`ReadAhead`] reads up to
//! [`SCRATCH`] bytes per syscall into a per-thread scratch buffer, hands the
//! caller what it asked for, and keeps only the leftover, in a buffer sized to
//! it and freed as soon as it is drained: a connection that is idle (or whose
//! messages fit in one read) holds no buffer at all, which is what keeps
//! thousands of held connections cheap.
//!
//! Writes pass straight through (vectored, as rustls writes its records).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one syscall reads: four full TLS records.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Shared by every [`ReadAhead`] polled on this thread; borrowed only for
    /// the duration of one `poll_read`, never across an await.
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// A transport whose reads go through a large per-thread scratch buffer.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    /// Bytes read from `inner` but not yet handed out; empty and without
    /// capacity whenever it is drained.
    leftover: Vec<u8>,
    /// Next byte of `leftover` to hand out.
    pos: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            leftover: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes held between reads.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.leftover.len() - self.pos
    }
}

impl<T: AsyncRead + Unpin> ReadAhead<T> {
    /// One read from `inner` into `scratch`, copying what fits into `dst`
    /// and keeping the rest.
    fn read_via(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut rb = ReadBuf::new(scratch);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        let give = got.len().min(dst.remaining());
        dst.put_slice(&got[..give]);
        if give < got.len() {
            self.leftover = got[give..].to_vec();
            self.pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.leftover.len() {
            let give = (this.leftover.len() - this.pos).min(dst.remaining());
            dst.put_slice(&this.leftover[this.pos..this.pos + give]);
            this.pos += give;
            if this.pos == this.leftover.len() {
                this.leftover = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if dst.remaining() >= SCRATCH {
            // The caller's buffer is as large as ours: no copy needed.
            return Pin::new(&mut this.inner).poll_read(cx, dst);
        }
        SCRATCH_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => this.read_via(cx, &mut scratch, dst),
            // Only reachable if a ReadAhead were nested inside another on
            // the same thread; read without the look-ahead then.
            Err(_) => Pin::new(&mut this.inner).poll_read(cx, dst),
        })
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Counts the reads that reach the wrapped transport.
    struct Counting<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_the_leftover_is_freed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let payload: Vec<u8> = (0..48 * 1024u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
            // Keep the socket open until the reader is done.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        // Let the whole payload arrive in the socket buffer first.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut r = ReadAhead::new(Counting {
            inner: tcp,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, payload);
        assert!(
            r.inner.reads <= 2,
            "48 KiB in 4 KiB reads reached the socket {} times",
            r.inner.reads
        );
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.leftover.capacity(), 0, "a drained buffer is freed");
        drop(r);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = ReadAhead::new(a);
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
