//! Unit tests of the consumer session (snapshot completion by size or quiet
//! period, NACKs, staleness, backoff, the restored cache) and proptest
//! interleavings of responses, ticks and reconnects. Moved verbatim out of
//! the production file; time and jitter are passed in, nothing sleeps.

use super::*;
use proptest::prelude::*;

const STALE: Duration = Duration::from_secs(300);
const QUIET: Duration = Duration::from_secs(2);

fn settings() -> ConsumerSettings {
    ConsumerSettings {
        stale_after: STALE,
        snapshot_quiet_period: QUIET,
        backoff_initial: Duration::from_secs(2),
        backoff_max: Duration::from_secs(10),
    }
}

/// A base time well after boot, so subtracting cache ages never
/// underflows the monotonic clock.
fn t0() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn svc(name: &str, description: &str) -> FederatedService {
    FederatedService {
        name: name.to_owned(),
        description: description.to_owned(),
        tags: Vec::new(),
        labels: Default::default(),
        fqdn: format!("{name}.mesh-a.global"),
        endpoints: Vec::new(),
        sans: vec!["spiffe://mesh-a.example/gateway".to_owned()],
        instances: Vec::new(),
    }
}

fn upsert(s: &mut ConsumerSession, now: Instant, name: &str) -> Handled {
    s.on_response(
        now,
        &format!("n-{name}"),
        name,
        Operation::Upsert,
        Ok(svc(name, "")),
    )
}

fn names(s: &ConsumerSession) -> Vec<String> {
    s.imports().keys().cloned().collect()
}

/// A session synced with `names` on a first stream, then disconnected at
/// `at`.
fn lost_stream_with(names: &[&str], at: Instant) -> ConsumerSession {
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(at, Some(names.len()));
    for name in names {
        upsert(&mut s, at, name);
    }
    assert_eq!(s.state(), &SyncState::Synced);
    s.on_stream_closed(at, CloseReason::Other("reset".into()), 0.5);
    s
}

#[test]
fn announced_size_completes_after_n_responses_and_removes_unseen() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b", "c"], t);
    assert!(s.on_stream_open(t + secs(1), Some(2)).is_empty());
    assert_eq!(s.state(), &SyncState::Syncing);
    let first = upsert(&mut s, t + secs(1), "a");
    assert!(first.reconciled.is_empty());
    assert_eq!(s.state(), &SyncState::Syncing);
    assert!(!s.stats().snapshot_complete);
    // The second response is a delete: it still counts towards the size.
    let second = s.on_response(t + secs(1), "n2", "c", Operation::Delete, Err("x".into()));
    assert_eq!(second.change, Change::Deleted("c".into()));
    assert_eq!(second.reconciled, vec!["b".to_owned()]);
    assert_eq!(s.state(), &SyncState::Synced);
    assert!(s.stats().snapshot_complete);
    assert_eq!(names(&s), vec!["a".to_owned()]);
}

#[test]
fn announced_zero_completes_at_open() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b"], t);
    let removed = s.on_stream_open(t + secs(1), Some(0));
    assert_eq!(removed, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(s.state(), &SyncState::Synced);
    assert!(s.imports().is_empty());
}

#[test]
fn quiet_period_completes_a_foreign_snapshot() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b"], t);
    s.on_stream_open(t + secs(10), None);
    upsert(&mut s, t + secs(11), "a");
    // Quiet period counts from the last response, not from the open.
    assert_eq!(s.next_deadline(), Some(t + secs(11) + QUIET));
    assert!(
        s.on_tick(t + secs(11) + QUIET - Duration::from_millis(1))
            .is_empty()
    );
    assert_eq!(s.state(), &SyncState::Syncing);
    assert_eq!(s.on_tick(t + secs(11) + QUIET), vec!["b".to_owned()]);
    assert_eq!(s.state(), &SyncState::Synced);
    assert_eq!(names(&s), vec!["a".to_owned()]);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn quiet_period_without_responses_counts_from_open() {
    let t = t0();
    let mut s = lost_stream_with(&["a"], t);
    s.on_stream_open(t + secs(5), None);
    assert_eq!(s.next_deadline(), Some(t + secs(5) + QUIET));
    assert_eq!(s.on_tick(t + secs(5) + QUIET), vec!["a".to_owned()]);
    assert_eq!(s.state(), &SyncState::Synced);
}

#[test]
fn nack_keeps_old_entry_and_counts_as_seen() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, Some(2));
    s.on_response(t, "1", "a", Operation::Upsert, Ok(svc("a", "v1")));
    upsert(&mut s, t, "b");
    s.on_stream_closed(t, CloseReason::Other("eof".into()), 0.0);

    s.on_stream_open(t + secs(3), Some(2));
    let h = s.on_response(
        t + secs(3),
        "n7",
        "a",
        Operation::Upsert,
        Err("missing fqdn".into()),
    );
    let Reply::Nack { nonce, message } = &h.reply else {
        panic!("expected a nack, got {:?}", h.reply)
    };
    assert_eq!(nonce, "n7");
    assert!(
        message.contains("\"a\"") && message.contains("missing fqdn"),
        "{message}"
    );
    assert_eq!(h.change, Change::Unchanged);
    let h = upsert(&mut s, t + secs(3), "c");
    assert_eq!(h.reconciled, vec!["b".to_owned()]);
    assert_eq!(names(&s), vec!["a".to_owned(), "c".to_owned()]);
    let kept = &s.imports()["a"];
    assert_eq!(kept.service.description, "v1");
    assert_eq!(kept.confirmed_at, t);
    let stats = s.stats();
    assert_eq!((stats.messages, stats.acks, stats.nacks), (4, 3, 1));
    assert_eq!(stats.last_nack.as_ref().map(|(n, _)| n.as_str()), Some("a"));
    assert_eq!(stats.last_ack_at, Some(t + secs(3)));
}

fn with_fqdn(name: &str, fqdn: &str) -> FederatedService {
    FederatedService {
        fqdn: fqdn.to_owned(),
        ..svc(name, "")
    }
}

#[track_caller]
fn nack_message(h: &Handled) -> &str {
    match &h.reply {
        Reply::Nack { message, .. } => message,
        other => panic!("expected a NACK, got {other:?}"),
    }
}

#[test]
fn claim_refusals_are_nacked_by_rule_and_the_stream_goes_on() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, None);
    upsert(&mut s, t, "a");
    for (name, fqdn, rule, needle) in [
        (
            "k8s",
            "kubernetes.default.svc.cluster.local",
            Rule::ClusterLocal,
            "fqdn \"kubernetes.default.svc.cluster.local\" is under the cluster-local zone cluster.local, which no peer may claim",
        ),
        ("ip", "10.0.0.1", Rule::IpLiteral, "is an IP literal"),
        (
            "elsewhere",
            "x.example.com",
            Rule::NotAllowed,
            "allowedNames: global",
        ),
    ] {
        let h = s.on_response(t, "n", name, Operation::Upsert, Ok(with_fqdn(name, fqdn)));
        let message = nack_message(&h);
        assert!(
            message.starts_with(&format!("rejected service {name:?}: ")),
            "{message}"
        );
        assert!(message.contains(needle), "{message}");
        assert_eq!(h.refused, Some(rule));
        assert_eq!(h.change, Change::Unchanged);
    }
    // A valid entry after them is imported; the earlier one stays.
    let h = upsert(&mut s, t, "b");
    assert_eq!(
        h.reply,
        Reply::Ack {
            nonce: "n-b".into()
        }
    );
    assert_eq!(h.refused, None);
    assert_eq!(names(&s), ["a", "b"]);
    let stats = s.stats();
    assert_eq!((stats.acks, stats.nacks), (2, 3));
    assert_eq!(
        stats.refused,
        BTreeMap::from([
            (Rule::IpLiteral, 1),
            (Rule::ClusterLocal, 1),
            (Rule::NotAllowed, 1)
        ])
    );
    // Refused names the session never held are not remembered as seen.
    assert_eq!(s.stream.as_ref().unwrap().seen.len(), 2);
    // Neither do they survive into the snapshot's reconciliation.
    assert!(s.on_tick(t + QUIET).is_empty());
    assert_eq!(names(&s), ["a", "b"]);
}

#[test]
fn a_refused_update_keeps_the_held_entry_through_reconciliation() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b"], t);
    s.on_stream_open(t + secs(1), Some(2));
    let h = s.on_response(
        t + secs(1),
        "n1",
        "a",
        Operation::Upsert,
        Ok(with_fqdn("a", "a.localhost")),
    );
    assert!(nack_message(&h).contains("under localhost"), "{h:?}");
    assert_eq!(h.refused, Some(Rule::Localhost));
    let h = upsert(&mut s, t + secs(1), "b");
    assert!(h.reconciled.is_empty(), "{h:?}");
    assert_eq!(names(&s), ["a", "b"]);
    assert_eq!(s.imports()["a"].service.fqdn, "a.mesh-a.global");
}

#[test]
fn our_export_names_are_refused_once_known() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, None);
    upsert(&mut s, t, "reviews");
    s.claims_mut()
        .set_local(["reviews.mesh-a.global".to_owned()]);
    let h = upsert(&mut s, t, "reviews");
    assert!(nack_message(&h).contains("own exports"), "{h:?}");
    assert_eq!(h.refused, Some(Rule::LocalExport));
    // The entry held from before stays (the merge aliases it: local wins).
    assert_eq!(names(&s), ["reviews"]);
}

#[test]
fn the_services_limit_refuses_new_names_not_updates() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.set_claims(Claims::new(
        "mesh-a",
        ["global".to_owned()],
        Vec::new(),
        crate::config::PeerLimits {
            services: 2,
            ..Default::default()
        },
    ));
    s.on_stream_open(t, None);
    upsert(&mut s, t, "a");
    upsert(&mut s, t, "b");
    let h = upsert(&mut s, t, "c");
    let message = nack_message(&h);
    assert!(
        message.contains("3, more than limits.services allows for peer mesh-a (2)"),
        "{message}"
    );
    assert_eq!(h.refused, Some(Rule::Services));
    assert_eq!(
        upsert(&mut s, t, "a").reply,
        Reply::Ack {
            nonce: "n-a".into()
        }
    );
    s.on_response(t, "d", "b", Operation::Delete, Err("delete".into()));
    assert_eq!(upsert(&mut s, t, "c").refused, None);
    assert_eq!(names(&s), ["a", "c"]);
}

#[test]
fn per_service_limits_are_nacked() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.set_claims(Claims::new(
        "mesh-a",
        ["global".to_owned()],
        Vec::new(),
        crate::config::PeerLimits {
            endpoints_per_service: 1,
            ..Default::default()
        },
    ));
    s.on_stream_open(t, None);
    let endpoint = elsinore_federation_api::Endpoint {
        address: "192.0.2.1".into(),
        port: 1,
        labels: Vec::new(),
        description: String::new(),
    };
    let mut service = svc("a", "");
    service.endpoints = vec![endpoint.clone(), endpoint];
    let h = s.on_response(t, "n", "a", Operation::Upsert, Ok(service));
    assert!(
        nack_message(&h).contains("limits.endpointsPerService"),
        "{h:?}"
    );
    assert_eq!(h.refused, Some(Rule::EndpointsPerService));
    assert!(s.imports().is_empty());
}

#[test]
fn refusals_are_remembered_bounded_one_per_name_until_imported() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, None);
    s.on_response(
        t,
        "1",
        "k8s",
        Operation::Upsert,
        Ok(with_fqdn("k8s", "a.cluster.local")),
    );
    s.on_response(t, "2", "bad", Operation::Upsert, Err("x".repeat(2000)));
    let records: Vec<_> = s.refusals().iter().cloned().collect();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].name, "k8s");
    assert_eq!(records[0].fqdn, "a.cluster.local");
    assert_eq!(records[0].rule, Some(Rule::ClusterLocal));
    assert!(
        records[0].message.contains("cluster-local zone"),
        "{records:?}"
    );
    assert_eq!(records[1].rule, None);
    assert!(
        records[1].message.len() <= 512 + '…'.len_utf8(),
        "{}",
        records[1].message.len()
    );
    // The same name again: one record, the latest.
    s.on_response(
        t,
        "3",
        "k8s",
        Operation::Upsert,
        Ok(with_fqdn("k8s", "k8s.localhost")),
    );
    let names: Vec<_> = s.refusals().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["bad", "k8s"]);
    assert_eq!(s.refusals()[1].rule, Some(Rule::Localhost));
    // Imported after all: no longer refused.
    upsert(&mut s, t, "k8s");
    let names: Vec<_> = s.refusals().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["bad"]);
    // A flood keeps the last REFUSALS_KEPT.
    for i in 0..1000 {
        let name = format!("n{i}");
        s.on_response(
            t,
            "n",
            &name,
            Operation::Upsert,
            Ok(with_fqdn(&name, "10.0.0.1")),
        );
    }
    assert_eq!(s.refusals().len(), REFUSALS_KEPT);
    assert_eq!(s.refusals().back().unwrap().name, "n999");
    assert_eq!(
        s.refusals().front().unwrap().name,
        format!("n{}", 1000 - REFUSALS_KEPT)
    );
}

#[test]
fn restore_drops_cached_entries_the_rules_in_force_refuse() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.set_claims(Claims::new(
        "mesh-a",
        ["mesh-a.global".to_owned()],
        Vec::new(),
        crate::config::PeerLimits {
            services: 2,
            ..Default::default()
        },
    ));
    s.restore(
        vec![
            (svc("a", ""), secs(1)),
            (with_fqdn("k8s", "k8s.default.svc.cluster.local"), secs(1)),
            (with_fqdn("moved", "moved.elsewhere.global"), secs(1)),
            (svc("b", ""), secs(1)),
            (svc("c", ""), secs(1)),
        ],
        t,
    );
    assert_eq!(names(&s), ["a", "b"]);
}

#[test]
fn an_oversized_message_is_counted_by_its_rule() {
    let mut s = ConsumerSession::new(settings());
    s.on_message_too_large();
    assert_eq!(s.stats().refused, BTreeMap::from([(Rule::MessageBytes, 1)]));
}

#[test]
fn upsert_replaces_and_records_confirmation_time() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, Some(0));
    s.on_response(t, "1", "a", Operation::Upsert, Ok(svc("a", "v1")));
    let h = s.on_response(t + secs(9), "2", "a", Operation::Upsert, Ok(svc("a", "v2")));
    assert_eq!(h.reply, Reply::Ack { nonce: "2".into() });
    assert_eq!(h.change, Change::Upserted("a".into()));
    assert_eq!(s.imports()["a"].service.description, "v2");
    assert_eq!(s.imports()["a"].confirmed_at, t + secs(9));
}

#[test]
fn name_mismatch_is_nacked_and_old_entry_kept() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, Some(0));
    s.on_response(t, "1", "a", Operation::Upsert, Ok(svc("a", "v1")));
    let h = s.on_response(t, "2", "a", Operation::Upsert, Ok(svc("z", "v2")));
    let Reply::Nack { message, .. } = &h.reply else {
        panic!("expected a nack")
    };
    assert!(
        message.contains("\"a\"") && message.contains("\"z\""),
        "{message}"
    );
    assert_eq!(names(&s), vec!["a".to_owned()]);
    assert_eq!(s.imports()["a"].service.description, "v1");
}

#[test]
fn delete_removes_and_unknown_name_is_acked_unchanged() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, Some(0));
    upsert(&mut s, t, "a");
    let h = s.on_response(t, "d1", "a", Operation::Delete, Err("no resource".into()));
    assert_eq!(h.reply, Reply::Ack { nonce: "d1".into() });
    assert_eq!(h.change, Change::Deleted("a".into()));
    let h = s.on_response(
        t,
        "d2",
        "ghost",
        Operation::Delete,
        Err("no resource".into()),
    );
    assert_eq!(h.reply, Reply::Ack { nonce: "d2".into() });
    assert_eq!(h.change, Change::Unchanged);
    assert!(s.imports().is_empty());
}

#[test]
fn v1alpha1_delete_without_resource_id_uses_the_object_name() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, Some(0));
    s.on_response(t, "1", "", Operation::Upsert, Ok(svc("a", "")));
    assert_eq!(names(&s), vec!["a".to_owned()]);
    let h = s.on_response(t, "2", "", Operation::Delete, Ok(svc("a", "")));
    assert_eq!(h.change, Change::Deleted("a".into()));
    let h = s.on_response(t, "3", "", Operation::Delete, Err("bad any".into()));
    assert!(matches!(h.reply, Reply::Nack { .. }));
}

#[test]
fn unknown_operation_and_response_without_stream_are_nacked() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    let h = upsert(&mut s, t, "a");
    assert!(matches!(h.reply, Reply::Nack { .. }));
    assert!(s.imports().is_empty());
    s.on_stream_open(t, Some(0));
    let h = s.on_response(t, "u", "a", Operation::Unknown(0), Ok(svc("a", "")));
    let Reply::Nack { message, .. } = &h.reply else {
        panic!("expected a nack")
    };
    assert!(message.contains("unknown operation 0"), "{message}");
    assert!(s.imports().is_empty());
    assert_eq!(s.stats().nacks, 2);
}

/// The codec's result reaches `on_response` as the consumer task's own
/// translation did: the same operation, name and NACK text on the wire.
#[test]
fn on_message_maps_the_codec_result_onto_on_response() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, None);
    let rejected = |nonce: &str, error| {
        Err(Rejected {
            nonce: nonce.into(),
            resource_id: "a".into(),
            error,
        })
    };
    let unknown = ResponseError::UnknownOperation {
        code: 7,
        expected: "UPSERT or DELETE",
    };
    let h = s.on_message(t, rejected("n1", unknown));
    let nack = |nonce: &str, message: &str| Reply::Nack {
        nonce: nonce.into(),
        message: message.into(),
    };
    assert_eq!(
        h.reply,
        nack("n1", "rejected service \"a\": unknown operation 7")
    );
    let missing = ResponseError::MissingResource {
        operation: "UPSERT",
    };
    let h = s.on_message(t, rejected("n2", missing));
    assert_eq!(
        h.reply,
        nack("n2", "rejected service \"a\": UPSERT without a resource")
    );
    let response = |nonce: &str, resource_id: &str, operation| {
        Ok(Response {
            nonce: nonce.into(),
            resource_id: resource_id.into(),
            operation,
            context: String::new(),
        })
    };
    let h = s.on_message(t, response("n3", "", wire::Operation::Delete));
    assert_eq!(
        h.reply,
        nack("n3", "rejected resource: delete names no service: delete")
    );
    let upsert = wire::Operation::Upsert {
        service: Arc::new(svc("a", "x")),
        created: false,
    };
    let h = s.on_message(t, response("n4", "a", upsert));
    assert_eq!(h.reply, Reply::Ack { nonce: "n4".into() });
    assert_eq!(h.change, Change::Upserted("a".into()));
    assert_eq!(*s.imports()["a"].service, svc("a", "x"));
    let h = s.on_message(t, response("n5", "a", wire::Operation::Delete));
    assert_eq!(h.reply, Reply::Ack { nonce: "n5".into() });
    assert_eq!(h.change, Change::Deleted("a".into()));
    assert!(s.imports().is_empty());
}

#[test]
fn lost_stream_keeps_imports_until_stale() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b"], t);
    assert_eq!(s.state(), &SyncState::Disconnected { since: t });
    assert!(!s.stats().connected);
    assert_eq!(s.next_deadline(), Some(t + STALE));
    assert!(s.on_tick(t + STALE - Duration::from_millis(1)).is_empty());
    assert_eq!(names(&s).len(), 2);
    assert_eq!(s.on_tick(t + STALE), vec!["a".to_owned(), "b".to_owned()]);
    assert!(s.imports().is_empty());
    assert_eq!(s.next_deadline(), None);
    assert!(s.on_tick(t + STALE * 2).is_empty());
}

#[test]
fn staleness_counts_from_disconnect_while_resync_incomplete() {
    let t = t0();
    let mut s = lost_stream_with(&["a", "b"], t);
    s.on_stream_open(t + secs(60), Some(10));
    upsert(&mut s, t + secs(61), "b");
    // A second loss before the snapshot completed keeps the first clock.
    s.on_stream_closed(t + secs(62), CloseReason::Other("reset".into()), 0.0);
    assert_eq!(s.state(), &SyncState::Disconnected { since: t });
    s.on_stream_open(t + secs(70), Some(10));
    upsert(&mut s, t + secs(71), "c");
    assert_eq!(s.next_deadline(), Some(t + STALE));
    // Only what the open stream freshly confirmed survives.
    assert_eq!(s.on_tick(t + STALE), vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(names(&s), vec!["c".to_owned()]);
}

#[test]
fn completed_resync_stops_the_stale_clock() {
    let t = t0();
    let mut s = lost_stream_with(&["a"], t);
    s.on_stream_open(t + secs(1), Some(1));
    upsert(&mut s, t + secs(1), "a");
    assert_eq!(s.next_deadline(), None);
    assert!(s.on_tick(t + STALE * 3).is_empty());
    assert_eq!(names(&s), vec!["a".to_owned()]);
}

#[test]
fn backoff_doubles_caps_jitters_and_resets_after_sync() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    let delay = |s: &mut ConsumerSession, jitter: f64| match s.on_stream_closed(
        t,
        CloseReason::Other("unavailable".into()),
        jitter,
    ) {
        AfterClose::ReconnectAt(at) => at - t,
        other => panic!("expected a reconnect, got {other:?}"),
    };
    // Jitter 0 halves the base; the floor of 1 s applies.
    let low: Vec<_> = (0..5).map(|_| delay(&mut s, 0.0)).collect();
    assert_eq!(low, [secs(1), secs(2), secs(4), secs(5), secs(5)]);
    let mut s = ConsumerSession::new(settings());
    let high: Vec<_> = (0..5).map(|_| delay(&mut s, 0.999_999)).collect();
    let expected = [2.0, 4.0, 8.0, 10.0, 10.0];
    for (got, want) in high.iter().zip(expected) {
        assert!((got.as_secs_f64() - want).abs() < 0.001, "{high:?}");
    }
    assert_eq!(s.stats().reconnects, 5);
    s.on_stream_open(t, Some(0));
    assert_eq!(delay(&mut s, 0.0), secs(1));
    assert_eq!(delay(&mut s, 0.0), secs(2));
    assert_eq!(s.stats().reconnects, 7);
}

#[test]
fn backoff_below_one_second_is_raised() {
    let t = t0();
    let mut s = ConsumerSession::new(ConsumerSettings {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(200),
        ..settings()
    });
    for _ in 0..4 {
        let after = s.on_stream_closed(t, CloseReason::Other("x".into()), 0.0);
        assert_eq!(after, AfterClose::ReconnectAt(t + secs(1)));
    }
}

#[test]
fn unauthenticated_and_invalid_argument_give_up() {
    let t = t0();
    let mut s = lost_stream_with(&["a"], t);
    let after = s.on_stream_closed(t, CloseReason::Unauthenticated("who are you".into()), 0.3);
    let AfterClose::GiveUp { reason } = after else {
        panic!("expected give up")
    };
    assert!(reason.contains("who are you"));
    assert_eq!(s.state(), &SyncState::Failed { reason });
    // Imports are still served until stale.
    assert_eq!(names(&s), vec!["a".to_owned()]);
    assert_eq!(s.on_tick(t + STALE), vec!["a".to_owned()]);

    let mut s = ConsumerSession::new(settings());
    let after = s.on_stream_closed(t, CloseReason::InvalidArgument("bad url".into()), 0.3);
    assert!(matches!(after, AfterClose::GiveUp { reason } if reason.contains("bad url")));
    assert!(matches!(s.state(), SyncState::Failed { .. }));
    assert_eq!(s.stats().reconnects, 0);
}

#[test]
fn restore_drops_old_entries_and_keeps_counting_from_cache_time() {
    let now = t0();
    let mut s = ConsumerSession::new(settings());
    s.restore(
        vec![
            (svc("old", ""), STALE),
            (svc("a", ""), secs(100)),
            (svc("b", ""), secs(40)),
        ],
        now,
    );
    assert_eq!(names(&s), vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(s.imports()["a"].confirmed_at, now - secs(100));
    assert_eq!(
        s.state(),
        &SyncState::Disconnected {
            since: now - secs(40)
        }
    );
    assert_eq!(s.next_deadline(), Some(now - secs(40) + STALE));
    assert_eq!(
        s.on_tick(now - secs(40) + STALE),
        vec!["a".to_owned(), "b".to_owned()]
    );
}

#[test]
fn restored_entries_are_reconciled_like_a_lost_stream() {
    let now = t0();
    let mut s = ConsumerSession::new(settings());
    s.restore(
        vec![(svc("a", "cached"), secs(5)), (svc("b", ""), secs(5))],
        now,
    );
    s.on_stream_open(now, Some(1));
    let h = upsert(&mut s, now, "a");
    assert_eq!(h.reconciled, vec!["b".to_owned()]);
    assert_eq!(names(&s), vec!["a".to_owned()]);
    assert_eq!(s.imports()["a"].service.description, "");
}

#[test]
fn restore_with_nothing_usable_changes_nothing() {
    let now = t0();
    let mut s = ConsumerSession::new(settings());
    s.restore(vec![(svc("old", ""), STALE * 2)], now);
    assert!(s.imports().is_empty());
    assert_eq!(s.state(), &SyncState::Connecting);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn shutdown_on_purpose_deletes_everything() {
    let t = t0();
    let mut s = ConsumerSession::new(settings());
    s.on_stream_open(t, None);
    upsert(&mut s, t, "a");
    upsert(&mut s, t, "b");
    assert_eq!(
        s.shutdown_on_purpose(),
        vec!["a".to_owned(), "b".to_owned()]
    );
    assert!(s.imports().is_empty());
    assert_eq!(s.state(), &SyncState::Stopped);
    assert_eq!(s.next_deadline(), None);
    assert!(!s.stats().connected);
}

#[derive(Debug, Clone)]
enum Step {
    Open(Option<usize>),
    Close(u8, f64),
    Upsert(usize),
    BadUpsert(usize),
    Mismatch(usize),
    Delete(usize),
    Unknown(usize),
    Tick,
    /// The process restarts: a new session restores every import from
    /// the on-disk cache (its age measured from when it was confirmed).
    Restore,
}

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

fn step() -> impl Strategy<Value = Step> {
    let name = 0..NAMES.len();
    prop_oneof![
        1 => prop::option::of(0..6usize).prop_map(Step::Open),
        1 => (0..8u8, 0.0..1.0f64).prop_map(|(r, j)| Step::Close(r, j)),
        4 => name.clone().prop_map(Step::Upsert),
        1 => name.clone().prop_map(Step::BadUpsert),
        1 => name.clone().prop_map(Step::Mismatch),
        2 => name.clone().prop_map(Step::Delete),
        1 => name.prop_map(Step::Unknown),
        3 => Just(Step::Tick),
        1 => Just(Step::Restore),
    ]
}

/// The last thing the current stream said about a name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Last {
    Upserted,
    Deleted,
    Nacked { present: bool },
}

/// The open stream as the documented rules describe it.
#[derive(Debug, Clone)]
struct ModelStream {
    announced: Option<usize>,
    responses: usize,
    last_activity: Instant,
    complete: bool,
    /// Names upserted on this stream since it opened (and not deleted
    /// since): what survives the stale cut-off.
    fresh: BTreeSet<String>,
}

/// The timers of a session, from the rules in the docs of
/// [`ConsumerSession`]: the quiet period of an unannounced snapshot and
/// the staleness clock.
#[derive(Debug, Clone, Default)]
struct Timers {
    stream: Option<ModelStream>,
    stale_since: Option<Instant>,
}

impl Timers {
    fn quiet_deadline(&self) -> Option<Instant> {
        let st = self.stream.as_ref()?;
        (!st.complete && st.announced.is_none()).then(|| st.last_activity + QUIET)
    }

    fn stale_deadline(&self, stale_after: Duration) -> Option<Instant> {
        self.stale_since.map(|t| t + stale_after)
    }

    fn complete(&mut self) {
        if let Some(st) = self.stream.as_mut() {
            st.complete = true;
            st.fresh.clear();
        }
        self.stale_since = None;
    }
}

/// How often the interleavings reached each path worth reaching.
#[derive(Debug, Default)]
struct Reached {
    cut_offs: std::sync::atomic::AtomicU32,
    quiet_completions: std::sync::atomic::AtomicU32,
    restores_with_imports: std::sync::atomic::AtomicU32,
    give_ups: std::sync::atomic::AtomicU32,
}

fn bump(counter: &std::sync::atomic::AtomicU32) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Random interleavings of stream opens and losses (with give-ups),
/// responses of every kind, timer ticks and process restarts from the
/// cache, against a model of the documented rules: imports after a
/// completed snapshot, backoff bounds, the quiet-period and stale
/// deadlines to the instant, the stale cut-off keeping exactly the fresh
/// names, and what a cache restore brings back. The counts at the end
/// prove the cases reach cut-offs, quiet completions, restores and
/// give-ups.
#[test]
fn random_interleavings_keep_the_invariants() {
    let reached = Reached::default();
    // A case that once failed (from proptest-regressions, which a
    // hand-driven TestRunner does not replay).
    interleaving(
        0,
        1000,
        300,
        vec![
            (Step::Open(None), 0),
            (Step::Upsert(0), 0),
            (Step::Open(Some(2)), 0),
            (Step::Upsert(1), 0),
            (Step::Mismatch(0), 0),
        ],
        &reached,
    )
    .unwrap();
    let strategy = (
        0..3_000u64,
        1_000..20_000u64,
        1..400u64,
        prop::collection::vec((step(), 0..200_000u64), 1..60),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(512));
    runner
        .run(&strategy, |(initial_ms, max_ms, stale_s, steps)| {
            interleaving(initial_ms, max_ms, stale_s, steps, &reached)
        })
        .unwrap();
    let counts = [
        ("stale cut-offs", reached.cut_offs.into_inner()),
        (
            "quiet-period completions",
            reached.quiet_completions.into_inner(),
        ),
        (
            "restores with imports",
            reached.restores_with_imports.into_inner(),
        ),
        ("give-ups", reached.give_ups.into_inner()),
    ];
    eprintln!("reached in 512 cases: {counts:?}");
    for (what, n) in counts {
        assert!(n >= 20, "only {n} {what} in 512 cases: {counts:?}");
    }
}

fn interleaving(
    initial_ms: u64,
    max_ms: u64,
    stale_s: u64,
    steps: Vec<(Step, u64)>,
    reached: &Reached,
) -> Result<(), TestCaseError> {
    {
        let backoff_max = Duration::from_millis(max_ms);
        let stale_after = secs(stale_s);
        let settings = ConsumerSettings {
            stale_after,
            snapshot_quiet_period: QUIET,
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max,
        };
        let mut s = ConsumerSession::new(settings.clone());
        let mut now = t0();
        let mut last: BTreeMap<String, Last> = BTreeMap::new();
        let mut timers = Timers::default();
        let mut nonce = 0u64;
        for (step, advance_ms) in steps {
            now += Duration::from_millis(advance_ms);
            nonce += 1;
            let n = nonce.to_string();
            let was_complete = s.stats().snapshot_complete;
            let mut record = |s: &ConsumerSession, name: &str, event: Last| {
                let event = match event {
                    Last::Nacked { .. } => Last::Nacked {
                        present: s.imports().contains_key(name),
                    },
                    other => other,
                };
                last.insert(name.to_owned(), event);
            };
            match step {
                Step::Open(size) => {
                    last.clear();
                    if timers.stream.is_some() {
                        timers.stale_since.get_or_insert(now);
                    }
                    timers.stream = Some(ModelStream {
                        announced: size,
                        responses: 0,
                        last_activity: now,
                        complete: false,
                        fresh: BTreeSet::new(),
                    });
                    s.on_stream_open(now, size);
                    if size == Some(0) {
                        timers.complete();
                    }
                }
                Step::Close(kind, jitter) => {
                    let reason = match kind {
                        0 => CloseReason::Unauthenticated("no".into()),
                        1 => CloseReason::InvalidArgument("bad".into()),
                        _ => CloseReason::Other("unavailable".into()),
                    };
                    last.clear();
                    timers.stream = None;
                    let since = *timers.stale_since.get_or_insert(now);
                    match s.on_stream_closed(now, reason, jitter) {
                        AfterClose::ReconnectAt(at) => {
                            prop_assert!(kind >= 2);
                            let delay = at - now;
                            prop_assert!(delay >= secs(1), "{delay:?}");
                            prop_assert!(delay <= backoff_max.max(secs(1)), "{delay:?}");
                            prop_assert_eq!(s.state(), &SyncState::Disconnected { since });
                        }
                        AfterClose::GiveUp { reason } => {
                            bump(&reached.give_ups);
                            prop_assert!(kind < 2);
                            prop_assert_eq!(s.state(), &SyncState::Failed { reason });
                        }
                    }
                }
                Step::Upsert(i) | Step::BadUpsert(i) | Step::Mismatch(i) | Step::Unknown(i) => {
                    let name = NAMES[i];
                    let (op, service) = match step {
                        Step::Upsert(_) => (Operation::Upsert, Ok(svc(name, &n))),
                        Step::BadUpsert(_) => (Operation::Upsert, Err("bad".into())),
                        Step::Mismatch(_) => (Operation::Upsert, Ok(svc("other", &n))),
                        _ => (Operation::Unknown(7), Ok(svc(name, &n))),
                    };
                    let open = s.stats().connected;
                    let event = if matches!(step, Step::Upsert(_)) && open {
                        Last::Upserted
                    } else {
                        Last::Nacked { present: false }
                    };
                    if open {
                        record(&s, name, event);
                    }
                    let handled = s.on_response(now, &n, name, op, service);
                    let acked = matches!(handled.reply, Reply::Ack { .. });
                    prop_assert_eq!(acked, event == Last::Upserted);
                    if let Some(st) = timers.stream.as_mut() {
                        if acked {
                            st.fresh.insert(name.to_owned());
                            prop_assert_eq!(&s.imports()[name].confirmed_at, &now);
                        }
                        st.responses += 1;
                        st.last_activity = now;
                        if st.announced.is_some_and(|a| st.responses >= a) && !st.complete {
                            timers.complete();
                        }
                    }
                }
                Step::Delete(i) => {
                    if s.stats().connected {
                        record(&s, NAMES[i], Last::Deleted);
                    }
                    let handled =
                        s.on_response(now, &n, NAMES[i], Operation::Delete, Err("gone".into()));
                    prop_assert!(!s.imports().contains_key(NAMES[i]) || timers.stream.is_none());
                    if let Some(st) = timers.stream.as_mut() {
                        prop_assert!(matches!(handled.reply, Reply::Ack { .. }), "{:?}", handled);
                        st.fresh.remove(NAMES[i]);
                        st.responses += 1;
                        st.last_activity = now;
                        if st.announced.is_some_and(|a| st.responses >= a) && !st.complete {
                            timers.complete();
                        }
                    }
                }
                Step::Tick => {
                    let before: BTreeSet<String> = s.imports().keys().cloned().collect();
                    let quiet = timers.quiet_deadline().is_some_and(|d| now >= d);
                    let stale = timers.stale_deadline(stale_after).is_some_and(|d| now >= d);
                    let dropped = s.on_tick(now);
                    let after: BTreeSet<String> = s.imports().keys().cloned().collect();
                    let removed: BTreeSet<String> = before.difference(&after).cloned().collect();
                    prop_assert_eq!(&dropped.iter().cloned().collect::<BTreeSet<_>>(), &removed);
                    if quiet {
                        // The quiet period completes the snapshot first.
                        prop_assert!(s.stats().snapshot_complete);
                        bump(&reached.quiet_completions);
                        timers.complete();
                    } else if stale {
                        // The cut-off: exactly the names not fresh on the open stream go.
                        if !dropped.is_empty() {
                            bump(&reached.cut_offs);
                        }
                        let empty = BTreeSet::new();
                        let fresh = timers.stream.as_ref().map_or(&empty, |st| &st.fresh);
                        let kept: BTreeSet<String> = before.intersection(fresh).cloned().collect();
                        prop_assert_eq!(&after, &kept);
                        timers.stale_since = None;
                        for name in &dropped {
                            if let Some(l @ Last::Nacked { .. }) = last.get_mut(name) {
                                *l = Last::Nacked { present: false };
                            }
                        }
                    } else {
                        // Before either deadline, a tick changes nothing.
                        prop_assert!(dropped.is_empty());
                        prop_assert_eq!(s.stats().snapshot_complete, was_complete);
                    }
                }
                Step::Restore => {
                    // What the cache holds: every import with its age.
                    let entries: Vec<(FederatedService, Duration)> = s
                        .imports()
                        .values()
                        .map(|i| ((*i.service).clone(), now - i.confirmed_at))
                        .collect();
                    let kept: Vec<String> = entries
                        .iter()
                        .filter(|(_, age)| *age < stale_after)
                        .map(|(svc, _)| svc.name.clone())
                        .collect();
                    let youngest = entries
                        .iter()
                        .map(|(_, age)| *age)
                        .filter(|age| *age < stale_after)
                        .min();
                    s = ConsumerSession::new(settings.clone());
                    s.restore(entries, now);
                    last.clear();
                    timers = Timers {
                        stream: None,
                        stale_since: youngest.map(|age| now - age),
                    };
                    prop_assert_eq!(names(&s), kept);
                    if youngest.is_some() {
                        bump(&reached.restores_with_imports);
                    }
                    match youngest {
                        Some(age) => prop_assert_eq!(
                            s.state(),
                            &SyncState::Disconnected { since: now - age }
                        ),
                        None => prop_assert_eq!(s.state(), &SyncState::Connecting),
                    }
                }
            }
            // The deadlines, to the instant.
            let expected = match (timers.quiet_deadline(), timers.stale_deadline(stale_after)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            prop_assert_eq!(s.next_deadline(), expected, "{:?}", timers);
            let stats = s.stats();
            prop_assert_eq!(stats.connected, timers.stream.is_some());
            prop_assert_eq!(
                stats.snapshot_complete,
                timers.stream.as_ref().is_some_and(|st| st.complete)
            );
            if stats.snapshot_complete {
                prop_assert_eq!(s.state(), &SyncState::Synced);
                let expected: Vec<String> = last
                    .iter()
                    .filter(|(_, l)| matches!(l, Last::Upserted | Last::Nacked { present: true }))
                    .map(|(name, _)| name.clone())
                    .collect();
                prop_assert_eq!(names(&s), expected, "just completed: {}", !was_complete);
            }
        }
    }
    Ok(())
}
