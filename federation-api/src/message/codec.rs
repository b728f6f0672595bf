//! The codec between the version-neutral [`Request`]/[`Response`] and the
//! generated stream messages of each Hamlet version: v1alpha2 wraps both
//! directions in `BidirectionalStream`; v1alpha1 has a plain
//! `StreamRequest`/`StreamResponse`, no `context`, no `resource_id`, and
//! CREATE/UPDATE instead of UPSERT. tonic frames and (de)serializes the
//! generated messages; this file only maps fields, and every proto struct is
//! destructured without `..` so a new field fails to compile here. Decoding
//! never panics on peer input: a message it cannot read is a typed error.

use std::sync::Arc;

use prost::Message;

use super::{Operation, Rejected, Request, RequestError, Response, ResponseError, Status};
use crate::convert::{decode_any, encode_any, type_url};
use crate::domain::ApiVersion;
use crate::proto::federation::resourcediscovery::{v1alpha1 as rd1, v1alpha2 as rd2};
use crate::proto::federation::types::v1alpha1 as t1;
use crate::proto::google::rpc;

fn status_to_wire(status: &Status) -> rpc::Status {
    rpc::Status {
        code: status.code,
        message: status.message.clone(),
        details: vec![],
    }
}

fn status_from_wire(status: rpc::Status) -> Status {
    let rpc::Status {
        code,
        message,
        details: _,
    } = status;
    Status { code, message }
}

impl Request {
    /// The v1alpha2 wrapper carrying this request.
    pub fn to_v1alpha2(&self) -> rd2::BidirectionalStream {
        rd2::BidirectionalStream {
            request: Some(rd2::StreamRequest {
                resource_url: self.resource_url.clone(),
                response_nonce: self.response_nonce.clone(),
                status: self.status.as_ref().map(status_to_wire),
                context: self.context.clone(),
            }),
            response: None,
        }
    }

    /// The request in a v1alpha2 wrapper; a wrapper without one is an error.
    pub fn from_v1alpha2(m: rd2::BidirectionalStream) -> Result<Request, RequestError> {
        let rd2::BidirectionalStream {
            request,
            response: _,
        } = m;
        let rd2::StreamRequest {
            resource_url,
            response_nonce,
            status,
            context,
        } = request.ok_or(RequestError::NotARequest)?;
        Ok(Request {
            resource_url,
            response_nonce,
            status: status.map(status_from_wire),
            context,
        })
    }

    /// The v1alpha1 request; `context` has no field there and is dropped.
    pub fn to_v1alpha1(&self) -> rd1::StreamRequest {
        rd1::StreamRequest {
            resource_url: self.resource_url.clone(),
            response_nonce: self.response_nonce.clone(),
            status: self.status.as_ref().map(status_to_wire),
        }
    }

    /// A v1alpha1 request (every field optional, so it always reads).
    pub fn from_v1alpha1(m: rd1::StreamRequest) -> Request {
        let rd1::StreamRequest {
            resource_url,
            response_nonce,
            status,
        } = m;
        Request {
            resource_url,
            response_nonce,
            status: status.map(status_from_wire),
            context: String::new(),
        }
    }
}

impl Response {
    /// The v1alpha2 wrapper carrying this response. A delete carries no
    /// resource: `resource_id` names the service.
    pub fn to_v1alpha2(&self) -> rd2::BidirectionalStream {
        let version = ApiVersion::V1alpha2;
        let (operation, resource) = match &self.operation {
            Operation::Upsert { service, .. } => (
                rd2::stream_response::Operation::Upsert,
                Some(encode_any(service, version)),
            ),
            Operation::Delete => (rd2::stream_response::Operation::Delete, None),
        };
        rd2::BidirectionalStream {
            request: None,
            response: Some(rd2::StreamResponse {
                nonce: self.nonce.clone(),
                resource_url: type_url(version).to_owned(),
                resource_id: self.resource_id.clone(),
                resource,
                operation: operation as i32,
                context: self.context.clone(),
            }),
        }
    }

    /// The response in a v1alpha2 wrapper. An UPSERT's resource is decoded
    /// and validated; a DELETE's resource, if any, is ignored.
    pub fn from_v1alpha2(m: rd2::BidirectionalStream) -> Result<Response, Rejected> {
        use rd2::stream_response::Operation as Op2;
        let rd2::BidirectionalStream {
            request: _,
            response,
        } = m;
        let Some(response) = response else {
            return Err(Rejected {
                nonce: String::new(),
                resource_id: String::new(),
                error: ResponseError::NotAResponse,
            });
        };
        let rd2::StreamResponse {
            nonce,
            resource_url: _,
            resource_id,
            resource,
            operation,
            context,
        } = response;
        let decoded = match Op2::try_from(operation) {
            Ok(Op2::Upsert) => match resource {
                Some(any) => decode_any(&any, ApiVersion::V1alpha2)
                    .map(|service| Operation::Upsert {
                        service: Arc::new(service),
                        created: false,
                    })
                    .map_err(ResponseError::from),
                None => Err(ResponseError::MissingResource {
                    operation: "UPSERT",
                }),
            },
            Ok(Op2::Delete) => Ok(Operation::Delete),
            Ok(Op2::Unknown) | Err(_) => Err(ResponseError::UnknownOperation {
                code: operation,
                expected: "UPSERT or DELETE",
            }),
        };
        match decoded {
            Ok(operation) => Ok(Response {
                nonce,
                resource_id,
                operation,
                context,
            }),
            Err(error) => Err(Rejected {
                nonce,
                resource_id,
                error,
            }),
        }
    }

    /// The v1alpha1 response. It has no `resource_id`, so a delete carries a
    /// resource holding only the name; `context` has no field and is dropped.
    pub fn to_v1alpha1(&self) -> rd1::StreamResponse {
        let version = ApiVersion::V1alpha1;
        let (operation, resource) = match &self.operation {
            Operation::Upsert { service, created } => (
                if *created {
                    rd1::stream_response::Operation::Create
                } else {
                    rd1::stream_response::Operation::Update
                },
                encode_any(service, version),
            ),
            Operation::Delete => (
                rd1::stream_response::Operation::Delete,
                prost_types::Any {
                    type_url: type_url(version).to_owned(),
                    value: t1::FederatedService {
                        name: self.resource_id.clone(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                },
            ),
        };
        rd1::StreamResponse {
            nonce: self.nonce.clone(),
            resource_url: type_url(version).to_owned(),
            resource: Some(resource),
            operation: operation as i32,
        }
    }

    /// A v1alpha1 response. The name comes from the resource: the decoded
    /// service for CREATE/UPDATE (empty if it did not decode), and for a
    /// DELETE the `name` field of whatever the resource holds (it is not
    /// validated: the service is going away), empty if it holds nothing.
    pub fn from_v1alpha1(m: rd1::StreamResponse) -> Result<Response, Rejected> {
        use rd1::stream_response::Operation as Op1;
        let rd1::StreamResponse {
            nonce,
            resource_url: _,
            resource,
            operation,
        } = m;
        let (decoded, resource_id) = match Op1::try_from(operation) {
            Ok(op @ (Op1::Create | Op1::Update)) => match resource {
                Some(any) => match decode_any(&any, ApiVersion::V1alpha1) {
                    Ok(service) => {
                        let name = service.name.clone();
                        let upsert = Operation::Upsert {
                            service: Arc::new(service),
                            created: op == Op1::Create,
                        };
                        (Ok(upsert), name)
                    }
                    Err(e) => (Err(ResponseError::Resource(e)), String::new()),
                },
                None => (
                    Err(ResponseError::MissingResource {
                        operation: "CREATE/UPDATE",
                    }),
                    String::new(),
                ),
            },
            Ok(Op1::Delete) => {
                let name = resource
                    .and_then(|any| t1::FederatedService::decode(any.value.as_slice()).ok())
                    .map(|s| s.name)
                    .unwrap_or_default();
                (Ok(Operation::Delete), name)
            }
            Ok(Op1::Unknown) | Err(_) => (
                Err(ResponseError::UnknownOperation {
                    code: operation,
                    expected: "CREATE, UPDATE or DELETE",
                }),
                String::new(),
            ),
        };
        match decoded {
            Ok(operation) => Ok(Response {
                nonce,
                resource_id,
                operation,
                context: String::new(),
            }),
            Err(error) => Err(Rejected {
                nonce,
                resource_id,
                error,
            }),
        }
    }
}
