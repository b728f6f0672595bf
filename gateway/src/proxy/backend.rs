//! The backends of one exported service and how ingress picks one: round
//! robin over the configured `host:port` list (a lock-free counter), skipping
//! backends whose connect just failed. A failed backend is marked dead for
//! [`BACKEND_DEAD_FOR`] (an atomic timestamp, no lock) so the connections
//! that follow don't each pay its connect timeout; when every backend is
//! marked dead they are tried anyway, because a dead mark is a guess and
//! refusing outright would turn one blip into an outage. Names are resolved on every attempt
//! through [`crate::dns::resolver::resolve`] (which caches by TTL), so a
//! backend that moves is followed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::{ErrorKind, ProxyError};
use crate::config::HostPort;
use crate::config::defaults::BACKEND_DEAD_FOR;
use crate::dns::resolver::{self, ConnectError};

/// The backends of one service with their round-robin cursor and dead marks.
#[derive(Debug)]
pub struct Backends {
    targets: Box<[Target]>,
    next: AtomicUsize,
    /// Origin of the millisecond timestamps in `Target::dead_until`.
    epoch: Instant,
}

#[derive(Debug)]
struct Target {
    addr: HostPort,
    /// Milliseconds since `epoch` until which the backend is skipped; 0 = alive.
    dead_until: AtomicU64,
}

/// Why one backend could not be used, for the error message.
enum Failure {
    Timeout,
    Failed(String),
}

impl Backends {
    pub fn new(backends: &[HostPort]) -> Self {
        Backends {
            targets: backends
                .iter()
                .map(|addr| Target {
                    addr: addr.clone(),
                    dead_until: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// The backends currently marked dead (their last connect failed less
    /// than [`BACKEND_DEAD_FOR`] ago).
    #[cfg(test)]
    fn dead(&self) -> Vec<&HostPort> {
        let now = self.now_ms();
        self.targets
            .iter()
            .filter(|t| t.is_dead(now))
            .map(|t| &t.addr)
            .collect()
    }

    /// Connects to the next backend in round-robin order, skipping backends
    /// marked dead and moving on past any whose connect fails; each backend
    /// attempt (resolution plus connect to each of its addresses) is bounded
    /// by `connect_timeout`. Fails, naming every backend tried, only when
    /// none accepts.
    pub async fn connect(
        &self,
        connect_timeout: Duration,
    ) -> Result<(TcpStream, HostPort), ProxyError> {
        let n = self.targets.len();
        if n == 0 {
            return Err(ProxyError::upstream(
                ErrorKind::NoRoute,
                "no backends configured",
            ));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let order = (0..n).map(|i| (start + i) % n);
        // Live ones first, in round-robin order, then the ones marked dead.
        let (live, dead): (Vec<usize>, Vec<usize>) =
            order.partition(|&i| !self.targets[i].is_dead(now));

        let mut failures: Vec<(usize, Failure)> = Vec::new();
        for i in live.into_iter().chain(dead) {
            let target = &self.targets[i];
            match tokio::time::timeout(connect_timeout, connect_one(&target.addr)).await {
                Ok(Ok(stream)) => {
                    target.dead_until.store(0, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, target.addr.clone()));
                }
                Ok(Err(reason)) => failures.push((i, Failure::Failed(reason))),
                Err(_) => failures.push((i, Failure::Timeout)),
            }
            let until = self
                .now_ms()
                .saturating_add(millis(BACKEND_DEAD_FOR))
                .max(1);
            target.dead_until.store(until, Ordering::Relaxed);
            tracing::debug!(backend = %target.addr, "backend connect failed; skipping it for {BACKEND_DEAD_FOR:?}");
        }

        let all_timeouts = failures.iter().all(|(_, f)| matches!(f, Failure::Timeout));
        let mut message = String::from("no backend accepted the connection: ");
        for (k, (i, failure)) in failures.iter().enumerate() {
            if k > 0 {
                message.push_str(", ");
            }
            let addr = &self.targets[*i].addr;
            let _ = match failure {
                Failure::Timeout => write!(message, "{addr} (timed out after {connect_timeout:?})"),
                Failure::Failed(reason) => write!(message, "{addr} ({reason})"),
            };
        }
        let kind = if all_timeouts {
            ErrorKind::ConnectTimeout
        } else {
            ErrorKind::ConnectFailed
        };
        Err(ProxyError::upstream(kind, message))
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }
}

/// The connections the HTTP/1.1 client of an export opens go through the
/// same round robin and dead marks as its spliced TCP connections.
impl elsinore_transport::h1::client::Connect for Backends {
    fn connect(&self, timeout: Duration) -> elsinore_transport::h1::client::Connecting<'_> {
        Box::pin(async move {
            let (io, addr) = Backends::connect(self, timeout).await?;
            Ok((io, addr.to_string()))
        })
    }
}

impl Target {
    fn is_dead(&self, now_ms: u64) -> bool {
        let until = self.dead_until.load(Ordering::Relaxed);
        until != 0 && now_ms < until
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Resolves one backend and connects to the first of its addresses that
/// accepts.
async fn connect_one(addr: &HostPort) -> Result<TcpStream, String> {
    resolver::connect(&addr.host, addr.port, None)
        .await
        .map_err(|e| match e {
            ConnectError::Resolve(e) => format!("resolving {}: {e}", addr.host),
            ConnectError::Connect(sa, e) => format!("{sa}: {e}"),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn hp(addr: SocketAddr) -> HostPort {
        HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A port on which nothing listens: bind, note it, close.
    async fn dead_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// A listener that writes `tag` to every connection.
    async fn live(tag: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let _ = s.write_all(tag).await;
            }
        });
        addr
    }

    async fn tag_of(mut s: TcpStream) -> Vec<u8> {
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).await.unwrap();
        buf.to_vec()
    }

    #[tokio::test]
    async fn round_robin_over_live_backends() {
        let _limit = crate::test_support::limit();
        let a = live(b"a").await;
        let b = live(b"b").await;
        let backends = Backends::new(&[hp(a), hp(b)]);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (s, _) = backends.connect(Duration::from_secs(1)).await.unwrap();
            seen.push(tag_of(s).await);
        }
        assert_eq!(
            seen,
            vec![b"a".to_vec(), b"b".to_vec(), b"a".to_vec(), b"b".to_vec()]
        );
    }

    #[tokio::test]
    async fn dead_backend_is_skipped_and_marked() {
        let _limit = crate::test_support::limit();
        let dead = dead_port().await;
        let alive = live(b"x").await;
        let backends = Backends::new(&[hp(dead), hp(alive)]);
        for _ in 0..4 {
            let (s, chosen) = backends.connect(Duration::from_secs(1)).await.unwrap();
            assert_eq!(chosen, hp(alive));
            assert_eq!(tag_of(s).await, b"x");
        }
        assert_eq!(backends.dead(), vec![&hp(dead)]);
    }

    #[tokio::test]
    async fn all_dead_names_every_backend() {
        let _limit = crate::test_support::limit();
        let d1 = dead_port().await;
        let d2 = dead_port().await;
        let backends = Backends::new(&[hp(d1), hp(d2)]);
        let err = backends.connect(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.side, super::super::error::Side::Upstream);
        assert_eq!(err.kind, ErrorKind::ConnectFailed);
        assert_eq!(err.status(), http::StatusCode::BAD_GATEWAY);
        assert!(err.message.contains(&d1.to_string()), "{err}");
        assert!(err.message.contains(&d2.to_string()), "{err}");
        assert!(err.retry_safe);
    }

    #[tokio::test]
    async fn backends_marked_dead_are_still_tried_when_nothing_else_is_left() {
        let _limit = crate::test_support::limit();
        // Mark the only backend dead, then bring it up on the same port.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let backends = Backends::new(&[hp(addr)]);
        backends.connect(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(backends.dead().len(), 1);
        let l = TcpListener::bind(addr).await.unwrap();
        let (res, _) = tokio::join!(backends.connect(Duration::from_secs(1)), l.accept());
        res.unwrap();
        assert!(
            backends.dead().is_empty(),
            "a successful connect clears the mark"
        );
    }

    #[tokio::test]
    async fn names_are_resolved() {
        let _limit = crate::test_support::limit();
        let alive = live(b"n").await;
        let backends = Backends::new(&[HostPort {
            host: "localhost".to_owned(),
            port: alive.port(),
        }]);
        // localhost may resolve to ::1 first; the IPv4 address must be tried too.
        let (s, _) = backends.connect(Duration::from_secs(2)).await.unwrap();
        assert_eq!(tag_of(s).await, b"n");
    }

    #[tokio::test]
    async fn no_backends_is_no_route() {
        let _limit = crate::test_support::limit();
        let err = Backends::new(&[])
            .connect(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NoRoute);
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
}
