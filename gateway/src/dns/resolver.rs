//! Resolution of backend and peer addresses given as names. IP literals are
//! returned without a lookup; `localhost` (and names under it, RFC 6761) go
//! to the OS resolver, which reads `/etc/hosts` the way every other program
//! on the host does; everything else goes to one process-wide hickory
//! resolver built from `/etc/resolv.conf` (and `/etc/hosts`), whose cache
//! honours record TTLs. If the system configuration cannot be read, the OS
//! resolver (`getaddrinfo` via tokio) is used instead. This module resolves
//! only; it never serves (that is [`super::responder`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::TcpStream;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// The process-wide resolver, built on first use. A global because the
/// cache is only worth having if every caller shares it, and because the
/// call sites (backend and peer dialers) are leaf functions with no state to
/// carry one. `None` records that the system configuration was unreadable.
///
/// The resolver spawns its connection tasks on the runtime of the lookup
/// that opened them; the gateway has one runtime, so that is always alive.
static SYSTEM: OnceLock<Option<TokioResolver>> = OnceLock::new();

/// The longest a "no such name" answer is believed. A name server may say
/// a day (RFC 2308 lets the zone's SOA decide; the root zone's is a day):
/// a peer whose name is created after we first asked for it (a new
/// Service, a DNS record still propagating, a container network still
/// registering its peers) is then reached within seconds of existing, not
/// the next day or at a restart. A name that does not exist costs one
/// query per name in this time.
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(5);

/// What every resolver of the gateway does besides asking its servers.
fn options(opts: &mut ResolverOpts) {
    // Names in /etc/hosts must resolve as they do for the OS.
    opts.use_hosts_file = ResolveHosts::Always;
    opts.negative_max_ttl = Some(NEGATIVE_TTL_MAX);
}

fn system_resolver() -> Option<&'static TokioResolver> {
    SYSTEM
        .get_or_init(|| {
            let built = TokioResolver::builder_tokio().and_then(|mut builder| {
                options(builder.options_mut());
                builder.build()
            });
            match built {
                Ok(resolver) => Some(resolver),
                Err(error) => {
                    tracing::warn!(%error, "system DNS configuration unreadable; using the OS resolver");
                    None
                }
            }
        })
        .as_ref()
}

/// Why [`use_name_servers`] could not take effect.
#[derive(Debug, thiserror::Error)]
pub enum NameServersError {
    /// A lookup already built the resolver.
    #[error(
        "the resolver is already in use; name servers can only be chosen before the first lookup"
    )]
    InUse,
    #[error("no name servers given")]
    Empty,
    #[error("cannot build a resolver for name servers {servers}: {reason}")]
    Build { servers: String, reason: String },
}

/// Makes every later lookup of a name (other than `localhost`) ask
/// `servers` (UDP, then TCP, on each address's port) instead of the name
/// servers of `/etc/resolv.conf`; `/etc/hosts` is still read first. For a
/// process that embeds the gateway and must not use the host's DNS, and for
/// tests that serve their own names. Only possible before the first lookup.
pub fn use_name_servers(servers: &[SocketAddr]) -> Result<(), NameServersError> {
    if servers.is_empty() {
        return Err(NameServersError::Empty);
    }
    if SYSTEM.get().is_some() {
        return Err(NameServersError::InUse);
    }
    let name_servers = servers
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            ns
        })
        .collect();
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(name_servers),
        TokioRuntimeProvider::default(),
    );
    options(builder.options_mut());
    let resolver = builder.build().map_err(|e| NameServersError::Build {
        servers: servers
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        reason: e.to_string(),
    })?;
    SYSTEM
        .set(Some(resolver))
        .map_err(|_| NameServersError::InUse)
}

/// Resolves `host:port` to socket addresses. An IP literal (IPv6 with or
/// without brackets) is returned as is, without a lookup. A name that
/// resolves to nothing is an [`io::ErrorKind::NotFound`] error.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Some(ip) = ip_literal(host) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if is_localhost(host) {
        // getaddrinfo matches /etc/hosts entries only without the root dot.
        return lookup_os(host.trim_end_matches('.'), port).await;
    }
    match system_resolver() {
        Some(resolver) => resolve_with(resolver, host, port).await,
        None => lookup_os(host, port).await,
    }
}

/// Why [`connect`] has no connection. A step that took longer than the
/// timeout is an [`io::ErrorKind::TimedOut`] error.
#[derive(Debug)]
pub enum ConnectError {
    /// The name did not resolve.
    Resolve(io::Error),
    /// No address took the connection: the last one tried and its error.
    Connect(SocketAddr, io::Error),
}

impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> io::Error {
        match e {
            ConnectError::Resolve(e) | ConnectError::Connect(_, e) => e,
        }
    }
}

/// Resolves `host:port` and connects to the first address that takes the
/// connection, in the resolver's order. With a `timeout`, the lookup and
/// each address get that long.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Option<Duration>,
) -> Result<TcpStream, ConnectError> {
    let addrs = within(timeout, resolve(host, port))
        .await
        .map_err(ConnectError::Resolve)?;
    let mut last = None;
    for addr in addrs {
        match within(timeout, TcpStream::connect(addr)).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) => ConnectError::Connect(addr, e),
        None => ConnectError::Resolve(not_found(host)),
    })
}

async fn within<T>(
    timeout: Option<Duration>,
    step: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match timeout {
        None => step.await,
        Some(t) => tokio::time::timeout(t, step).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {t:?}"),
            ))
        }),
    }
}

fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host
            .len()
            .checked_sub(".localhost".len())
            .and_then(|at| host.get(at..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case(".localhost"))
}

async fn lookup_os(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(not_found(host));
    }
    Ok(addrs)
}

/// Resolves through `resolver`; separate from [`resolve`] so tests can point
/// a resolver at a loopback server instead of the system's.
async fn resolve_with(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> io::Result<Vec<SocketAddr>> {
    match resolver.lookup_ip(host).await {
        Ok(lookup) => {
            let addrs: Vec<SocketAddr> =
                lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            if addrs.is_empty() {
                return Err(not_found(host));
            }
            Ok(addrs)
        }
        Err(error) if error.is_no_records_found() => Err(not_found(host)),
        Err(error) => Err(io::Error::other(format!("cannot resolve {host}: {error}"))),
    }
}

fn not_found(host: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no address for {host}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::catalog::imports::resolve as resolve_imports;
    use crate::catalog::routes::{VipAllocator, VipTable};
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::net::{TcpListener, UdpSocket};
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn connect_takes_the_first_address_that_answers_and_names_the_last_failure() {
        let _limit = crate::test_support::limit();
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        // `localhost` may list ::1 first; only 127.0.0.1 listens.
        let tcp = connect("localhost", port, Some(Duration::from_secs(2)))
            .await
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap().port(), port);

        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        match connect("127.0.0.1", dead_port, None).await {
            Err(ConnectError::Connect(addr, e)) => {
                assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], dead_port)));
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected a refused connection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ip_literals_pass_through() {
        let _limit = crate::test_support::limit();
        let v4 = resolve("10.1.2.3", 443).await.unwrap();
        assert_eq!(
            v4,
            vec![SocketAddr::new(Ipv4Addr::new(10, 1, 2, 3).into(), 443)]
        );
        for host in ["::1", "[::1]"] {
            let v6 = resolve(host, 8080).await.unwrap();
            assert_eq!(v6, vec![SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 8080)]);
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback() {
        let _limit = crate::test_support::limit();
        for host in ["localhost", "LOCALHOST.", "api.localhost"] {
            let addrs = match resolve(host, 9000).await {
                Ok(addrs) => addrs,
                // Some hosts have no entry for *.localhost; `localhost` itself must work.
                Err(_) if host == "api.localhost" => continue,
                Err(e) => panic!("{host}: {e}"),
            };
            assert!(!addrs.is_empty(), "{host}");
            assert!(
                addrs
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 9000),
                "{host}: {addrs:?}"
            );
        }
        assert!(is_localhost("a.b.Localhost"));
        assert!(!is_localhost("notlocalhost"));
        assert!(!is_localhost("localhost.example"));
    }

    /// hickory against our own responder on loopback: names resolve through
    /// DNS, and a name that does not exist is `NotFound`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resolves_names_through_dns() {
        let _limit = crate::test_support::limit();
        tokio::time::timeout(Duration::from_secs(30), async {
            let service = Arc::new(crate::catalog::fixtures::service(
                "reviews",
                "reviews.default.global",
            ));
            let view = resolve_imports(&BTreeSet::new(), &[("mesh-a".to_owned(), vec![service])]);
            let table: Arc<VipTable> =
                Arc::new(VipAllocator::new("127.77.0.0/16".parse().unwrap()).update(&view));
            let vip = table.lookup_name("reviews.default.global").unwrap().vip;

            // Same port on TCP, as a DNS client expects. The UDP port the
            // kernel picks may be taken on TCP (a client's ephemeral port,
            // a socket in TIME_WAIT): try another.
            let mut pair = None;
            for _ in 0..100 {
                let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let port = udp.local_addr().unwrap().port();
                if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                    pair = Some((udp, tcp, port));
                    break;
                }
            }
            let (udp, tcp, port) = pair.expect("a port free on both UDP and TCP");
            let (_tables, rx) = tokio::sync::watch::channel(table);
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(super::super::responder::serve(
                udp,
                tcp,
                rx,
                shutdown.clone(),
            ));

            let mut ns = NameServerConfig::udp_and_tcp(Ipv4Addr::LOCALHOST.into());
            for conn in &mut ns.connections {
                conn.port = port;
            }
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            let opts = builder.options_mut();
            opts.use_hosts_file = ResolveHosts::Never;
            opts.attempts = 1;
            opts.timeout = Duration::from_secs(2);
            let resolver = builder.build().unwrap();

            let addrs = resolve_with(&resolver, "reviews.default.global.", 8080)
                .await
                .unwrap();
            assert_eq!(addrs, vec![SocketAddr::new(vip.into(), 8080)]);
            let addrs = resolve_with(&resolver, "gw.reviews.default.global.", 80)
                .await
                .unwrap();
            assert_eq!(addrs, vec![SocketAddr::new(vip.into(), 80)]);
            let err = resolve_with(&resolver, "nope.default.global.", 80)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
            let err = resolve_with(&resolver, "example.com.", 80)
                .await
                .unwrap_err();
            assert_ne!(
                err.kind(),
                io::ErrorKind::NotFound,
                "REFUSED is not an answer: {err}"
            );

            shutdown.cancel();
            server.await.unwrap();
        })
        .await
        .unwrap();
    }

    /// A name server on loopback that says the name does not exist, with
    /// the root zone's SOA (negative TTL: a day), until `exists` is set;
    /// then it answers 192.0.2.7 for A (and nothing for AAAA).
    async fn name_server_of_a_name_yet_to_exist(exists: Arc<AtomicBool>) -> SocketAddr {
        use hickory_proto::op::{Message, Metadata, ResponseCode};
        use hickory_proto::rr::rdata::{A, SOA};
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let request = Message::from_vec(&buf[..n]).unwrap();
                let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                response.metadata = Metadata::response_from_request(&request.metadata);
                response.add_queries(request.queries.iter().cloned());
                let query = &request.queries[0];
                if !exists.load(Ordering::SeqCst) {
                    response.metadata.response_code = ResponseCode::NXDomain;
                    let soa = SOA::new(
                        Name::from_ascii("a.root-servers.net.").unwrap(),
                        Name::from_ascii("nstld.verisign-grs.com.").unwrap(),
                        1,
                        1800,
                        900,
                        604_800,
                        86_400,
                    );
                    response.add_authority(Record::from_rdata(
                        Name::root(),
                        86_400,
                        RData::SOA(soa),
                    ));
                } else if query.query_type() == RecordType::A {
                    let a = RData::A(A::new(192, 0, 2, 7));
                    response.add_answer(Record::from_rdata(query.name().clone(), 60, a));
                }
                let _ = udp.send_to(&response.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    /// A name that did not exist when first asked is found once it does,
    /// within seconds, though its name server said to believe "no such
    /// name" for a day.
    #[tokio::test]
    async fn a_name_that_comes_to_exist_is_found_within_seconds() {
        let _limit = crate::test_support::limit();
        let exists = Arc::new(AtomicBool::new(false));
        let server = name_server_of_a_name_yet_to_exist(Arc::clone(&exists)).await;
        let mut ns = NameServerConfig::udp(server.ip());
        for conn in &mut ns.connections {
            conn.port = server.port();
        }
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        options(builder.options_mut());
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        let resolver = builder.build().unwrap();

        let err = resolve_with(&resolver, "peer.example.", 8008)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        exists.store(true, Ordering::SeqCst);
        let addrs = crate::test_support::wait_until(
            "the name to resolve",
            NEGATIVE_TTL_MAX * 3,
            || async {
                resolve_with(&resolver, "peer.example.", 8008)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        assert_eq!(addrs, vec![SocketAddr::from(([192, 0, 2, 7], 8008))]);
    }
}
