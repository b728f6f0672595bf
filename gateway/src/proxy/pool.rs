//! The egress pool of HTTP/2 connections to remote gateways. Requests of
//! local apps for imported HTTP services are multiplexed over a handful of
//! mTLS HTTP/2 connections per (endpoint, SNI, peer, expected SANs) instead
//! of one TLS connection per request: a request leases the least loaded live
//! connection, and a new connection is dialed only when there is none, or
//! when every connection carries many streams and the key is below its cap.
//! Dials for one key are serialized, so a burst of requests against an empty
//! pool opens one connection, not one per request; a dial failure is shared
//! with the requests that waited on it instead of being retried by each.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use elsinore_transport::h2::client::Sender;
use tokio::time::Instant;

use super::error::ProxyError;

/// What a pooled connection is for: computed with the route table
/// ([`UpstreamKey`]), so equal keys mean equal endpoint, SNI and expected
/// identity.
pub use crate::catalog::routes::UpstreamKey as PoolKey;

/// Limits of the pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Connections per key at most.
    pub max_per_key: usize,
    /// Streams on a connection before another connection is worth opening
    /// (below the cap; at the cap, streams queue on the least loaded one).
    pub streams_per_conn: usize,
    /// A connection with no stream for this long is dropped on the next
    /// lease of its key.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_per_key: 4,
            streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// A pool of HTTP/2 client connections ([`Sender`]s).
pub struct H2Pool {
    keys: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    limits: PoolLimits,
}

struct KeyPool {
    state: Mutex<KeyState>,
    /// Held while dialing, so dials of one key never race.
    dial: tokio::sync::Mutex<()>,
}

struct KeyState {
    conns: Vec<Conn>,
    /// The last dial failure, handed to requests that were already waiting
    /// for that dial.
    failed: Option<(Instant, ProxyError)>,
}

struct Conn {
    sender: Sender,
    in_flight: Arc<AtomicUsize>,
    last_used: Instant,
}

/// One key's connections, looked up once (see [`H2Pool::handle`]). While a
/// handle lives, its key stays in the pool.
pub struct PoolHandle {
    key: PoolKey,
    kp: Arc<KeyPool>,
}

impl PoolHandle {
    pub fn key(&self) -> &PoolKey {
        &self.key
    }
}

/// One leased stream slot on a pooled connection. Keep the lease (or its
/// [`InFlight`] guard) alive until the response body is finished: that is
/// what the pool counts as load.
pub struct Lease {
    pub sender: Sender,
    pub in_flight: InFlight,
}

/// Counts one stream on a pooled connection while alive.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data
    // (every critical section is a few field updates), so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl H2Pool {
    pub fn new(limits: PoolLimits) -> Self {
        H2Pool {
            keys: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Live connections across all keys (closed ones not yet pruned excluded).
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        let keys: Vec<Arc<KeyPool>> = lock(&self.keys).values().cloned().collect();
        keys.iter()
            .map(|k| {
                lock(&k.state)
                    .conns
                    .iter()
                    .filter(|c| !c.sender.is_closed())
                    .count()
            })
            .sum()
    }

    fn key_pool(&self, key: &PoolKey) -> Arc<KeyPool> {
        let mut keys = lock(&self.keys);
        if let Some(k) = keys.get(key) {
            return k.clone();
        }
        // Forget keys that hold nothing and that nobody is using, so the map
        // tracks current routes rather than every route ever seen.
        keys.retain(|_, k| Arc::strong_count(k) > 1 || !lock(&k.state).conns.is_empty());
        let k = Arc::new(KeyPool {
            state: Mutex::new(KeyState {
                conns: Vec::new(),
                failed: None,
            }),
            dial: tokio::sync::Mutex::new(()),
        });
        keys.insert(key.clone(), k.clone());
        k
    }

    /// The connections of `key`, to lease from without looking the key up
    /// again: what a route keeps so that a request costs no key hashing,
    /// allocation or map lock.
    pub fn handle(&self, key: PoolKey) -> PoolHandle {
        let kp = self.key_pool(&key);
        PoolHandle { key, kp }
    }

    /// Leases a stream slot on `handle`'s connections, dialing a new one
    /// with `dial` when needed. A dial error is returned as is (and to the
    /// requests that waited for that same dial).
    pub async fn get<F, Fut>(&self, handle: &PoolHandle, dial: F) -> Result<Lease, ProxyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Sender, ProxyError>>,
    {
        let kp = Arc::clone(&handle.kp);
        let waited_since = Instant::now();
        let guard = match self.pick(&kp) {
            Pick::Use(lease) => return Ok(lease),
            Pick::Busy(lease) => match kp.dial.try_lock() {
                Ok(g) => {
                    // Dial a new connection only if the one we'd share is still busy.
                    drop(lease);
                    g
                }
                // Someone else is already adding a connection: share a busy
                // one rather than wait for it.
                Err(_) => return Ok(lease),
            },
            Pick::None => kp.dial.lock().await,
        };
        // Whoever held the dial lock before us may have added a connection,
        // or failed to.
        match self.pick(&kp) {
            Pick::Use(lease) => return Ok(lease),
            Pick::Busy(lease) if lock(&kp.state).conns.len() >= self.limits.max_per_key => {
                return Ok(lease);
            }
            Pick::Busy(_) => {}
            Pick::None => {
                if let Some((at, err)) = &lock(&kp.state).failed
                    && *at >= waited_since
                {
                    return Err(err.clone());
                }
            }
        }
        let result = dial().await;
        let mut state = lock(&kp.state);
        match result {
            Ok(sender) => {
                state.failed = None;
                let in_flight = Arc::new(AtomicUsize::new(1));
                state.conns.push(Conn {
                    sender: sender.clone(),
                    in_flight: in_flight.clone(),
                    last_used: Instant::now(),
                });
                drop(guard);
                Ok(Lease {
                    sender,
                    in_flight: InFlight(in_flight),
                })
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.clone()));
                drop(guard);
                Err(e)
            }
        }
    }

    /// Prunes closed and idle connections and picks the least loaded one.
    fn pick(&self, kp: &KeyPool) -> Pick {
        let mut state = lock(&kp.state);
        let now = Instant::now();
        let idle = self.limits.idle_timeout;
        state.conns.retain(|c| {
            !c.sender.is_closed()
                && (c.in_flight.load(Ordering::Relaxed) > 0 || now - c.last_used < idle)
        });
        let full = state.conns.len() >= self.limits.max_per_key;
        let Some(best) = state
            .conns
            .iter_mut()
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
        else {
            return Pick::None;
        };
        let load = best.in_flight.fetch_add(1, Ordering::Relaxed);
        best.last_used = now;
        let lease = Lease {
            sender: best.sender.clone(),
            in_flight: InFlight(best.in_flight.clone()),
        };
        if load < self.limits.streams_per_conn || full {
            Pick::Use(lease)
        } else {
            Pick::Busy(lease)
        }
    }
}

enum Pick {
    /// A connection with room (or the key is at its cap).
    Use(Lease),
    /// Every connection is busy and the key may grow: this is the fallback.
    Busy(Lease),
    None,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::proxy::error::ErrorKind;
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::AtomicU64;
    use tokio::net::{TcpListener, TcpStream};

    type Body = Empty<Bytes>;

    async fn dial(addr: std::net::SocketAddr) -> Result<Sender, ProxyError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ProxyError::upstream(ErrorKind::ConnectFailed, e.to_string()))?;
        elsinore_transport::h2::client::handshake(tcp, tracing::Span::none())
            .await
            .map_err(|e| ProxyError::upstream(ErrorKind::Protocol, e.to_string()))
    }

    fn key(addr: std::net::SocketAddr) -> PoolKey {
        PoolKey {
            endpoint: addr.to_string(),
            sni: "s".into(),
            remote: Arc::new(crate::catalog::routes::RemoteIdentity::new("p", &[], "s")),
        }
    }

    /// A plaintext HTTP/2 server on a real socket (the pool itself does not
    /// care about TLS; egress tests cover the mTLS dial) that holds every
    /// response until `total` requests
    /// have arrived, so that none of them ends (and frees its stream slot)
    /// before the pool has placed them all; counts accepts.
    async fn h2_server_holding(total: usize) -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let (arrived, _) = tokio::sync::watch::channel(0usize);
        let arrived = Arc::new(arrived);
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let arrived = arrived.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let arrived = arrived.clone();
                        async move {
                            arrived.send_modify(|n| *n += 1);
                            let mut all = arrived.subscribe();
                            let _ = all.wait_for(|n| *n >= total).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Body::new()))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    /// `requests` concurrent requests on an empty pool, all in flight at
    /// once; returns the connections opened.
    async fn burst(requests: usize, limits: PoolLimits) -> u64 {
        let (addr, accepted) = h2_server_holding(requests).await;
        let pool = Arc::new(H2Pool::new(limits));
        let mut tasks = Vec::new();
        for _ in 0..requests {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let lease = pool
                    .get(&pool.handle(key(addr)), || dial(addr))
                    .await
                    .unwrap();
                let req = hyper::Request::builder()
                    .uri(format!("http://{addr}/"))
                    .body(Body::new())
                    .unwrap();
                let Ok(resp) = lease.sender.send(req).await else {
                    panic!("request failed")
                };
                assert_eq!(resp.status(), 200);
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            for t in tasks {
                t.await.unwrap();
            }
        })
        .await
        .expect("every request answered within 30s");
        let n = accepted.load(Ordering::SeqCst);
        assert_eq!(pool.connections() as u64, n);
        n
    }

    /// The rule (docs/data-plane.md): a connection is dialed only when there
    /// is none, or every one carries `streams_per_conn` streams and the key
    /// is below `max_per_key`. With every request in flight at once, that is
    /// exactly `ceil(requests / streams_per_conn)` connections, capped.
    #[tokio::test]
    async fn burst_on_empty_pool_opens_exactly_the_connections_the_rule_allows() {
        let _limit = crate::test_support::limit();
        let limits = PoolLimits {
            max_per_key: 4,
            streams_per_conn: 50,
            idle_timeout: Duration::from_secs(60),
        };
        for (requests, connections) in [(1, 1), (50, 1), (51, 2), (120, 3), (300, 4)] {
            assert_eq!(
                burst(requests, limits).await,
                connections,
                "connections for {requests} requests at 50 streams each, at most 4"
            );
        }
    }

    // Paused time: the clock advances only when every task waits, so the
    // dial's sleep below ends only after the other 19 requests have queued
    // behind its dial lock (not after 50 ms of hoping they did).
    #[tokio::test(start_paused = true)]
    async fn waiters_share_a_dial_failure() {
        let _limit = crate::test_support::limit();
        // A closed port: every dial fails at once.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(H2Pool::new(PoolLimits::default()));
        let dials = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let pool = pool.clone();
            let dials = dials.clone();
            tasks.push(tokio::spawn(async move {
                pool.get(&pool.handle(key(addr)), || async move {
                    dials.fetch_add(1, Ordering::SeqCst);
                    // Paused time (see above): waits for the other requests
                    // to queue behind this dial, whatever the load.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    dial(addr).await
                })
                .await
                .err()
                .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().kind, ErrorKind::ConnectFailed);
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
    }
}
