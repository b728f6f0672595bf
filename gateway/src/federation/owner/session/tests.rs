//! Unit tests of the owner session (snapshot order, the pending map, the
//! window, nonces, ACK/NACK, the ack timeout) and proptest interleavings of
//! catalog changes, requests and restarts. Moved verbatim out of the
//! production file; they drive the session only through its public events.

use super::*;
use elsinore_federation_api::{Endpoint, Instance, Protocol};
use proptest::prelude::*;

const V2_URL: &str = "type.googleapis.com/federation.types.v1alpha2.FederatedService";
const V1_URL: &str = "type.googleapis.com/federation.types.v1alpha1.FederatedService";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A service whose content differs by `version` (put in the description).
fn svc(name: &str, version: u32) -> Arc<FederatedService> {
    Arc::new(FederatedService {
        name: name.to_owned(),
        description: format!("v{version}"),
        tags: vec!["web".to_owned()],
        labels: elsinore_federation_api::StringMap::from([("team".to_owned(), "a".to_owned())]),
        fqdn: format!("{name}.mesh-a.example"),
        endpoints: vec![Endpoint {
            address: "10.0.0.1".to_owned(),
            port: 15443,
            labels: vec![],
            description: String::new(),
        }],
        sans: vec!["spiffe://mesh-a.example/ns/gw/sa/ingress".to_owned()],
        instances: vec![Instance {
            id: "i1".to_owned(),
            protocol: Protocol::Http,
            metadata: elsinore_federation_api::StringMap::from([(
                "SNI".to_owned(),
                format!("{name}.internal"),
            )]),
            endpoint_selector: vec![],
            description: String::new(),
        }],
    })
}

fn view(entries: &[(&str, u32)]) -> BTreeMap<String, Arc<FederatedService>> {
    entries
        .iter()
        .map(|(name, version)| ((*name).to_owned(), svc(name, *version)))
        .collect()
}

fn session(window: u32) -> OwnerSession {
    OwnerSession::new(OwnerSettings {
        version: ApiVersion::V1alpha2,
        window,
        ack_timeout: TIMEOUT,
    })
}

fn started(window: u32, snapshot: &[(&str, u32)]) -> OwnerSession {
    let mut s = session(window);
    s.start(V2_URL, "ctx".to_owned(), view(snapshot)).unwrap();
    s
}

fn drain(s: &mut OwnerSession, now: Instant) -> Vec<Outgoing> {
    std::iter::from_fn(|| s.poll_send(now)).collect()
}

fn ack(s: &mut OwnerSession, msg: &Outgoing, now: Instant) -> AckOutcome {
    s.on_request(&msg.nonce, None, now).unwrap()
}

fn version_of(msg: &Outgoing) -> Option<String> {
    msg.service.as_ref().map(|s| s.description.clone())
}

#[test]
fn resource_url_must_match_the_version() {
    let mut s = session(1);
    let err = s.start(V1_URL, String::new(), BTreeMap::new()).unwrap_err();
    assert_eq!(
        err,
        SessionError::BadResourceUrl {
            expected: V2_URL,
            got: V1_URL.to_owned()
        }
    );
    // Still unstarted: a correct first request is accepted afterwards.
    assert!(s.poll_send(Instant::now()).is_none());
    s.start(V2_URL, String::new(), BTreeMap::new()).unwrap();

    let mut s1 = OwnerSession::new(OwnerSettings {
        version: ApiVersion::V1alpha1,
        window: 1,
        ack_timeout: TIMEOUT,
    });
    assert!(matches!(
        s1.start(V2_URL, String::new(), BTreeMap::new()),
        Err(SessionError::BadResourceUrl { .. })
    ));
    s1.start(V1_URL, String::new(), BTreeMap::new()).unwrap();
}

#[test]
fn request_before_start_and_second_start_are_errors() {
    let now = Instant::now();
    let mut s = session(1);
    assert_eq!(
        s.on_request("x-1", None, now),
        Err(SessionError::NotStarted)
    );
    s.start(V2_URL, String::new(), BTreeMap::new()).unwrap();
    assert_eq!(
        s.start(V2_URL, String::new(), BTreeMap::new()),
        Err(SessionError::AlreadyStarted)
    );
}

#[test]
fn nothing_is_sent_before_start() {
    let mut s = session(4);
    s.on_catalog(&view(&[("a", 1)]));
    assert!(s.poll_send(Instant::now()).is_none());
    assert_eq!(s.stats().pending, 0);
}

#[test]
fn snapshot_is_every_name_once_with_its_state() {
    let now = Instant::now();
    let mut s = started(8, &[("a", 1), ("b", 1), ("c", 1)]);
    assert_eq!(s.snapshot_size(), 3);
    let sent = drain(&mut s, now);
    let names: Vec<_> = sent.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(sent.iter().all(|m| m.op == Op::Upsert { created: true }));
    assert_eq!(sent[1].service.as_deref(), Some(&*svc("b", 1)));
    assert!(s.snapshot_sent());
}

#[test]
fn empty_snapshot_has_size_zero_and_sends_nothing() {
    let mut s = started(1, &[]);
    assert_eq!(s.snapshot_size(), 0);
    assert!(s.snapshot_sent());
    assert!(s.poll_send(Instant::now()).is_none());
}

#[test]
fn snapshot_goes_before_later_changes() {
    let now = Instant::now();
    let mut s = started(1, &[("m", 1), ("n", 1)]);
    // "a" sorts first and "m" changes after its slot was used: neither
    // may overtake the snapshot's remaining "n".
    let first = s.poll_send(now).unwrap();
    assert_eq!(first.name, "m");
    s.on_catalog(&view(&[("a", 1), ("m", 2), ("n", 1)]));
    ack(&mut s, &first, now);
    let mut order = Vec::new();
    while let Some(msg) = s.poll_send(now) {
        order.push((msg.name.clone(), version_of(&msg)));
        ack(&mut s, &msg, now);
    }
    assert_eq!(
        order,
        [
            ("n".to_owned(), Some("v1".to_owned())),
            // Changes of one catalog update queue in name order.
            ("a".to_owned(), Some("v1".to_owned())),
            ("m".to_owned(), Some("v2".to_owned())),
        ]
    );
}

#[test]
fn snapshot_name_changed_before_sending_is_sent_once_latest() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1), ("b", 1)]);
    for version in 2..=5 {
        s.on_catalog(&view(&[("a", 1), ("b", version)]));
    }
    let mut sent = Vec::new();
    while let Some(msg) = s.poll_send(now) {
        ack(&mut s, &msg, now);
        sent.push(msg);
    }
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].name, "b");
    assert_eq!(version_of(&sent[1]).as_deref(), Some("v5"));
}

#[test]
fn snapshot_name_deleted_before_sending_is_a_delete_in_its_slot() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1), ("b", 1)]);
    s.on_catalog(&view(&[("a", 1)]));
    let first = s.poll_send(now).unwrap();
    ack(&mut s, &first, now);
    let second = s.poll_send(now).unwrap();
    assert_eq!((second.name.as_str(), second.op), ("b", Op::Delete));
    assert!(second.service.is_none());
    ack(&mut s, &second, now);
    assert!(s.poll_send(now).is_none());
    assert_eq!(s.stats().sent as usize, s.snapshot_size());
    // Coming back after that DELETE is a creation again.
    s.on_catalog(&view(&[("a", 1), ("b", 2)]));
    let again = s.poll_send(now).unwrap();
    assert_eq!(again.op, Op::Upsert { created: true });
}

#[test]
fn pending_is_a_map_ten_changes_one_message() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    // The consumer is slow: "a" changes ten times while in flight.
    for version in 2..=11 {
        s.on_catalog(&view(&[("a", version)]));
        assert_eq!(s.stats().pending, 1);
    }
    assert!(s.poll_send(now).is_none(), "a is still in flight");
    ack(&mut s, &first, now);
    let next = s.poll_send(now).unwrap();
    assert_eq!(version_of(&next).as_deref(), Some("v11"));
    assert_eq!(next.op, Op::Upsert { created: false });
    ack(&mut s, &next, now);
    assert!(s.poll_send(now).is_none());
    assert_eq!(s.stats().sent, 2);
}

#[test]
fn pending_memory_is_bounded_by_names() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1), ("b", 1), ("c", 1)]);
    let _stuck = s.poll_send(now).unwrap(); // never acknowledged
    for version in 2..1000 {
        s.on_catalog(&view(&[("a", version), ("b", version), ("c", version)]));
    }
    assert!(s.stats().pending <= 3);
    assert_eq!(s.stats().in_flight, 1);
}

#[test]
fn never_two_in_flight_for_one_name() {
    let now = Instant::now();
    let mut s = started(4, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    s.on_catalog(&view(&[("a", 2), ("b", 1)]));
    // A slot is free, but "a" is in flight: only "b" may go.
    let sent = drain(&mut s, now);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].name, "b");
    s.on_request(
        &first.nonce,
        Some(Status {
            code: 3,
            message: "bad".into(),
        }),
        now,
    )
    .unwrap();
    let next = s.poll_send(now).unwrap();
    assert_eq!(
        (next.name.as_str(), version_of(&next)),
        ("a", Some("v2".to_owned()))
    );
}

#[test]
fn window_limits_messages_in_flight() {
    let now = Instant::now();
    let names: Vec<(String, u32)> = (0..10).map(|i| (format!("s{i}"), 1)).collect();
    let entries: Vec<(&str, u32)> = names.iter().map(|(n, v)| (n.as_str(), *v)).collect();

    let mut one = started(1, &entries);
    let sent = drain(&mut one, now);
    assert_eq!(sent.len(), 1);
    ack(&mut one, &sent[0], now);
    assert_eq!(drain(&mut one, now).len(), 1);

    let mut four = started(4, &entries);
    let sent = drain(&mut four, now);
    assert_eq!(sent.len(), 4);
    assert_eq!(four.stats().in_flight, 4);
    ack(&mut four, &sent[2], now);
    assert_eq!(drain(&mut four, now).len(), 1);

    // A window of 0 would deadlock the stream; it counts as 1.
    let mut zero = started(0, &entries);
    assert_eq!(drain(&mut zero, now).len(), 1);
}

#[test]
fn nonces_are_unique_within_and_across_streams() {
    let now = Instant::now();
    let names: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let entries: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        let mut s = started(100, &entries);
        for msg in drain(&mut s, now) {
            assert!(seen.insert(msg.nonce), "duplicate nonce");
        }
    }
    assert_eq!(seen.len(), 100);
}

#[test]
fn a_nonce_of_another_stream_is_unknown() {
    let now = Instant::now();
    let mut a = started(1, &[("x", 1)]);
    let mut b = started(1, &[("x", 1)]);
    let from_a = a.poll_send(now).unwrap();
    let _from_b = b.poll_send(now).unwrap();
    assert_eq!(
        ack(&mut b, &from_a, now),
        AckOutcome::UnknownNonce {
            nonce: from_a.nonce.clone()
        }
    );
    assert_eq!(b.stats().in_flight, 1);
}

#[test]
fn delete_of_a_never_sent_name_is_dropped() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    // "b" appears and vanishes while "a" holds the only slot.
    s.on_catalog(&view(&[("a", 1), ("b", 1)]));
    assert_eq!(s.stats().pending, 1);
    s.on_catalog(&view(&[("a", 1)]));
    assert_eq!(s.stats().pending, 0);
    ack(&mut s, &first, now);
    assert!(s.poll_send(now).is_none());
}

#[test]
fn delete_of_a_sent_name_is_sent_and_recreation_is_created() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    ack(&mut s, &first, now);
    s.on_catalog(&BTreeMap::new());
    let delete = s.poll_send(now).unwrap();
    assert_eq!((delete.name.as_str(), delete.op), ("a", Op::Delete));
    ack(&mut s, &delete, now);
    s.on_catalog(&view(&[("a", 2)]));
    let again = s.poll_send(now).unwrap();
    assert_eq!(again.op, Op::Upsert { created: true });
    ack(&mut s, &again, now);
    s.on_catalog(&view(&[("a", 3)]));
    assert_eq!(s.poll_send(now).unwrap().op, Op::Upsert { created: false });
}

#[test]
fn upsert_equal_to_what_was_sent_is_not_resent() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    // A fresh Arc with equal content is no change.
    s.on_catalog(&view(&[("a", 1)]));
    assert_eq!(s.stats().pending, 0);
    // A change and back while in flight: the consumer already gets v1.
    s.on_catalog(&view(&[("a", 2)]));
    s.on_catalog(&view(&[("a", 1)]));
    assert_eq!(s.stats().pending, 0);
    ack(&mut s, &first, now);
    assert!(s.poll_send(now).is_none());
}

#[test]
fn nack_is_counted_recorded_and_not_resent() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1), ("b", 1)]);
    let first = s.poll_send(now).unwrap();
    let outcome = s
        .on_request(
            &first.nonce,
            Some(Status {
                code: 3,
                message: "missing fqdn".into(),
            }),
            now,
        )
        .unwrap();
    assert_eq!(
        outcome,
        AckOutcome::Nacked {
            name: "a".into(),
            code: 3,
            message: "missing fqdn".into()
        }
    );
    let stats = s.stats();
    assert_eq!((stats.nacks, stats.acks, stats.in_flight), (1, 0, 0));
    assert_eq!(stats.last_nack, Some(("a".into(), "missing fqdn".into())));
    // The slot is free for "b", and "a" is not sent again by itself.
    let second = s.poll_send(now).unwrap();
    assert_eq!(second.name, "b");
    ack(&mut s, &second, now);
    assert!(s.poll_send(now).is_none());
    // A later change of "a" is sent, as an update of what was sent.
    s.on_catalog(&view(&[("a", 2), ("b", 1)]));
    let resent = s.poll_send(now).unwrap();
    assert_eq!(
        (resent.name.as_str(), resent.op),
        ("a", Op::Upsert { created: false })
    );
}

#[test]
fn ack_with_code_zero_and_a_message_is_an_ack() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1)]);
    let first = s.poll_send(now).unwrap();
    let status = Some(Status {
        code: 0,
        message: "ok".into(),
    });
    assert_eq!(
        s.on_request(&first.nonce, status, now).unwrap(),
        AckOutcome::Acked { name: "a".into() }
    );
    assert_eq!(s.stats().acks, 1);
}

#[test]
fn unknown_and_duplicate_nonces_are_counted_and_ignored() {
    let now = Instant::now();
    let mut s = started(1, &[("a", 1), ("b", 1)]);
    let first = s.poll_send(now).unwrap();
    for bogus in ["", "nonsense", "0-0"] {
        assert_eq!(
            s.on_request(bogus, None, now).unwrap(),
            AckOutcome::UnknownNonce {
                nonce: bogus.to_owned()
            }
        );
    }
    // A mangled form of a real nonce is not that nonce.
    let plus = first.nonce.replace('-', "-+");
    assert!(matches!(
        s.on_request(&plus, None, now).unwrap(),
        AckOutcome::UnknownNonce { .. }
    ));
    assert_eq!(s.stats().in_flight, 1);
    ack(&mut s, &first, now);
    assert!(matches!(
        ack(&mut s, &first, now),
        AckOutcome::UnknownNonce { .. }
    ));
    let stats = s.stats();
    assert_eq!((stats.acks, stats.unknown_nonces), (1, 5));
}

#[test]
fn context_is_echoed_on_v1alpha2_and_empty_on_v1alpha1() {
    let now = Instant::now();
    let mut s = session(2);
    s.start(V2_URL, "tenant-7".into(), view(&[("a", 1)]))
        .unwrap();
    s.on_catalog(&view(&[("a", 1), ("b", 1)]));
    let sent = drain(&mut s, now);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|m| m.context == "tenant-7"));

    let mut s1 = OwnerSession::new(OwnerSettings {
        version: ApiVersion::V1alpha1,
        window: 1,
        ack_timeout: TIMEOUT,
    });
    s1.start(V1_URL, "ignored".into(), view(&[("a", 1)]))
        .unwrap();
    assert_eq!(s1.poll_send(now).unwrap().context, "");
}

#[test]
fn unacknowledged_message_times_out_at_the_deadline() {
    let t0 = Instant::now();
    let mut s = started(2, &[("a", 1), ("b", 1)]);
    assert_eq!(s.next_deadline(), None);
    assert_eq!(s.on_tick(t0 + TIMEOUT * 10), Ok(()));
    let a = s.poll_send(t0).unwrap();
    let b = s.poll_send(t0 + Duration::from_secs(5)).unwrap();
    assert_eq!(s.next_deadline(), Some(t0 + TIMEOUT));
    assert_eq!(s.on_tick(t0 + TIMEOUT - Duration::from_millis(1)), Ok(()));
    // Acknowledging the oldest moves the deadline to the next oldest.
    ack(&mut s, &a, t0 + Duration::from_secs(10));
    let deadline = t0 + Duration::from_secs(5) + TIMEOUT;
    assert_eq!(s.next_deadline(), Some(deadline));
    assert_eq!(s.on_tick(t0 + TIMEOUT), Ok(()));
    let err = s.on_tick(deadline).unwrap_err();
    assert_eq!(
        err,
        SessionError::AckTimeout {
            nonce: b.nonce.clone(),
            name: "b".into(),
            waited: TIMEOUT
        }
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_works_with_paused_time() {
    let _limit = crate::test_support::limit();
    let mut s = started(1, &[("a", 1)]);
    s.poll_send(Instant::now()).unwrap();
    let deadline = s.next_deadline().unwrap();
    // Paused time: time passing to the deadline, not an ordering wait.
    tokio::time::sleep_until(deadline).await;
    assert!(matches!(
        s.on_tick(Instant::now()),
        Err(SessionError::AckTimeout { .. })
    ));
}

#[derive(Debug, Clone)]
enum Action {
    /// Put service `name` at `version` into the view.
    Set(u8, u32),
    /// Remove service `name` from the view.
    Remove(u8),
    /// ACK (or NACK) the in-flight message at this index (modulo).
    Reply(usize, bool),
    /// Reply with a nonce nobody sent.
    Bogus,
    /// Send up to this many messages.
    Poll(u8),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0u8..6, 0u32..3).prop_map(|(n, v)| Action::Set(n, v)),
        2 => (0u8..6).prop_map(Action::Remove),
        3 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(i, nack)| Action::Reply(i, nack)),
        1 => Just(Action::Bogus),
        3 => (1u8..4).prop_map(Action::Poll),
    ]
}

/// The consumer side as a plain map, with the owner's invariants checked
/// on every message it receives.
struct Consumer {
    model: BTreeMap<String, Arc<FederatedService>>,
    in_flight: Vec<Outgoing>,
    received: Vec<Outgoing>,
}

impl Consumer {
    fn receive(&mut self, msg: Outgoing, window: u32) {
        assert!(
            self.in_flight.iter().all(|m| m.name != msg.name),
            "two in flight for {}",
            msg.name
        );
        match msg.op {
            Op::Upsert { created } => {
                assert_eq!(created, !self.model.contains_key(&msg.name));
                let service = msg.service.clone().expect("upsert carries the service");
                assert_eq!(service.name, msg.name);
                self.model.insert(msg.name.clone(), service);
            }
            Op::Delete => {
                assert!(msg.service.is_none());
                self.model.remove(&msg.name);
            }
        }
        self.in_flight.push(msg.clone());
        self.received.push(msg);
        assert!(self.in_flight.len() <= window.max(1) as usize);
    }
}

proptest! {
    #[test]
    fn interleavings_keep_invariants_and_converge(
        window in 1u32..5,
        initial in prop::collection::btree_map(0u8..6, 0u32..3, 0..6),
        actions in prop::collection::vec(action(), 0..60),
    ) {
        let now = Instant::now();
        let name = |n: u8| format!("s{n}");
        let mut current: BTreeMap<String, Arc<FederatedService>> =
            initial.iter().map(|(n, v)| (name(*n), svc(&name(*n), *v))).collect();
        let snapshot_names: BTreeSet<String> = current.keys().cloned().collect();
        let mut seen_names = snapshot_names.clone();
        let mut s = session(window);
        s.start(V2_URL, "c".into(), current.clone()).unwrap();
        prop_assert_eq!(s.snapshot_size(), snapshot_names.len());
        let mut consumer = Consumer { model: BTreeMap::new(), in_flight: Vec::new(), received: Vec::new() };

        for action in actions {
            match action {
                Action::Set(n, v) => {
                    current.insert(name(n), svc(&name(n), v));
                    seen_names.insert(name(n));
                    s.on_catalog(&current);
                }
                Action::Remove(n) => {
                    current.remove(&name(n));
                    s.on_catalog(&current);
                }
                Action::Reply(i, nack) => {
                    if !consumer.in_flight.is_empty() {
                        let msg = consumer.in_flight.remove(i % consumer.in_flight.len());
                        let status = nack.then(|| Status { code: 3, message: "no".into() });
                        let outcome = s.on_request(&msg.nonce, status, now).unwrap();
                        prop_assert!(
                            !matches!(outcome, AckOutcome::UnknownNonce { .. }),
                            "in-flight nonce was unknown"
                        );
                    }
                }
                Action::Bogus => {
                    let outcome = s.on_request("bogus", None, now).unwrap();
                    prop_assert!(matches!(outcome, AckOutcome::UnknownNonce { .. }), "bogus nonce was accepted");
                }
                Action::Poll(k) => {
                    for _ in 0..k {
                        let Some(msg) = s.poll_send(now) else { break };
                        consumer.receive(msg, window);
                    }
                }
            }
            let stats = s.stats();
            prop_assert!(stats.in_flight <= window as usize);
            prop_assert_eq!(stats.in_flight, consumer.in_flight.len());
            prop_assert!(stats.pending <= seen_names.len());
        }

        // Let the consumer catch up: send and ACK until quiet.
        loop {
            while let Some(msg) = s.poll_send(now) {
                consumer.receive(msg, window);
            }
            if consumer.in_flight.is_empty() {
                break;
            }
            for msg in std::mem::take(&mut consumer.in_flight) {
                s.on_request(&msg.nonce, None, now).unwrap();
            }
        }
        let stats = s.stats();
        prop_assert_eq!((stats.in_flight, stats.pending), (0, 0));
        prop_assert_eq!(&consumer.model, &current);

        // The first snapshot_size messages are exactly the snapshot names.
        let head: BTreeSet<String> = consumer.received.iter()
            .take(s.snapshot_size()).map(|m| m.name.clone()).collect();
        prop_assert_eq!(head.len(), s.snapshot_size());
        prop_assert_eq!(head, snapshot_names);
    }
}

#[derive(Debug, Clone)]
enum Event {
    /// Put service `name` at `version` into the view.
    Set(u8, u32),
    /// Remove service `name` from the view.
    Remove(u8),
    /// ACK (or NACK) the in-flight message at this index (modulo).
    Reply(usize, bool),
    /// ACK a nonce of an earlier stream of this consumer.
    StaleReply(usize),
    /// Send up to this many messages.
    Poll(u8),
    /// Time passes (milliseconds), then the owner task's timer fires.
    Advance(u64),
    /// The stream breaks (network); the consumer dials a new one.
    Restart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0u8..6, 0u32..3).prop_map(|(n, v)| Event::Set(n, v)),
        2 => (0u8..6).prop_map(Event::Remove),
        3 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(i, nack)| Event::Reply(i, nack)),
        1 => any::<usize>().prop_map(Event::StaleReply),
        3 => (1u8..4).prop_map(Event::Poll),
        3 => (0u64..20_000).prop_map(Event::Advance),
        1 => Just(Event::Restart),
    ]
}

/// The consumer across streams: what it holds (applied on receipt, as
/// the owner counts it), what is in flight on the current stream with
/// its send time, and the snapshot of the current stream.
#[derive(Default)]
struct Peer {
    model: BTreeMap<String, Arc<FederatedService>>,
    in_flight: Vec<(Outgoing, Instant)>,
    stream_received: Vec<Outgoing>,
    snapshot_names: BTreeSet<String>,
    snapshot_size: usize,
    old_nonces: Vec<String>,
}

impl Peer {
    /// A new stream: the owner session starts from `current`.
    fn open(&mut self, s: &mut OwnerSession, current: &BTreeMap<String, Arc<FederatedService>>) {
        self.old_nonces
            .extend(self.in_flight.drain(..).map(|(m, _)| m.nonce));
        self.old_nonces
            .extend(self.stream_received.drain(..).map(|m| m.nonce));
        s.start(V2_URL, "c".into(), current.clone()).unwrap();
        self.snapshot_names = current.keys().cloned().collect();
        self.snapshot_size = s.snapshot_size();
        assert_eq!(self.snapshot_size, self.snapshot_names.len());
        if self.snapshot_size == 0 {
            // An empty snapshot is complete at once: nothing survives it.
            self.model.clear();
        }
    }

    fn receive(&mut self, msg: Outgoing, now: Instant, window: u32) {
        assert!(
            self.in_flight.iter().all(|(m, _)| m.name != msg.name),
            "two in flight for {}",
            msg.name
        );
        assert!(
            !self.old_nonces.contains(&msg.nonce),
            "nonce {} reused across streams",
            msg.nonce
        );
        match msg.op {
            Op::Upsert { .. } => {
                let service = msg.service.clone().expect("upsert carries the service");
                self.model.insert(msg.name.clone(), service);
            }
            Op::Delete => {
                self.model.remove(&msg.name);
            }
        }
        self.in_flight.push((msg.clone(), now));
        self.stream_received.push(msg);
        assert!(self.in_flight.len() <= window.max(1) as usize);
        if self.stream_received.len() == self.snapshot_size {
            // The snapshot is complete: the consumer reconciles away what
            // the owner no longer has (names absent from the snapshot).
            let names = &self.snapshot_names;
            self.model.retain(|name, _| names.contains(name));
            let head: BTreeSet<String> = self
                .stream_received
                .iter()
                .map(|m| m.name.clone())
                .collect();
            assert_eq!(&head, names, "the first messages are the snapshot");
        }
    }
}

/// How often the cases reached each path worth reaching.
#[derive(Default)]
struct OwnerReached {
    timeouts: std::sync::atomic::AtomicU32,
    restarts: std::sync::atomic::AtomicU32,
    stale_replies: std::sync::atomic::AtomicU32,
}

fn owner_interleaving(
    window: u32,
    ack_timeout_ms: u64,
    initial: BTreeMap<u8, u32>,
    events: Vec<Event>,
    reached: &OwnerReached,
) -> Result<(), TestCaseError> {
    use std::sync::atomic::Ordering::Relaxed;
    let ack_timeout = Duration::from_millis(ack_timeout_ms);
    let new_session = || {
        OwnerSession::new(OwnerSettings {
            version: ApiVersion::V1alpha2,
            window,
            ack_timeout,
        })
    };
    let mut now = Instant::now();
    let name = |n: u8| format!("s{n}");
    let mut current: BTreeMap<String, Arc<FederatedService>> = initial
        .iter()
        .map(|(n, v)| (name(*n), svc(&name(*n), *v)))
        .collect();
    let mut s = new_session();
    let mut peer = Peer::default();
    peer.open(&mut s, &current);

    for event in events {
        match event {
            Event::Set(n, v) => {
                current.insert(name(n), svc(&name(n), v));
                s.on_catalog(&current);
            }
            Event::Remove(n) => {
                current.remove(&name(n));
                s.on_catalog(&current);
            }
            Event::Reply(i, nack) => {
                if !peer.in_flight.is_empty() {
                    let (msg, _) = peer.in_flight.remove(i % peer.in_flight.len());
                    let status = nack.then(|| Status {
                        code: 3,
                        message: "no".into(),
                    });
                    let outcome = s.on_request(&msg.nonce, status, now).unwrap();
                    prop_assert!(
                        !matches!(outcome, AckOutcome::UnknownNonce { .. }),
                        "{:?}",
                        outcome
                    );
                }
            }
            Event::StaleReply(i) => {
                if !peer.old_nonces.is_empty() {
                    let nonce = peer.old_nonces[i % peer.old_nonces.len()].clone();
                    let before = s.stats();
                    let outcome = s.on_request(&nonce, None, now).unwrap();
                    prop_assert_eq!(outcome, AckOutcome::UnknownNonce { nonce });
                    let after = s.stats();
                    prop_assert_eq!(after.in_flight, before.in_flight);
                    prop_assert_eq!(after.acks, before.acks);
                    reached.stale_replies.fetch_add(1, Relaxed);
                }
            }
            Event::Poll(k) => {
                for _ in 0..k {
                    let Some(msg) = s.poll_send(now) else { break };
                    peer.receive(msg, now, window);
                }
            }
            Event::Advance(ms) => {
                now += Duration::from_millis(ms);
                // The oldest message in flight decides, to the instant.
                let oldest = peer
                    .in_flight
                    .iter()
                    .min_by_key(|(_, sent_at)| *sent_at)
                    .map(|(m, sent_at)| (m.clone(), *sent_at));
                prop_assert_eq!(
                    s.next_deadline(),
                    oldest.as_ref().map(|(_, at)| *at + ack_timeout)
                );
                match (s.on_tick(now), oldest) {
                    (Ok(()), None) => {}
                    (Ok(()), Some((_, sent_at))) => {
                        prop_assert!(now - sent_at < ack_timeout);
                    }
                    (
                        Err(SessionError::AckTimeout {
                            nonce,
                            name,
                            waited,
                        }),
                        Some((_, sent_at)),
                    ) => {
                        prop_assert!(now - sent_at >= ack_timeout);
                        prop_assert_eq!(waited, now - sent_at);
                        // Ties in send time: any of them is the oldest.
                        let tied: Vec<&str> = peer
                            .in_flight
                            .iter()
                            .filter(|(_, at)| *at == sent_at)
                            .map(|(m, _)| m.nonce.as_str())
                            .collect();
                        prop_assert!(
                            tied.contains(&nonce.as_str()),
                            "{} not among {:?}",
                            nonce,
                            tied
                        );
                        prop_assert!(
                            peer.in_flight
                                .iter()
                                .any(|(m, _)| m.nonce == nonce && m.name == name)
                        );
                        // The owner task ends the stream; the consumer dials again.
                        reached.timeouts.fetch_add(1, Relaxed);
                        s = new_session();
                        peer.open(&mut s, &current);
                    }
                    (other, oldest) => {
                        return Err(TestCaseError::fail(format!(
                            "on_tick gave {other:?} with oldest in flight {oldest:?}"
                        )));
                    }
                }
            }
            Event::Restart => {
                reached.restarts.fetch_add(1, Relaxed);
                s = new_session();
                peer.open(&mut s, &current);
            }
        }
        let stats = s.stats();
        prop_assert!(stats.in_flight <= window as usize);
        prop_assert_eq!(stats.in_flight, peer.in_flight.len());
    }

    // Let the consumer catch up on the last stream: send and ACK until
    // quiet, in time, so no ACK times out.
    loop {
        while let Some(msg) = s.poll_send(now) {
            peer.receive(msg, now, window);
        }
        if peer.in_flight.is_empty() {
            break;
        }
        for (msg, _) in std::mem::take(&mut peer.in_flight) {
            s.on_request(&msg.nonce, None, now).unwrap();
        }
    }
    prop_assert_eq!(s.on_tick(now), Ok(()));
    let stats = s.stats();
    prop_assert_eq!((stats.in_flight, stats.pending), (0, 0));
    // Whatever timed out or broke on the way, the consumer converges.
    prop_assert_eq!(&peer.model, &current);
    Ok(())
}

/// Interleavings with time: ACKs that come too late end the stream
/// (exactly when the oldest message in flight has waited `ack_timeout`,
/// never earlier), streams break and restart with a fresh snapshot,
/// replies to an earlier stream's nonces are ignored, and the consumer
/// still ends up with exactly the owner's catalog. The counts prove
/// timeouts, restarts and stale replies happen in many cases.
#[test]
fn ack_timeouts_and_restarts_still_converge() {
    let reached = OwnerReached::default();
    let strategy = (
        1u32..5,
        1_000u64..30_000,
        prop::collection::btree_map(0u8..6, 0u32..3, 0..6),
        prop::collection::vec(event(), 0..80),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(512));
    runner
        .run(&strategy, |(window, timeout_ms, initial, events)| {
            owner_interleaving(window, timeout_ms, initial, events, &reached)
        })
        .unwrap();
    let counts = [
        ("ack timeouts", reached.timeouts.into_inner()),
        ("restarts", reached.restarts.into_inner()),
        ("stale replies", reached.stale_replies.into_inner()),
    ];
    eprintln!("reached in 512 cases: {counts:?}");
    for (what, n) in counts {
        assert!(n >= 20, "only {n} {what} in 512 cases: {counts:?}");
    }
}
