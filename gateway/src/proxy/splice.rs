//! The TCP splice: copies bytes both ways between two streams until both
//! directions are finished, an error occurs, or nothing moved for the idle
//! timeout. Half-close is carried across: when one side ends its writes (EOF
//! on read), the write half of the other side is shut down and the opposite
//! direction keeps flowing, so request/response protocols that signal the end
//! of the request with a half-close keep working. Each direction owns one
//! buffer for the life of the splice; nothing is allocated per chunk.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::error::{ErrorKind, ProxyError, Side};

/// Each direction's buffer starts small, so the thousands of mostly idle
/// connections a gateway holds cost little, and doubles whenever a read
/// fills it, up to [`MAX_BUF`]: a bulk transfer then moves several TLS
/// records (16 KiB of plaintext each) per read and per write.
const MIN_BUF: usize = 4 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// Copies `a` → `b` and `b` → `a` until both directions have reached EOF.
///
/// `a` is the downstream side (the client that connected to us) and `b` the
/// upstream side: errors name the side whose read or write failed. Returns
/// the bytes copied `(a → b, b → a)`. When no byte moves in either direction
/// for `idle_timeout`, returns an [`ErrorKind::IdleTimeout`] error (side
/// internal: our timer, nobody's fault); the streams are closed by dropping
/// them in every case.
pub async fn splice<A, B>(
    mut a: A,
    mut b: B,
    idle_timeout: Duration,
) -> Result<(u64, u64), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Direction::new(Side::Downstream, Side::Upstream);
    let mut b_to_a = Direction::new(Side::Upstream, Side::Downstream);
    let mut last_activity = Instant::now();
    let mut idle = Box::pin(tokio::time::sleep_until(last_activity + idle_timeout));

    poll_fn(|cx| {
        let mut progressed = false;
        let ab = a_to_b.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), &mut progressed);
        let ba = b_to_a.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut a), &mut progressed);
        if let Poll::Ready(Err(e)) = ab {
            return Poll::Ready(Err(e));
        }
        if let Poll::Ready(Err(e)) = ba {
            return Poll::Ready(Err(e));
        }
        if ab.is_ready() && ba.is_ready() {
            return Poll::Ready(Ok((a_to_b.copied, b_to_a.copied)));
        }
        if progressed {
            // Only remember the time here; the timer is re-armed lazily when
            // it fires, so busy connections don't reset a timer per chunk.
            last_activity = Instant::now();
        }
        poll_idle(
            cx,
            idle.as_mut(),
            last_activity,
            idle_timeout,
            &a_to_b,
            &b_to_a,
        )
    })
    .await
}

fn poll_idle(
    cx: &mut Context<'_>,
    mut idle: Pin<&mut Sleep>,
    last_activity: Instant,
    idle_timeout: Duration,
    a_to_b: &Direction,
    b_to_a: &Direction,
) -> Poll<Result<(u64, u64), ProxyError>> {
    loop {
        ready!(idle.as_mut().poll(cx));
        let deadline = last_activity + idle_timeout;
        if deadline <= Instant::now() {
            return Poll::Ready(Err(ProxyError::internal(
                ErrorKind::IdleTimeout,
                format!(
                    "no bytes moved for {idle_timeout:?} ({} bytes sent upstream, {} bytes sent downstream)",
                    a_to_b.copied, b_to_a.copied
                ),
            )));
        }
        idle.as_mut().reset(deadline);
    }
}

/// One direction of the splice: reads from one stream into its buffer and
/// writes the buffer out to the other.
struct Direction {
    buf: Box<[u8]>,
    /// Next byte of `buf` to write.
    pos: usize,
    /// End of the valid bytes in `buf`.
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    copied: u64,
    reader: Side,
    writer: Side,
}

impl Direction {
    fn new(reader: Side, writer: Side) -> Self {
        Direction {
            buf: vec![0; MIN_BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            copied: 0,
            reader,
            writer,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        progressed: &mut bool,
    ) -> Poll<Result<(), ProxyError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                if self.cap == self.buf.len() && self.buf.len() < MAX_BUF {
                    // The last read filled the buffer: data is flowing, read more at once.
                    self.buf = vec![0; self.buf.len() * 2].into_boxed_slice();
                    self.pos = 0;
                    self.cap = 0;
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            *progressed = true;
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(self.err(self.reader, "read", &e)));
                    }
                    Poll::Pending => {
                        // Nothing more to read right now: push out what the
                        // writer may be holding before we sleep.
                        if self.need_flush {
                            match w.as_mut().poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.need_flush = false,
                                Poll::Ready(Err(e)) => {
                                    return Poll::Ready(Err(self.err(self.writer, "flush", &e)));
                                }
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.cap {
                let n = match w.as_mut().poll_write(cx, &self.buf[self.pos..self.cap]) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(self.err(self.writer, "write", &e)));
                    }
                    Poll::Pending => return Poll::Pending,
                };
                if n == 0 {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "wrote zero bytes");
                    return Poll::Ready(Err(self.err(self.writer, "write", &e)));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
                *progressed = true;
            }

            if self.pos == self.cap && self.read_done {
                // EOF from the reader: pass the half-close on. A peer that
                // already went away fails the shutdown; that is not an error
                // of the splice (the other direction reports real failures).
                if let Err(e) = ready!(w.as_mut().poll_shutdown(cx)) {
                    tracing::trace!(side = %self.writer, error = %e, "shutdown after eof failed");
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn err(&self, side: Side, op: &str, e: &io::Error) -> ProxyError {
        let kind = match e.kind() {
            io::ErrorKind::InvalidData => ErrorKind::Protocol,
            _ => ErrorKind::Io,
        };
        ProxyError::new(side, kind, format!("{op}: {e}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn buffers_start_small_and_grow_while_data_flows() {
        let mut d = Direction::new(Side::Downstream, Side::Upstream);
        assert_eq!(
            d.buf.len(),
            MIN_BUF,
            "an idle connection holds only the small buffer"
        );
        let mut reader = tokio::io::repeat(7).take(1 << 20);
        let mut writer = tokio::io::sink();
        let mut progressed = false;
        std::future::poll_fn(|cx| {
            d.poll_copy(
                cx,
                Pin::new(&mut reader),
                Pin::new(&mut writer),
                &mut progressed,
            )
        })
        .await
        .unwrap();
        assert_eq!(d.copied, 1 << 20);
        assert_eq!(
            d.buf.len(),
            MAX_BUF,
            "a bulk flow reads {MAX_BUF} bytes at a time"
        );
    }

    /// Echo server on a real socket: replies with everything it reads, then
    /// closes after the client's half-close.
    async fn echo_server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn bytes_both_ways_and_half_close_over_tcp() {
        let backend = echo_server().await;
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (down, _) = front.accept().await.unwrap();
            let up = TcpStream::connect(backend).await.unwrap();
            splice(down, up, Duration::from_secs(5)).await
        });

        let mut client = TcpStream::connect(front_addr).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.unwrap();
        // Half-close: we are done sending but must still get the echo.
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);

        let (up, down) = proxy.await.unwrap().unwrap();
        assert_eq!(up, payload.len() as u64);
        assert_eq!(down, payload.len() as u64);
    }

    #[tokio::test]
    async fn half_close_reply_after_request_end() {
        // The upstream answers only once it sees the request's EOF.
        let (client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(proxy_down, proxy_up, Duration::from_secs(5)));

        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"request").await.unwrap();
        cw.shutdown().await.unwrap();

        let mut req = Vec::new();
        server.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        server.write_all(b"reply after eof").await.unwrap();
        server.shutdown().await.unwrap();

        let mut reply = Vec::new();
        cr.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after eof");
        assert_eq!(task.await.unwrap().unwrap(), (7, 15));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes_both() {
        let (mut client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let started = Instant::now();
        let task = tokio::spawn(splice(proxy_down, proxy_up, Duration::from_secs(30)));

        // Activity at 20s pushes the deadline to 50s.
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();

        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::IdleTimeout);
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(50), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(51), "{elapsed:?}");

        // Both ends see the close.
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn upstream_reset_is_named_upstream() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // Closing with unread data in the receive buffer makes the
            // kernel answer with RST instead of FIN.
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(s);
        });
        let up = TcpStream::connect(addr).await.unwrap();
        let (mut client, down) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(down, up, Duration::from_secs(5)));
        client.write_all(b"hello").await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.side, Side::Upstream, "{err}");
        assert_eq!(err.kind, ErrorKind::Io, "{err}");
    }
}
