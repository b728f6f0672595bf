//! The TCP splice: copies bytes both ways between two streams until both
//! directions are finished, an error occurs, or nothing moved for the idle
//! timeout. Half-close is carried across: when one side ends its writes (EOF
//! on read), the write half of the other side is shut down and the opposite
//! direction keeps flowing, so request/response protocols that signal the end
//! of the request with a half-close keep working. Reads go through one
//! scratch buffer per thread, so the thousands of mostly idle connections a
//! gateway holds own no buffer; a direction keeps bytes only while its writer
//! lags behind. While data flows, many TLS records are read before each
//! write, so a bulk transfer costs one read and one write per 512 KiB
//! (measured: a quarter less CPU per GB than at 64 KiB; each syscall wakes
//! the peer).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::tls::{RelayError, Relayed, TlsStream};

/// Which stream of a splice failed: the first one given (the downstream
/// client that connected to us) or the second (upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        })
    }
}

/// Why a splice ended before both directions were finished.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// No byte moved in either direction for the idle timeout: our timer,
    /// nobody's fault.
    #[error(
        "no bytes moved for {idle_timeout:?} ({sent_upstream} bytes sent upstream, {sent_downstream} bytes sent downstream)"
    )]
    IdleTimeout {
        idle_timeout: Duration,
        sent_upstream: u64,
        sent_downstream: u64,
    },
    /// A read, write or flush on `side` failed (`op` says which). An
    /// [`io::ErrorKind::InvalidData`] error is the peer breaking the
    /// protocol (a TLS record that does not open), any other an I/O
    /// failure.
    #[error("{op}: {error}")]
    Io {
        side: Side,
        op: &'static str,
        error: io::Error,
    },
}

/// Copies `a` → `b` and `b` → `a` until both directions have reached EOF.
///
/// `a` is the downstream side (the client that connected to us) and `b` the
/// upstream side: errors name the side whose read or write failed. Returns
/// the bytes copied `(a → b, b → a)`. When no byte moves in either direction
/// for `idle_timeout`, returns [`SpliceError::IdleTimeout`]; the streams
/// are closed by dropping them in every case.
pub async fn splice<A, B>(
    mut a: A,
    mut b: B,
    idle_timeout: Duration,
) -> Result<(u64, u64), SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    run(idle_timeout, |cx, a_to_b, b_to_a, progressed| {
        (
            a_to_b.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), progressed),
            b_to_a.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut a), progressed),
        )
    })
    .await
}

/// [`splice`] from a plain TCP client to a TLS peer (egress): the client's
/// bytes are read straight into TLS records and sealed where they land
/// ([`TlsStream::poll_relay_from`]), with no copy between the two sockets'
/// buffers. The peer's bytes come back as in [`splice`].
pub async fn splice_to_tls(
    mut a: TcpStream,
    mut b: Box<TlsStream>,
    idle_timeout: Duration,
) -> Result<(u64, u64), SpliceError> {
    run(idle_timeout, |cx, a_to_b, b_to_a, progressed| {
        (
            a_to_b.poll_relay(cx, &mut a, &mut b, progressed),
            b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut a), progressed),
        )
    })
    .await
}

/// [`splice`] from a TLS peer to a plain TCP backend (ingress): the
/// backend's bytes are read straight into TLS records and sealed where they
/// land ([`TlsStream::poll_relay_from`]), as [`splice_to_tls`] does for the
/// egress's client; the peer's bytes go to the backend as in [`splice`].
pub async fn splice_from_tls(
    mut a: Box<TlsStream>,
    mut b: TcpStream,
    idle_timeout: Duration,
) -> Result<(u64, u64), SpliceError> {
    run(idle_timeout, |cx, a_to_b, b_to_a, progressed| {
        (
            a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut b), progressed),
            b_to_a.poll_relay(cx, &mut b, &mut a, progressed),
        )
    })
    .await
}

type Step = Poll<Result<(), SpliceError>>;

/// Polls both directions until both are done, one fails, or nothing moved
/// for `idle_timeout`.
async fn run(
    idle_timeout: Duration,
    mut poll_both: impl FnMut(
        &mut Context<'_>,
        &mut Direction,
        &mut Direction,
        &mut bool,
    ) -> (Step, Step),
) -> Result<(u64, u64), SpliceError> {
    let mut a_to_b = Direction::new(Side::Downstream, Side::Upstream);
    let mut b_to_a = Direction::new(Side::Upstream, Side::Downstream);
    let mut last_activity = Instant::now();
    let mut idle = Box::pin(tokio::time::sleep_until(last_activity + idle_timeout));

    poll_fn(|cx| {
        let mut progressed = false;
        let (ab, ba) = poll_both(cx, &mut a_to_b, &mut b_to_a, &mut progressed);
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
) -> Poll<Result<(u64, u64), SpliceError>> {
    loop {
        ready!(idle.as_mut().poll(cx));
        let deadline = last_activity + idle_timeout;
        if deadline <= Instant::now() {
            return Poll::Ready(Err(SpliceError::IdleTimeout {
                idle_timeout,
                sent_upstream: a_to_b.copied,
                sent_downstream: b_to_a.copied,
            }));
        }
        idle.as_mut().reset(deadline);
    }
}

/// Read buffer shared by every splice on a thread, borrowed only inside one
/// poll: an idle connection holds no buffer of its own.
const SCRATCH: usize = 512 * 1024;

/// Keep reading before writing while reads come back at least this large
/// (a full TLS record): data is flowing, and one write of several records
/// costs one syscall instead of one per record.
const KEEP_READING: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// One direction of the splice: reads from one stream into the thread's
/// scratch buffer and writes it out to the other. Only bytes the writer could
/// not take at once are kept, in `pending`, which is freed when written.
struct Direction {
    pending: Vec<u8>,
    /// Next byte of `pending` to write.
    pos: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    copied: u64,
    reader: Side,
    writer: Side,
}

/// What one round of reading produced.
enum Read {
    /// Bytes in the scratch buffer, and whether the reader returned
    /// `Pending` (so its waker is registered).
    Data(usize, bool),
    Err(io::Error),
}

impl Direction {
    fn new(reader: Side, writer: Side) -> Self {
        Direction {
            pending: Vec::new(),
            pos: 0,
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
    ) -> Poll<Result<(), SpliceError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Bytes the writer refused last time go first.
            while self.pos < self.pending.len() {
                let n = match w.as_mut().poll_write(cx, &self.pending[self.pos..]) {
                    Poll::Ready(Ok(0)) => {
                        let e = io::Error::new(io::ErrorKind::WriteZero, "wrote zero bytes");
                        return Poll::Ready(Err(failed(self.writer, "write", e)));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(failed(self.writer, "write", e)));
                    }
                    Poll::Pending => return Poll::Pending,
                };
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
                *progressed = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.pos = 0;
            }

            if self.read_done {
                // EOF from the reader: pass the half-close on. A peer that
                // already went away fails the shutdown; that is not an error
                // of the splice (the other direction reports real failures).
                if let Err(e) = ready!(w.as_mut().poll_shutdown(cx)) {
                    tracing::trace!(side = %self.writer, error = %e, "shutdown after eof failed");
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }

            let step = SCRATCH_BUF.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => {
                    self.read_and_write(cx, r.as_mut(), w.as_mut(), &mut scratch, progressed)
                }
                // Never nested in practice (a splice does not poll another
                // splice); fall back to a buffer of our own rather than fail.
                Err(_) => {
                    let mut own = vec![0; KEEP_READING];
                    self.read_and_write(cx, r.as_mut(), w.as_mut(), &mut own, progressed)
                }
            });
            match step {
                Poll::Ready(Ok(true)) => continue,
                Poll::Ready(Ok(false)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            // The reader is registered for wake-up: push out what the writer
            // may be holding before we sleep.
            if self.need_flush {
                match w.as_mut().poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.need_flush = false,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(failed(self.writer, "flush", e)));
                    }
                    Poll::Pending => {}
                }
            }
            return Poll::Pending;
        }
    }

    /// As [`Direction::poll_copy`], reading `r` straight into `w`'s records
    /// while it can ([`TlsStream::poll_relay_from`]); bytes the copy path
    /// kept, EOF and a key that must be replaced first go through
    /// `poll_copy`.
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut TcpStream,
        w: &mut TlsStream,
        progressed: &mut bool,
    ) -> Poll<Result<(), SpliceError>> {
        while !self.done && !self.read_done && self.pos >= self.pending.len() {
            match w.poll_relay_from(cx, r) {
                Poll::Ready(Ok(Relayed::Moved(n))) => {
                    self.copied += n as u64;
                    *progressed = true;
                }
                Poll::Ready(Ok(Relayed::Eof)) => self.read_done = true,
                Poll::Ready(Ok(Relayed::Unavailable)) => break,
                Poll::Ready(Err(RelayError::Read(e))) => {
                    return Poll::Ready(Err(failed(self.reader, "read", e)));
                }
                Poll::Ready(Err(RelayError::Write(e))) => {
                    return Poll::Ready(Err(failed(self.writer, "write", e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.poll_copy(cx, Pin::new(r), Pin::new(w), progressed)
    }

    /// Reads into `scratch` and writes what was read. `Ok(true)`: go round
    /// again; `Ok(false)`: the reader has nothing now (waker registered);
    /// `Pending`: the writer is full (its waker registered, the rest kept).
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        scratch: &mut [u8],
        progressed: &mut bool,
    ) -> Poll<Result<bool, SpliceError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let (filled, reader_pending) = match self.read_some(cx, r, scratch) {
            Read::Data(n, p) => (n, p),
            Read::Err(e) => return Poll::Ready(Err(failed(self.reader, "read", e))),
        };
        if filled == 0 {
            return Poll::Ready(Ok(!reader_pending));
        }
        *progressed = true;
        let mut pos = 0;
        while pos < filled {
            match w.as_mut().poll_write(cx, &scratch[pos..filled]) {
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "wrote zero bytes");
                    return Poll::Ready(Err(failed(self.writer, "write", e)));
                }
                Poll::Ready(Ok(n)) => {
                    pos += n;
                    self.copied += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(failed(self.writer, "write", e)));
                }
                Poll::Pending => {
                    self.pending = scratch[pos..filled].to_vec();
                    self.pos = 0;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(!reader_pending))
    }

    /// Fills `scratch` from the reader while reads come back full-sized.
    fn read_some<R>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, scratch: &mut [u8]) -> Read
    where
        R: AsyncRead + ?Sized,
    {
        let mut filled = 0;
        loop {
            let mut rb = ReadBuf::new(&mut scratch[filled..]);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.read_done = true;
                        return Read::Data(filled, false);
                    }
                    filled += n;
                    if filled == scratch.len() || n < KEEP_READING {
                        return Read::Data(filled, false);
                    }
                }
                // The stream is failing: what was read with it is lost too.
                Poll::Ready(Err(e)) => return Read::Err(e),
                Poll::Pending => return Read::Data(filled, true),
            }
        }
    }
}

fn failed(side: Side, op: &'static str, error: io::Error) -> SpliceError {
    SpliceError::Io { side, op, error }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A writer that takes at most `max` bytes per call and every other
    /// call is not ready, so the splice has to keep what it could not write.
    struct Slow {
        got: Vec<u8>,
        max: usize,
        calls: usize,
    }

    impl AsyncWrite for Slow {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn no_buffer_is_held_between_bursts_and_a_slow_writer_loses_nothing() {
        let _limit = crate::test_support::limit();
        let mut d = Direction::new(Side::Downstream, Side::Upstream);
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let mut reader = &payload[..];
        let mut writer = Slow {
            got: Vec::new(),
            max: 10_000,
            calls: 0,
        };
        let mut progressed = false;
        let mut max_held = 0;
        std::future::poll_fn(|cx| {
            let r = d.poll_copy(
                cx,
                Pin::new(&mut reader),
                Pin::new(&mut writer),
                &mut progressed,
            );
            max_held = max_held.max(d.pending.capacity());
            r
        })
        .await
        .unwrap();
        assert_eq!(writer.got, payload);
        assert_eq!(d.copied, payload.len() as u64);
        assert!(max_held > 0, "a lagging writer made the splice keep bytes");
        assert_eq!(d.pending.capacity(), 0, "nothing is held once written");
    }

    #[tokio::test]
    async fn an_idle_direction_owns_no_buffer() {
        let _limit = crate::test_support::limit();
        let (_client, mut down) = tokio::io::duplex(64);
        let mut sink = tokio::io::sink();
        let mut d = Direction::new(Side::Downstream, Side::Upstream);
        let mut progressed = false;
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(d.poll_copy(
                cx,
                Pin::new(&mut down),
                Pin::new(&mut sink),
                &mut progressed,
            ))
        })
        .await;
        assert!(polled.is_pending());
        assert_eq!(d.pending.capacity(), 0);
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
        let _limit = crate::test_support::limit();
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
        let _limit = crate::test_support::limit();
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
        let _limit = crate::test_support::limit();
        let (mut client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let started = Instant::now();
        let task = tokio::spawn(splice(proxy_down, proxy_up, Duration::from_secs(30)));

        // Activity at 20s pushes the deadline to 50s. (Paused time: this
        // sleep is time passing, not an ordering wait.)
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();

        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, SpliceError::IdleTimeout { .. }), "{err}");
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
        let _limit = crate::test_support::limit();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // Closing with unread data in the receive buffer makes the
            // kernel answer with RST instead of FIN: wait until data is
            // there (peek leaves it unread), then close.
            let mut first = [0u8; 1];
            s.peek(&mut first).await.unwrap();
            drop(s);
        });
        let up = TcpStream::connect(addr).await.unwrap();
        let (mut client, down) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(down, up, Duration::from_secs(5)));
        client.write_all(b"hello").await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        let SpliceError::Io { side, error, .. } = &err else {
            panic!("not an i/o error: {err}");
        };
        assert_eq!(*side, Side::Upstream, "{err}");
        assert_ne!(error.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// Over the record layer's direct path: a client spliced into one of
    /// our TLS connections reaches a rustls echo server whole while our
    /// side replaces its key several times (the direct path steps aside
    /// while a key must be replaced).
    #[tokio::test]
    async fn a_spliced_client_reaches_the_peer_across_key_updates() {
        use crate::tls::tests::pair;
        let _limit = crate::test_support::limit();
        let (server_config, client_config) = mtls_configs();

        // The peer: rustls, echoing until our close.
        let (c, s) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let server = tokio::spawn(async move {
            let tls = acceptor.accept(s).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            n
        });
        let name = rustls::pki_types::ServerName::try_from("svc.a.example").unwrap();
        let mut tls =
            crate::tls::connect(crate::tls::client_config((*client_config).clone()), name, c)
                .await
                .unwrap();
        tls.set_tx_limit(2 * crate::tls::RELAY_RECORDS as u64);

        let (app, src) = pair().await;
        let splice = tokio::spawn(splice_to_tls(src, Box::new(tls), Duration::from_secs(10)));
        let len = echoed_whole(app).await;
        let (sent, received) = splice.await.unwrap().unwrap();
        assert_eq!((sent, received), (len, len));
        assert_eq!(server.await.unwrap(), len);
    }

    /// The ingress's direction: a peer's bytes reach a TCP backend, and the
    /// backend's answer is read straight into our records, across several
    /// key replacements, whole and in order.
    #[tokio::test]
    async fn a_peer_spliced_to_a_backend_gets_its_answer_across_key_updates() {
        use crate::tls::tests::pair;
        let _limit = crate::test_support::limit();
        let (server_config, client_config) = mtls_configs();

        let backend = echo_server().await;
        let (c, s) = pair().await;
        let ingress = tokio::spawn(async move {
            let (mut tls, _) =
                crate::tls::accept(crate::tls::server_config((*server_config).clone()), s)
                    .await
                    .unwrap();
            tls.set_tx_limit(2 * crate::tls::RELAY_RECORDS as u64);
            let backend = TcpStream::connect(backend).await.unwrap();
            splice_from_tls(Box::new(tls), backend, Duration::from_secs(10)).await
        });
        // The peer: rustls.
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let name = rustls::pki_types::ServerName::try_from("svc.a.example").unwrap();
        let peer = connector.connect(name, c).await.unwrap();
        let len = echoed_whole(peer).await;
        let (up, down) = ingress.await.unwrap().unwrap();
        assert_eq!((up, down), (len, len));
    }

    /// The mTLS configs of the record layer's test PKI, without ALPN.
    fn mtls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let pki = crate::tls::tests::pki();
        let server = elsinore_certs::server_config(
            &pki.server,
            std::slice::from_ref(&pki.client_bundle),
            &[],
        )
        .unwrap();
        let client =
            elsinore_certs::client_config(&pki.client, &pki.server_bundle, None, &[]).unwrap();
        (server, client)
    }

    /// Writes 5 MiB with no two offsets alike (so a lost, repeated or
    /// reordered chunk shows) and a close, reads the echo to its end at the
    /// same time, and checks it came back whole. Returns the length.
    async fn echoed_whole<S: AsyncRead + AsyncWrite>(stream: S) -> u64 {
        let data: Vec<u8> = (0..5usize << 20)
            .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
            .collect();
        let (mut r, mut w) = tokio::io::split(stream);
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(write, r.read_to_end(&mut got));
        read.unwrap();
        assert!(got == data, "the echo differs");
        data.len() as u64
    }
}
