//! Tests for the version-neutral messages and their codec: a round trip per
//! version and direction, the wire facts each version fixes (NACK code,
//! what a v1alpha1 delete carries, where the context goes), and every typed
//! error with the text a peer sees in our NACK or stream status.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use super::*;
use crate::convert::{TYPE_URL_V1ALPHA1, TYPE_URL_V1ALPHA2, from_v1alpha1};
use crate::proto::federation::resourcediscovery::{v1alpha1 as rd1, v1alpha2 as rd2};
use crate::proto::federation::types::{v1alpha1 as t1, v1alpha2 as t2};

fn service_v2() -> Arc<FederatedService> {
    let wire = t2::FederatedService {
        name: "reviews".into(),
        description: "book reviews".into(),
        tags: vec!["books".into()],
        labels: HashMap::from([("team".into(), "bookinfo".into())]),
        fqdn: "reviews.mesh-a.global".into(),
        endpoints: vec![t2::federated_service::Endpoint {
            address: "192.0.2.10".into(),
            port: 15443,
            labels: vec!["zone-a".into()],
            description: "ingress".into(),
        }],
        sans: vec!["spiffe://mesh-a/ns/gw/sa/elsinore".into()],
        instances: vec![t2::federated_service::Instance {
            id: "v1".into(),
            protocol: "HTTP".into(),
            metadata: HashMap::from([("SNI".into(), "reviews.mesh-a.internal".into())]),
            endpoint_selector: vec!["zone-a".into()],
            description: String::new(),
        }],
    };
    Arc::new(FederatedService::try_from(wire).unwrap())
}

fn service_v1() -> Arc<FederatedService> {
    let wire = t1::FederatedService {
        name: "ratings".into(),
        description: "stars".into(),
        tags: vec![],
        labels: HashMap::new(),
        fqdn: "ratings.mesh-a.global".into(),
        id: "ratings".into(),
        san: "spiffe://mesh-a/ns/gw/sa/elsinore".into(),
        protocols: vec!["HTTP".into()],
        endpoints: vec![t1::federated_service::Endpoint {
            address: "192.0.2.11".into(),
            port: 443,
        }],
    };
    Arc::new(from_v1alpha1(wire).unwrap())
}

fn upsert(service: Arc<FederatedService>, created: bool, context: &str) -> Response {
    Response {
        nonce: "n-1".into(),
        resource_id: service.name.clone(),
        operation: Operation::Upsert { service, created },
        context: context.into(),
    }
}

fn delete(name: &str, context: &str) -> Response {
    Response {
        nonce: "n-2".into(),
        resource_id: name.into(),
        operation: Operation::Delete,
        context: context.into(),
    }
}

/// Through the bytes, as tonic would carry them.
fn over_the_wire<M: Message + Default>(m: &M) -> M {
    M::decode(m.encode_to_vec().as_slice()).unwrap()
}

fn v2_response(r: rd2::StreamResponse) -> rd2::BidirectionalStream {
    rd2::BidirectionalStream {
        request: None,
        response: Some(r),
    }
}

#[test]
fn v1alpha2_requests_round_trip() {
    let v = ApiVersion::V1alpha2;
    for request in [
        Request::initial(v, "elsinore/mesh-b".into()),
        Request::ack(v, "n-1".into(), "elsinore/mesh-b".into()),
        Request::nack(v, "n-2".into(), "bad fqdn".into(), "elsinore/mesh-b".into()),
    ] {
        let wire = over_the_wire(&request.to_v1alpha2());
        assert_eq!(wire.response, None);
        assert_eq!(Request::from_v1alpha2(wire), Ok(request));
    }
}

#[test]
fn v1alpha1_requests_round_trip_without_context() {
    let v = ApiVersion::V1alpha1;
    for request in [
        Request::initial(v, String::new()),
        Request::ack(v, "n-1".into(), String::new()),
        Request::nack(v, "n-2".into(), "bad fqdn".into(), String::new()),
    ] {
        let wire = over_the_wire(&request.to_v1alpha1());
        assert_eq!(Request::from_v1alpha1(wire), request);
    }
    // v1alpha1 has no context field: what the caller set does not travel.
    let with_context = Request::initial(v, "elsinore/mesh-b".into());
    assert_eq!(
        Request::from_v1alpha1(with_context.to_v1alpha1()).context,
        ""
    );
}

#[test]
fn requests_carry_the_version_url_and_ack_nack_codes() {
    let first = Request::initial(ApiVersion::V1alpha2, "ctx".into());
    assert!(first.is_initial());
    assert_eq!(first.resource_url, TYPE_URL_V1ALPHA2);
    let ack = Request::ack(ApiVersion::V1alpha1, "n-1".into(), String::new());
    assert!(!ack.is_initial());
    assert_eq!(ack.resource_url, TYPE_URL_V1ALPHA1);
    assert_eq!(ack.status.as_ref().map(|s| s.code), Some(0));
    let nack = Request::nack(
        ApiVersion::V1alpha2,
        "n-2".into(),
        "why".into(),
        "ctx".into(),
    );
    // INVALID_ARGUMENT, with the reason, on the wire.
    let wire = nack.to_v1alpha2().request.unwrap().status.unwrap();
    assert_eq!((wire.code, wire.message.as_str()), (3, "why"));
    assert!(wire.details.is_empty());
    // A nonce alone (no status) is not a first request.
    let bare = Request {
        status: None,
        ..ack
    };
    assert!(!bare.is_initial());
}

#[test]
fn v1alpha2_responses_round_trip() {
    for response in [
        upsert(service_v2(), false, "elsinore/mesh-b"),
        delete("reviews", "elsinore/mesh-b"),
    ] {
        let wire = over_the_wire(&response.to_v1alpha2());
        assert_eq!(wire.request, None);
        assert_eq!(Response::from_v1alpha2(wire), Ok(response));
    }
}

#[test]
fn v1alpha2_has_no_create_and_sends_no_resource_on_delete() {
    // `created` is a v1alpha1 distinction; v1alpha2 reads every upsert as not created.
    let sent = upsert(service_v2(), true, "");
    let got = Response::from_v1alpha2(sent.to_v1alpha2()).unwrap();
    assert_eq!(got, upsert(service_v2(), false, ""));
    let wire = delete("reviews", "ctx").to_v1alpha2().response.unwrap();
    assert_eq!(wire.resource, None);
    assert_eq!(wire.resource_id, "reviews");
    assert_eq!(wire.resource_url, TYPE_URL_V1ALPHA2);
    assert_eq!(wire.context, "ctx");
}

#[test]
fn v1alpha1_responses_round_trip() {
    for response in [
        upsert(service_v1(), true, ""),
        upsert(service_v1(), false, ""),
        delete("ratings", ""),
    ] {
        let wire = over_the_wire(&response.to_v1alpha1());
        assert_eq!(Response::from_v1alpha1(wire), Ok(response));
    }
}

#[test]
fn v1alpha1_spells_create_update_and_names_a_delete_inside_the_resource() {
    use rd1::stream_response::Operation as Op1;
    let create = upsert(service_v1(), true, "dropped").to_v1alpha1();
    assert_eq!(create.operation, Op1::Create as i32);
    assert_eq!(create.resource_url, TYPE_URL_V1ALPHA1);
    let update = upsert(service_v1(), false, "").to_v1alpha1();
    assert_eq!(update.operation, Op1::Update as i32);
    let gone = delete("ratings", "").to_v1alpha1();
    assert_eq!(gone.operation, Op1::Delete as i32);
    let any = gone.resource.unwrap();
    assert_eq!(any.type_url, TYPE_URL_V1ALPHA1);
    let inside = t1::FederatedService::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        inside,
        t1::FederatedService {
            name: "ratings".into(),
            ..Default::default()
        }
    );
    // The context has no v1alpha1 field.
    let back = Response::from_v1alpha1(create).unwrap();
    assert_eq!(back.context, "");
}

#[test]
fn v1alpha1_delete_without_a_readable_resource_names_nothing() {
    let mut wire = delete("ratings", "").to_v1alpha1();
    wire.resource = None;
    let got = Response::from_v1alpha1(wire.clone()).unwrap();
    assert_eq!(
        (got.resource_id.as_str(), got.operation),
        ("", Operation::Delete)
    );
    wire.resource = Some(prost_types::Any {
        type_url: TYPE_URL_V1ALPHA1.into(),
        value: vec![0xff, 0xff],
    });
    assert_eq!(Response::from_v1alpha1(wire).unwrap().resource_id, "");
}

#[test]
fn a_v1alpha2_wrapper_without_a_request_is_not_a_request() {
    let err = Request::from_v1alpha2(delete("reviews", "").to_v1alpha2()).unwrap_err();
    assert_eq!(err, RequestError::NotARequest);
    // The owner's stream status; unchanged since it first went on the wire.
    assert_eq!(
        err.to_string(),
        "expected a request, got a response: the peer pushes as an owner on a stream where it should consume"
    );
    let empty = rd2::BidirectionalStream::default();
    assert_eq!(
        Request::from_v1alpha2(empty),
        Err(RequestError::NotARequest)
    );
}

#[test]
fn a_v1alpha2_wrapper_without_a_response_is_not_a_response() {
    let request = Request::ack(ApiVersion::V1alpha2, "n-1".into(), String::new());
    let err = Response::from_v1alpha2(request.to_v1alpha2()).unwrap_err();
    assert_eq!(err.error, ResponseError::NotAResponse);
    assert_eq!((err.nonce.as_str(), err.resource_id.as_str()), ("", ""));
}

#[test]
fn an_upsert_without_a_resource_is_rejected_naming_the_operation() {
    let mut wire = upsert(service_v2(), false, "").to_v1alpha2();
    if let Some(r) = wire.response.as_mut() {
        r.resource = None;
    }
    let err = Response::from_v1alpha2(wire).unwrap_err();
    assert_eq!(
        err.error,
        ResponseError::MissingResource {
            operation: "UPSERT"
        }
    );
    assert_eq!(
        (err.nonce.as_str(), err.resource_id.as_str()),
        ("n-1", "reviews")
    );
    assert_eq!(err.to_string(), "UPSERT without a resource");

    let mut wire = upsert(service_v1(), true, "").to_v1alpha1();
    wire.resource = None;
    let err = Response::from_v1alpha1(wire).unwrap_err();
    assert_eq!(
        err.error,
        ResponseError::MissingResource {
            operation: "CREATE/UPDATE"
        }
    );
    assert_eq!((err.nonce.as_str(), err.resource_id.as_str()), ("n-1", ""));
    assert_eq!(err.to_string(), "CREATE/UPDATE without a resource");
}

#[test]
fn an_unknown_operation_is_rejected_with_its_code() {
    for code in [0, 7] {
        let wire = v2_response(rd2::StreamResponse {
            nonce: "n-9".into(),
            resource_id: "reviews".into(),
            operation: code,
            ..Default::default()
        });
        let err = Response::from_v1alpha2(wire).unwrap_err();
        assert_eq!(
            err.error,
            ResponseError::UnknownOperation {
                code,
                expected: "UPSERT or DELETE"
            }
        );
        assert_eq!(
            (err.nonce.as_str(), err.resource_id.as_str()),
            ("n-9", "reviews")
        );
        assert_eq!(
            err.to_string(),
            format!("operation {code} is not UPSERT or DELETE")
        );

        let mut wire = upsert(service_v1(), true, "").to_v1alpha1();
        wire.operation = code;
        let err = Response::from_v1alpha1(wire).unwrap_err();
        assert_eq!(
            err.error,
            ResponseError::UnknownOperation {
                code,
                expected: "CREATE, UPDATE or DELETE"
            }
        );
        assert_eq!(err.resource_id, "");
        assert_eq!(
            err.to_string(),
            format!("operation {code} is not CREATE, UPDATE or DELETE")
        );
    }
}

#[test]
fn a_resource_that_does_not_decode_is_rejected_with_the_decode_error() {
    // v1alpha2: a v1alpha1 resource where a v1alpha2 one belongs.
    let mut wire = upsert(service_v2(), false, "").to_v1alpha2();
    if let Some(r) = wire.response.as_mut() {
        r.resource = Some(crate::convert::encode_any(
            &service_v1(),
            ApiVersion::V1alpha1,
        ));
    }
    let err = Response::from_v1alpha2(wire).unwrap_err();
    let expected = DecodeError::WrongTypeUrl {
        expected: TYPE_URL_V1ALPHA2,
        got: TYPE_URL_V1ALPHA1.into(),
    };
    assert_eq!(err.to_string(), expected.to_string());
    assert_eq!(err.error, ResponseError::Resource(expected));
    assert_eq!(err.resource_id, "reviews");

    // v1alpha1: bytes that are no protobuf message; no name can be read.
    let mut wire = upsert(service_v1(), false, "").to_v1alpha1();
    wire.resource = Some(prost_types::Any {
        type_url: TYPE_URL_V1ALPHA1.into(),
        value: vec![0xff, 0xff],
    });
    let err = Response::from_v1alpha1(wire).unwrap_err();
    assert!(
        matches!(err.error, ResponseError::Resource(DecodeError::Protobuf(_))),
        "{err:?}"
    );
    assert_eq!((err.nonce.as_str(), err.resource_id.as_str()), ("n-1", ""));
}

#[test]
fn a_delete_ignores_whatever_v1alpha2_resource_comes_with_it() {
    let wire = v2_response(rd2::StreamResponse {
        nonce: "n-3".into(),
        resource_id: "reviews".into(),
        resource: Some(prost_types::Any {
            type_url: "nonsense".into(),
            value: vec![0xff],
        }),
        operation: rd2::stream_response::Operation::Delete as i32,
        ..Default::default()
    });
    assert_eq!(
        Response::from_v1alpha2(wire),
        Ok(Response {
            nonce: "n-3".into(),
            resource_id: "reviews".into(),
            operation: Operation::Delete,
            context: String::new(),
        })
    );
}
