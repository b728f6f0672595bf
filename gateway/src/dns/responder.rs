//! The DNS responder: answers imported service names with their VIPs over UDP
//! and TCP. It is authoritative for the `global` TLD and for the parent domain
//! of every registered FQDN, answers nothing else (REFUSED: it never forwards
//! or recurses), and reads the VIP table from the catalog's `watch` channel on
//! every query, so a withdrawn import stops resolving at once. The answering
//! rules are a pure function of (packet, table) in [`Authority`]; the socket
//! loops around it are thin. Bad input is answered with FORMERR or dropped,
//! never a panic. The rules are documented in `docs/dns.md`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::catalog::routes::VipTable;
use crate::config::SharedAnswer;

/// TTL of answers and of negative answers (SOA minimum). Short, because a
/// withdrawn import must stop resolving quickly in clients' caches too.
pub const ANSWER_TTL: u32 = 5;

/// The TLD every federated name lives under; always served.
const GLOBAL_TLD: &str = "global";
/// A UDP answer larger than this is truncated when the query had no EDNS.
const CLASSIC_UDP_LIMIT: usize = 512;
/// The UDP payload size we advertise and honour at most (the DNS flag day
/// 2020 value, safe against fragmentation).
const EDNS_PAYLOAD: u16 = 1232;
use crate::config::defaults::{
    DNS_MAX_TCP_CONNECTIONS as MAX_TCP_CONNECTIONS, DNS_TCP_IDLE_TIMEOUT as TCP_IDLE_TIMEOUT,
};

/// Serves DNS on `udp` and `tcp` until `shutdown` is cancelled, answering
/// from the latest table in `vips`. Returns once both loops and every TCP
/// connection have stopped.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    vips: watch::Receiver<Arc<VipTable>>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared::new(vips));
    tokio::join!(
        serve_udp(udp, shared.clone(), shutdown.clone()),
        serve_tcp(tcp, shared, shutdown),
    );
}

/// The table receiver plus the [`Authority`] derived from its latest value,
/// rebuilt once per table change (not per query, not per connection).
struct Shared {
    vips: watch::Receiver<Arc<VipTable>>,
    current: ArcSwap<Authority>,
}

impl Shared {
    fn new(vips: watch::Receiver<Arc<VipTable>>) -> Self {
        let table = vips.borrow().clone();
        Shared {
            vips,
            current: ArcSwap::from_pointee(Authority::new(table)),
        }
    }

    fn authority(&self) -> Arc<Authority> {
        let table = self.vips.borrow().clone();
        let current = self.current.load_full();
        if Arc::ptr_eq(&current.table, &table) {
            return current;
        }
        // Two tasks may both rebuild after a change; both results are equal.
        let fresh = Arc::new(Authority::new(table));
        self.current.store(fresh.clone());
        fresh
    }
}

async fn serve_udp(udp: UdpSocket, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = udp.recv_from(&mut buf) => r,
        };
        let (len, peer) = match received {
            Ok(r) => r,
            Err(error) => {
                // ICMP errors from earlier sends surface here; they concern
                // one client, not the socket. The pause keeps a persistent
                // error from spinning a core.
                tracing::debug!(%error, "dns udp receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(response) = shared.authority().respond(&buf[..len], Transport::Udp) else {
            continue;
        };
        if let Err(error) = udp.send_to(&response, peer).await {
            tracing::debug!(%error, client.addr = %peer, "dns udp send failed");
        }
    }
}

async fn serve_tcp(tcp: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    use elsinore_transport::accept;
    let hooks = accept::Hooks::default().on_refused(|peer| {
        tracing::debug!(client.addr = %peer, "dns tcp connection limit reached; closing");
    });
    let mut connections = JoinSet::new();
    accept::serve(
        tcp,
        accept::Settings::new("dns tcp"),
        accept::Connections::new(MAX_TCP_CONNECTIONS),
        shutdown.clone(),
        hooks,
        |stream, _, slot| {
            // Reap finished connection tasks so the set stays small.
            while connections.try_join_next().is_some() {}
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                serve_tcp_connection(stream, &shared, &shutdown).await;
                drop(slot);
            });
        },
    )
    .await;
    // Connections watch the same token; wait for them to close.
    while connections.join_next().await.is_some() {}
}

/// Answers length-prefixed queries on one connection, in order, until the
/// client closes, goes idle, sends a truncated frame, or shutdown.
async fn serve_tcp_connection(
    mut stream: TcpStream,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    loop {
        let query = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut stream)) => match r {
                Ok(Ok(Some(frame))) => frame,
                // Idle, clean close or I/O error: nothing to answer.
                _ => return,
            },
        };
        let Some(response) = shared.authority().respond(&query, Transport::Tcp) else {
            continue;
        };
        let Ok(len) = u16::try_from(response.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(2 + response.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&response);
        let written = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&frame)) => r,
        };
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
}

/// One 2-byte length-prefixed message; `None` on a clean close between
/// messages.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What the responder knows for one VIP table: the table, the zones it is
/// authoritative for (with their SOA records) and the names that exist only
/// as ancestors of imported names (empty non-terminals, which must answer
/// NODATA rather than NXDOMAIN, or resolvers that cut at NXDOMAIN per
/// RFC 8020 would lose every name below them).
struct Authority {
    table: Arc<VipTable>,
    /// Shared mode with `answer: <name>`: the CNAME target of every name.
    cname: Option<Name>,
    /// Zone apex (lower case, no trailing dot) → its SOA record.
    zones: HashMap<String, Record>,
    empty_non_terminals: HashSet<String>,
}

impl Authority {
    fn new(table: Arc<VipTable>) -> Self {
        let mut apexes: HashSet<String> = HashSet::from([GLOBAL_TLD.to_owned()]);
        for entry in table.iter() {
            // A single-label FQDN has no parent short of the root, which we
            // must never claim.
            if let Some((_, parent)) = entry.fqdn.trim_end_matches('.').split_once('.') {
                apexes.insert(parent.to_ascii_lowercase());
            }
        }
        let zones: HashMap<String, Record> = apexes
            .into_iter()
            .filter_map(|apex| {
                let soa = soa_record(&apex)?;
                Some((apex, soa))
            })
            .collect();
        let mut empty_non_terminals = HashSet::new();
        for entry in table.iter() {
            let fqdn = entry.fqdn.trim_end_matches('.').to_ascii_lowercase();
            let mut rest = fqdn.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if zone_of(&zones, parent).is_some() {
                    empty_non_terminals.insert(parent.to_owned());
                }
                rest = parent;
            }
        }
        let cname = match table.shared_answer() {
            Some(SharedAnswer::Cname(target)) => match Name::from_ascii(format!("{target}.")) {
                Ok(name) => Some(name),
                Err(error) => {
                    // Validated as a DNS name at config load; not expected.
                    tracing::error!(%target, %error, "shared CNAME target is not a DNS name");
                    None
                }
            },
            _ => None,
        };
        Authority {
            table,
            cname,
            zones,
            empty_non_terminals,
        }
    }

    /// The wire response to `packet`, or `None` when it must be dropped (a
    /// response, or not even a header).
    fn respond(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let request = match Message::from_vec(packet) {
            Ok(message) => message,
            Err(_) => return self.format_error(packet),
        };
        if request.metadata.message_type != MessageType::Query {
            // Answering responses could loop two servers into each other.
            return None;
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata = Metadata::response_from_request(&request.metadata);
        response.add_queries(request.queries.iter().cloned());

        let mut udp_limit = CLASSIC_UDP_LIMIT;
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(ours);
            udp_limit = usize::from(edns.max_payload().clamp(512, EDNS_PAYLOAD));
            if edns.version() > 0 {
                response.metadata.response_code = ResponseCode::BADVERS;
                return encode(&response, transport, udp_limit);
            }
        }

        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
        } else if let [query] = request.queries.as_slice() {
            self.answer(query, &mut response);
        } else {
            response.metadata.response_code = ResponseCode::FormErr;
        }
        encode(&response, transport, udp_limit)
    }

    /// FORMERR for a packet whose header parses but whose body does not.
    fn format_error(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let header = Header::from_bytes(packet).ok()?;
        if header.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(header.metadata.id, header.metadata.op_code);
        response.metadata = Metadata::response_from_request(&header.metadata);
        response.metadata.response_code = ResponseCode::FormErr;
        response.to_vec().ok()
    }

    fn answer(&self, query: &Query, response: &mut Message) {
        if query.query_class() != DNSClass::IN {
            response.metadata.response_code = ResponseCode::Refused;
            return;
        }
        let key = query
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let zone = zone_of(&self.zones, &key);

        if let Some(entry) = self.table.lookup_name(&key) {
            response.metadata.authoritative = true;
            if let Some(target) = &self.cname {
                // Shared mode with a name: a CNAME answers every type; the
                // client's resolver follows it (we do not serve its zone).
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    ANSWER_TTL,
                    RData::CNAME(CNAME(target.clone())),
                ));
                return;
            }
            if matches!(query.query_type(), RecordType::A | RecordType::ANY) {
                // The owner name is the question's, case included, so
                // clients using 0x20 case randomization accept it.
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    ANSWER_TTL,
                    RData::A(A(entry.vip)),
                ));
            } else if let Some((_, soa)) = zone {
                response.add_authority(soa.clone());
            }
            return;
        }

        let Some((apex, soa)) = zone else {
            // Not ours: we forward nothing.
            response.metadata.response_code = ResponseCode::Refused;
            return;
        };
        response.metadata.authoritative = true;
        if apex == key && query.query_type() == RecordType::SOA {
            response.add_answer(soa.clone());
            return;
        }
        response.add_authority(soa.clone());
        if apex != key && !self.empty_non_terminals.contains(&key) {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
    }
}

/// The closest enclosing zone of `name` (lower case, no trailing dot).
fn zone_of<'a>(zones: &'a HashMap<String, Record>, name: &str) -> Option<(&'a str, &'a Record)> {
    let mut candidate = name;
    loop {
        if let Some((apex, soa)) = zones.get_key_value(candidate) {
            return Some((apex.as_str(), soa));
        }
        candidate = candidate.split_once('.')?.1;
    }
}

/// The synthetic SOA of a zone we serve. Its minimum (the negative-caching
/// TTL, RFC 2308) is as short as the answers', so a newly imported name is
/// not hidden by a cached NXDOMAIN for long. Zone transfers are not served,
/// so serial and timers are placeholders.
fn soa_record(apex: &str) -> Option<Record> {
    let name = Name::from_ascii(format!("{apex}.")).ok()?;
    let hostmaster = Name::from_ascii(format!("hostmaster.{apex}.")).ok()?;
    let soa = SOA::new(name.clone(), hostmaster, 1, 3600, 600, 86_400, ANSWER_TTL);
    Some(Record::from_rdata(name, ANSWER_TTL, RData::SOA(soa)))
}

fn encode(response: &Message, transport: Transport, udp_limit: usize) -> Option<Vec<u8>> {
    let bytes = match response.to_vec() {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(%error, id = response.metadata.id, "dns response failed to encode");
            return None;
        }
    };
    if transport == Transport::Udp && bytes.len() > udp_limit {
        // The client retries over TCP on TC; the header and question stay.
        return response.truncate().to_vec().ok();
    }
    Some(bytes)
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::catalog::imports::resolve;
    use crate::catalog::routes::VipAllocator;
    use crate::config::VipRange;
    use elsinore_federation_api::FederatedService;
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, SocketAddr};

    fn svc(name: &str, fqdn: &str, instance: &str) -> Arc<FederatedService> {
        crate::catalog::fixtures::service_on(name, fqdn, instance, 8080)
    }

    fn range() -> VipRange {
        "127.77.0.0/16".parse().unwrap()
    }

    fn table(alloc: &mut VipAllocator, services: Vec<Arc<FederatedService>>) -> Arc<VipTable> {
        Arc::new(alloc.update(&resolve(
            &BTreeSet::new(),
            &[("mesh-a".to_owned(), services)],
        )))
    }

    fn reviews_table() -> (VipAllocator, Arc<VipTable>) {
        let mut alloc = VipAllocator::new(range());
        let t = table(
            &mut alloc,
            vec![
                svc("reviews", "reviews.default.global", "gw-1"),
                svc("ratings", "ratings.bookinfo.svc.cluster.local", "gw-2"),
            ],
        );
        (alloc, t)
    }

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    fn vip_of(t: &VipTable, name: &str) -> Ipv4Addr {
        t.lookup_name(name).unwrap().vip
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    /// A running responder on 127.0.0.1 with a handle to publish tables.
    struct Server {
        udp: SocketAddr,
        tcp: SocketAddr,
        tables: watch::Sender<Arc<VipTable>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(initial: Arc<VipTable>) -> Self {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
            let (tables, rx) = watch::channel(initial);
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(udp, tcp, rx, shutdown.clone()));
            Server {
                udp: udp_addr,
                tcp: tcp_addr,
                tables,
                shutdown,
                task,
            }
        }

        async fn udp_raw(&self, bytes: &[u8]) -> Option<Vec<u8>> {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.send_to(bytes, self.udp).await.unwrap();
            let mut buf = vec![0u8; 65_535];
            match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
                Ok(r) => {
                    let (n, from) = r.unwrap();
                    assert_eq!(from, self.udp);
                    Some(buf[..n].to_vec())
                }
                Err(_) => None,
            }
        }

        async fn udp(&self, q: &Message) -> Message {
            let bytes = self.udp_raw(&q.to_vec().unwrap()).await.expect("no answer");
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!(m.metadata.id, q.metadata.id);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.queries, q.queries, "question is echoed");
            assert_eq!(m.metadata.recursion_desired, q.metadata.recursion_desired);
            assert!(!m.metadata.recursion_available);
            m
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("serve stops on shutdown")
                .unwrap();
        }
    }

    async fn tcp_exchange(stream: &mut TcpStream, q: &Message) -> Message {
        let body = q.to_vec().unwrap();
        let mut frame = u16::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        stream.write_all(&frame).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        m
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn udp_answers_by_the_rules() {
        let _limit = crate::test_support::limit();
        tokio::time::timeout(Duration::from_secs(30), async {
            let (_alloc, t) = reviews_table();
            let server = Server::start(t.clone()).await;
            let vip = vip_of(&t, "reviews.default.global");

            // Registered FQDN, any case, with the question's case kept.
            let r = server
                .udp(&query("Reviews.Default.GLOBAL.", RecordType::A))
                .await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            assert_eq!(a_records(&r), vec![vip]);
            assert_eq!(r.answers[0].ttl, ANSWER_TTL);
            assert_eq!(r.answers[0].name.to_ascii(), "Reviews.Default.GLOBAL.");

            // Instance name → the same VIP.
            let r = server
                .udp(&query("gw-1.reviews.default.global.", RecordType::A))
                .await;
            assert_eq!(a_records(&r), vec![vip]);

            // A name under a non-.global registered parent.
            let r = server
                .udp(&query("ratings.bookinfo.svc.cluster.local.", RecordType::A))
                .await;
            assert_eq!(
                a_records(&r),
                vec![vip_of(&t, "ratings.bookinfo.svc.cluster.local")]
            );

            // AAAA for an imported name: NODATA, authoritative, SOA for caching.
            let r = server
                .udp(&query("reviews.default.global.", RecordType::AAAA))
                .await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            assert!(r.answers.is_empty());
            assert_eq!(r.authorities.len(), 1);
            assert_eq!(r.authorities[0].record_type(), RecordType::SOA);

            // Unknown .global name, and unknown name in a registered parent.
            for name in ["nope.default.global.", "other.bookinfo.svc.cluster.local."] {
                let r = server.udp(&query(name, RecordType::A)).await;
                assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
                assert!(r.metadata.authoritative, "{name}");
                assert!(r.answers.is_empty(), "{name}");
            }
            // Unknown child of an instance name is NXDOMAIN too.
            let r = server
                .udp(&query("x.gw-1.reviews.default.global.", RecordType::A))
                .await;
            assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

            // Ancestors of imported names exist: NODATA, not NXDOMAIN.
            for name in ["default.global.", "global.", "bookinfo.svc.cluster.local."] {
                let r = server.udp(&query(name, RecordType::A)).await;
                assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
                assert!(r.answers.is_empty(), "{name}");
            }

            // Names we do not own, including the registered parent's parent.
            for name in ["example.com.", "svc.cluster.local.", "."] {
                let r = server.udp(&query(name, RecordType::A)).await;
                assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
                assert!(!r.metadata.authoritative, "{name}");
                assert!(r.answers.is_empty(), "{name}");
            }

            // RD is echoed as sent.
            let mut q = query("reviews.default.global.", RecordType::A);
            q.metadata.recursion_desired = false;
            let r = server.udp(&q).await;
            assert_eq!(a_records(&r), vec![vip]);

            server.stop().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_is_dropped_or_formerr_and_server_keeps_answering() {
        let _limit = crate::test_support::limit();
        tokio::time::timeout(Duration::from_secs(30), async {
            let (_alloc, t) = reviews_table();
            let server = Server::start(t.clone()).await;

            // Shorter than a header: dropped.
            assert!(server.udp_raw(b"\x01\x02\x03").await.is_none());
            assert!(server.udp_raw(b"").await.is_none());

            // A query header promising a question that is not there: FORMERR.
            let garbage = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
            let r = Message::from_vec(&server.udp_raw(&garbage).await.unwrap()).unwrap();
            assert_eq!(r.metadata.id, 0xabcd);
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            assert!(r.metadata.recursion_desired);

            // A response packet is never answered (no reflection loops).
            let mut resp = query("reviews.default.global.", RecordType::A);
            resp.metadata.message_type = MessageType::Response;
            assert!(server.udp_raw(&resp.to_vec().unwrap()).await.is_none());

            // Random bytes of many lengths: no panic.
            let mut seed: u32 = 0x1234_5678;
            for len in 0..200usize {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        seed.to_le_bytes()[0]
                    })
                    .collect();
                let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                sock.send_to(&bytes, server.udp).await.unwrap();
            }

            // Two questions: FORMERR. Non-QUERY opcode: NOTIMP.
            let mut two = query("reviews.default.global.", RecordType::A);
            two.add_query(Query::query(
                Name::from_ascii("nope.default.global.").unwrap(),
                RecordType::A,
            ));
            let r = server.udp(&two).await;
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            let mut notify = query("reviews.default.global.", RecordType::A);
            notify.metadata.op_code = OpCode::Notify;
            let r = server.udp(&notify).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NotImp);

            // Still answering.
            let r = server
                .udp(&query("reviews.default.global.", RecordType::A))
                .await;
            assert_eq!(a_records(&r), vec![vip_of(&t, "reviews.default.global")]);
            server.stop().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn withdrawn_import_stops_resolving() {
        let _limit = crate::test_support::limit();
        tokio::time::timeout(Duration::from_secs(30), async {
            let (mut alloc, t) = reviews_table();
            let server = Server::start(t.clone()).await;
            let q = query("reviews.default.global.", RecordType::A);
            assert_eq!(
                a_records(&server.udp(&q).await),
                vec![vip_of(&t, "reviews.default.global")]
            );

            // reviews withdrawn; ratings stays, and a new import appears.
            let t2 = table(
                &mut alloc,
                vec![
                    svc("ratings", "ratings.bookinfo.svc.cluster.local", "gw-2"),
                    svc("details", "details.default.global", "gw-3"),
                ],
            );
            server.tables.send_replace(t2.clone());
            let r = server.udp(&q).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
            assert!(r.answers.is_empty());
            let r = server
                .udp(&query("details.default.global.", RecordType::A))
                .await;
            assert_eq!(a_records(&r), vec![vip_of(&t2, "details.default.global")]);

            // Every import withdrawn: its former parent is no longer ours.
            server.tables.send_replace(table(&mut alloc, vec![]));
            let r = server
                .udp(&query("ratings.bookinfo.svc.cluster.local.", RecordType::A))
                .await;
            assert_eq!(r.metadata.response_code, ResponseCode::Refused);
            server.stop().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_answers_several_queries_per_connection() {
        let _limit = crate::test_support::limit();
        tokio::time::timeout(Duration::from_secs(30), async {
            let (_alloc, t) = reviews_table();
            let server = Server::start(t.clone()).await;
            let mut stream = TcpStream::connect(server.tcp).await.unwrap();
            let r = tcp_exchange(
                &mut stream,
                &query("reviews.default.global.", RecordType::A),
            )
            .await;
            assert_eq!(a_records(&r), vec![vip_of(&t, "reviews.default.global")]);
            assert!(r.metadata.authoritative);
            let r = tcp_exchange(&mut stream, &query("nope.default.global.", RecordType::A)).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
            let r = tcp_exchange(&mut stream, &query("example.com.", RecordType::A)).await;
            assert_eq!(r.metadata.response_code, ResponseCode::Refused);

            // Shutdown closes idle connections and stops serve.
            server.stop().await;
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap_or(0);
            assert_eq!(n, 0, "connection closed on shutdown");
        })
        .await
        .unwrap();
    }

    #[test]
    fn edns_is_echoed_and_bad_version_refused() {
        let (_alloc, t) = reviews_table();
        let auth = Authority::new(t);
        let mut q = query("reviews.default.global.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns.clone());
        let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
            .unwrap();
        assert_eq!(r.edns.as_ref().unwrap().max_payload(), EDNS_PAYLOAD);
        assert_eq!(a_records(&r).len(), 1);

        edns.set_version(1);
        q.set_edns(edns);
        let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
            .unwrap();
        // 16 is both BADVERS and BADSIG on the wire; hickory decodes it as
        // the latter.
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(r.edns.is_some());
        assert!(r.answers.is_empty());
    }

    #[test]
    fn oversized_udp_answer_is_truncated_but_not_over_tcp() {
        let (_alloc, t) = reviews_table();
        let auth = Authority::new(t);
        // One A answer never reaches 512 bytes (names compress against the
        // question), so exercise `encode` with an oversized response.
        let mut response = query("reviews.default.global.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        for i in 0..60u8 {
            response.add_answer(Record::from_rdata(
                Name::from_ascii(format!("n{i}.reviews.default.global.")).unwrap(),
                ANSWER_TTL,
                RData::A(A(Ipv4Addr::new(127, 77, 0, i))),
            ));
        }
        let full = encode(&response, Transport::Tcp, CLASSIC_UDP_LIMIT).unwrap();
        assert!(full.len() > CLASSIC_UDP_LIMIT);
        let tcp = Message::from_vec(&full).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);

        let udp = encode(&response, Transport::Udp, CLASSIC_UDP_LIMIT).unwrap();
        assert!(udp.len() <= CLASSIC_UDP_LIMIT);
        let udp = Message::from_vec(&udp).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        assert_eq!(udp.queries, response.queries);
        // A normal answer stays well under the limit.
        let q = query("reviews.default.global.", RecordType::A);
        let small = auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap();
        assert!(!Message::from_vec(&small).unwrap().metadata.truncation);
    }

    #[test]
    fn soa_query_at_apex_answers_soa() {
        let (_alloc, t) = reviews_table();
        let auth = Authority::new(t);
        let q = query("global.", RecordType::SOA);
        let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].record_type(), RecordType::SOA);
    }

    fn shared_table(answer: SharedAnswer) -> Arc<VipTable> {
        let plan = crate::catalog::routes::TablePlan {
            range: range(),
            shared: Some(answer),
            port_overrides: Default::default(),
        };
        Arc::new(VipAllocator::with_plan(plan).update(&resolve(
            &BTreeSet::new(),
            &[(
                "mesh-a".to_owned(),
                vec![
                    svc("reviews", "reviews.default.global", "gw-1"),
                    svc("ratings", "ratings.default.global", "gw-2"),
                ],
            )],
        )))
    }

    /// Shared mode: every imported name is answered with the one address,
    /// or with a CNAME to the one name (for any type); others as before.
    #[test]
    fn shared_mode_answers_one_address_or_a_cname() {
        let shared = Ipv4Addr::new(10, 96, 0, 53);
        let auth = Authority::new(shared_table(SharedAnswer::Address(shared)));
        for name in [
            "reviews.default.global.",
            "ratings.default.global.",
            "gw-1.reviews.default.global.",
        ] {
            let q = query(name, RecordType::A);
            let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
                .unwrap();
            assert_eq!(a_records(&r), vec![shared], "{name}");
        }
        let target = "elsinore-egress.elsinore.svc.cluster.local";
        let auth = Authority::new(shared_table(SharedAnswer::Cname(target.into())));
        for rtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
            let q = query("Reviews.Default.Global.", rtype);
            let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
                .unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            assert_eq!(r.answers.len(), 1, "{rtype}");
            assert_eq!(r.answers[0].name.to_ascii(), "Reviews.Default.Global.");
            match &r.answers[0].data {
                RData::CNAME(c) => assert_eq!(c.0.to_ascii(), format!("{target}.")),
                other => panic!("expected a CNAME, got {other:?}"),
            }
        }
        let q = query("missing.default.global.", RecordType::A);
        let r = Message::from_vec(&auth.respond(&q.to_vec().unwrap(), Transport::Udp).unwrap())
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    /// Valid queries (names in and out of our zones, several types, with
    /// and without EDNS) with a few bytes flipped, inserted, deleted or cut
    /// off: the responder drops what is not a query, answers FORMERR to a
    /// header whose body does not parse, and otherwise answers with the
    /// request's id and question, within the UDP size limit, with A records
    /// that are exactly the table's VIPs. The counts prove the edits reach
    /// answers, NXDOMAIN, REFUSED, FORMERR and drops.
    #[test]
    fn edited_queries_get_a_consistent_answer_or_none() {
        use proptest::prelude::*;
        use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
        let (_alloc, t) = reviews_table();
        let auth = Authority::new(t.clone());
        let names = [
            "reviews.default.global.",
            "gw-1.reviews.default.global.",
            "ratings.bookinfo.svc.cluster.local.",
            "nope.default.global.",
            "default.global.",
            "example.com.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SOA,
            RecordType::TXT,
            RecordType::ANY,
        ];
        let edit = (0u8..4, any::<prop::sample::Index>(), any::<u8>());
        let strategy = (
            prop::sample::select(names.to_vec()),
            prop::sample::select(types.to_vec()),
            any::<bool>(),
            prop::collection::vec(edit, 0..4),
        );
        let counts: [AtomicU32; 6] = Default::default();
        const LABELS: [&str; 6] = [
            "answered", "nxdomain", "refused", "formerr", "other", "dropped",
        ];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1024));
        runner
            .run(&strategy, |(name, rtype, with_edns, edits)| {
                let mut q = query(name, rtype);
                if with_edns {
                    let mut edns = Edns::new();
                    edns.set_max_payload(4096);
                    q.set_edns(edns);
                }
                let mut packet = q.to_vec().unwrap();
                for (kind, at, byte) in edits {
                    let len = packet.len();
                    match kind {
                        0 => packet.insert(at.index(len + 1), byte),
                        _ if len == 0 => {}
                        1 => packet[at.index(len)] ^= 1 << (byte % 8),
                        2 => {
                            packet.remove(at.index(len));
                        }
                        _ => packet.truncate(at.index(len)),
                    }
                }
                let response = auth.respond(&packet, Transport::Udp);
                let Some(bytes) = response else {
                    counts[5].fetch_add(1, Relaxed);
                    // Dropped: not even a header, or not a query.
                    if let Ok(request) = Message::from_vec(&packet) {
                        prop_assert_eq!(request.metadata.message_type, MessageType::Response);
                    }
                    return Ok(());
                };
                let r = Message::from_vec(&bytes).unwrap();
                prop_assert_eq!(r.metadata.message_type, MessageType::Response);
                prop_assert_eq!(&bytes[..2], &packet[..2], "the id is echoed");
                match Message::from_vec(&packet) {
                    Ok(request) => {
                        prop_assert_eq!(request.metadata.message_type, MessageType::Query);
                        prop_assert_eq!(&r.queries, &request.queries);
                        let limit = request.edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |e| {
                            usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD))
                        });
                        prop_assert!(bytes.len() <= limit, "{} > {}", bytes.len(), limit);
                    }
                    Err(_) => {
                        prop_assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
                    }
                }
                for answer in &r.answers {
                    let owner = answer
                        .name
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    match &answer.data {
                        RData::A(A(ip)) => {
                            let entry = t.lookup_name(&owner);
                            prop_assert!(entry.is_some(), "answer for {} not in the table", owner);
                            prop_assert_eq!(*ip, entry.unwrap().vip);
                        }
                        // The zone's own SOA, asked for at its apex.
                        RData::SOA(_) => prop_assert_eq!(answer.record_type(), RecordType::SOA),
                        other => {
                            return Err(TestCaseError::fail(format!(
                                "unexpected answer {other:?}"
                            )));
                        }
                    }
                }
                let slot = match r.metadata.response_code {
                    ResponseCode::NoError if !r.answers.is_empty() => 0,
                    ResponseCode::NXDomain => 1,
                    ResponseCode::Refused => 2,
                    ResponseCode::FormErr => 3,
                    _ => 4,
                };
                counts[slot].fetch_add(1, Relaxed);
                Ok(())
            })
            .unwrap();
        let counts: Vec<(&str, u32)> = LABELS
            .iter()
            .zip(&counts)
            .map(|(l, c)| (*l, c.load(Relaxed)))
            .collect();
        eprintln!("of 1024 edited queries: {counts:?}");
        for (outcome, n) in &counts {
            assert!(*n >= 10, "only {n} edited queries {outcome}: {counts:?}");
        }
    }
}
