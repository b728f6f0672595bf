//! Hamlet federation messages as a consumer receives them from a peer: the
//! first input byte picks what the rest is.
//!
//! * 0, 1: a `FederatedService` (v1alpha2, v1alpha1) packed in an `Any`,
//!   decoded, normalized and validated by `decode_any` (federation-api).
//! * 2, 3: a whole stream message (v1alpha2 `BidirectionalStream`, v1alpha1
//!   `StreamResponse`), read by the codec the consumer task uses
//!   (`elsinore_federation_api::message`) and handed to the consumer session
//!   state machine (`gateway/src/federation/consumer/session.rs`).
//!
//! Beyond "does not crash": a decoded service passes `validate` for its
//! version; encoding it again and decoding that gives the same service
//! (decode → encode → decode is the identity, for both versions); prost
//! re-encodes a decoded message to one that decodes equal; an upsert the
//! session ACKs stores exactly the decoded service under its name, and a
//! NACK changes no import.
#![no_main]

use elsinore_federation_api::message::{Operation, Rejected, Response};
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use elsinore_federation_api::proto::federation::types::{v1alpha1 as t1, v1alpha2 as t2};
use elsinore_federation_api::{ApiVersion, FederatedService, decode_any, encode_any, type_url};
use elsinore_gateway::federation::consumer::session::{
    Change, ConsumerSession, ConsumerSettings, Reply,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::time::Duration;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            prost_round_trip::<t2::FederatedService>(bytes);
            service(bytes, ApiVersion::V1alpha2);
        }
        1 => {
            prost_round_trip::<t1::FederatedService>(bytes);
            service(bytes, ApiVersion::V1alpha1);
        }
        2 => {
            let Some(m) = prost_round_trip::<rd2::BidirectionalStream>(bytes) else {
                return;
            };
            if m.response.is_none() {
                return;
            }
            session(Response::from_v1alpha2(m), ApiVersion::V1alpha2);
        }
        _ => {
            let Some(r) = prost_round_trip::<rd1::StreamResponse>(bytes) else {
                return;
            };
            session(Response::from_v1alpha1(r), ApiVersion::V1alpha1);
        }
    }
});

/// Decodes `bytes` as `M`; if that works, its encoding must decode equal.
fn prost_round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("prost's own encoding decodes");
    assert_eq!(again, m, "prost decode → encode → decode");
    Some(m)
}

fn service(bytes: &[u8], version: ApiVersion) {
    let any = prost_types::Any {
        type_url: type_url(version).to_owned(),
        value: bytes.to_vec(),
    };
    let _ = checked_decode(&any, version);
}

/// `decode_any` with the invariants of a decoded service checked.
fn checked_decode(any: &prost_types::Any, version: ApiVersion) -> Result<FederatedService, String> {
    let svc = decode_any(any, version).map_err(|e| e.to_string())?;
    check_decoded(&svc, version);
    Ok(svc)
}

/// A decoded service validates, and encodes to what decodes equal.
fn check_decoded(svc: &FederatedService, version: ApiVersion) {
    if let Err(e) = svc.validate(version) {
        panic!("decode_any accepted a service that fails validation: {e}");
    }
    let again = decode_any(&encode_any(svc, version), version)
        .unwrap_or_else(|e| panic!("a decoded service, encoded again, fails to decode: {e}"));
    assert_eq!(&again, svc, "decode → encode → decode ({version:?})");
}

/// One response, read as the consumer's stream does, handed to a fresh
/// session: an ACK or a NACK, and the imports moved accordingly.
fn session(received: Result<Response, Rejected>, version: ApiVersion) {
    let (nonce, upserted) = match &received {
        Ok(r) => match &r.operation {
            Operation::Upsert { service, .. } => {
                check_decoded(service, version);
                (r.nonce.clone(), Some(service.clone()))
            }
            Operation::Delete => (r.nonce.clone(), None),
        },
        Err(rejected) => (rejected.nonce.clone(), None),
    };
    let nonce = nonce.as_str();
    let now = tokio::time::Instant::now();
    let mut s = ConsumerSession::new(ConsumerSettings {
        stale_after: Duration::from_secs(60),
        snapshot_quiet_period: Duration::from_secs(5),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(30),
    });
    s.on_stream_open(now, None);
    let before = s.imports().clone();
    let handled = s.on_message(now, received);
    match (&handled.reply, &handled.change) {
        (Reply::Ack { nonce: n }, Change::Upserted(name)) => {
            assert_eq!(n, nonce);
            let svc = upserted.expect("an upsert that was ACKed decoded");
            assert_eq!(&svc.name, name);
            assert_eq!(*s.imports()[name].service, *svc);
        }
        (Reply::Ack { .. }, _) => {
            assert!(upserted.is_none(), "an upsert ACKed without a change");
        }
        (Reply::Nack { nonce: n, message }, change) => {
            assert_eq!(n, nonce);
            assert!(!message.is_empty(), "a NACK without a reason");
            assert_eq!(*change, Change::Unchanged);
            assert_eq!(s.imports(), &before, "a NACK changed the imports");
        }
    }
}
