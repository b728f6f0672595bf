//! The messages of a Hamlet stream, independent of the API version: the
//! consumer's [`Request`] (first request, ACK, NACK) and the owner's
//! [`Response`] (an upsert or a delete of one service), plus the two
//! metadata headers Elsinore adds on top of the spec. The gateway's owner
//! and consumer speak only these; [`codec`] turns them into the generated
//! `v1alpha2`/`v1alpha1` protos and back, and names what was wrong with a
//! message it cannot read ([`RequestError`], [`ResponseError`]). Like
//! tonic's xds-client, the session logic sees crate-owned types and the
//! codec alone knows the generated ones. This module does no I/O and keeps
//! no state: which nonce is in flight or whether a request is the first one
//! is the sessions' business, not the codec's.

use std::sync::Arc;

use crate::convert::{DecodeError, type_url};
use crate::domain::{ApiVersion, FederatedService};

pub mod codec;

/// Response metadata (owner → consumer): how many messages form the initial
/// snapshot, so a consumer knows when it is complete. Foreign peers ignore it.
pub const SNAPSHOT_SIZE_HEADER: &str = "elsinore-snapshot-size";
/// Request metadata (consumer → owner) asking for a window of in-flight
/// messages; the owner answers with the window it grants. Only sent and
/// honoured between Elsinore gateways.
pub const WINDOW_HEADER: &str = "elsinore-window";
/// Response metadata (owner → consumer), binary (gRPC `-bin`: base64 on the
/// wire): the PEM CA certificates the owner's own certificates chain to, so
/// an Elsinore consumer that follows this peer's bundle can take a CA
/// rollover without a config edit. Foreign peers ignore it.
pub const TRUST_BUNDLE_HEADER: &str = "elsinore-trust-bundle-bin";

/// gRPC `OK`: a request with this status code is an ACK.
const CODE_OK: i32 = 0;
/// gRPC `INVALID_ARGUMENT`: the code of every NACK we send.
const CODE_INVALID_ARGUMENT: i32 = 3;

/// The `status` of a request (a `google.rpc.Status`; its `details` are
/// neither sent nor read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// 0 is an ACK, anything else a NACK.
    pub code: i32,
    /// The consumer's reason for a NACK.
    pub message: String,
}

/// Consumer → owner: the first request of a stream (no nonce, no status),
/// or the ACK/NACK of one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The `FederatedService` type URL of the version spoken; the owner
    /// checks it on the first request.
    pub resource_url: String,
    /// The nonce of the response this request answers; empty on the first.
    pub response_nonce: String,
    /// Absent on the first request; code 0 = ACK, anything else = NACK.
    pub status: Option<Status>,
    /// Set by the consumer, echoed by the owner (v1alpha2 only; v1alpha1
    /// has no such field and always reads as empty).
    pub context: String,
}

impl Request {
    /// The first request of a stream in `version`.
    pub fn initial(version: ApiVersion, context: String) -> Request {
        Request {
            resource_url: type_url(version).to_owned(),
            response_nonce: String::new(),
            status: None,
            context,
        }
    }

    /// Accepts the response that carried `nonce`.
    pub fn ack(version: ApiVersion, nonce: String, context: String) -> Request {
        Request::answer(version, nonce, CODE_OK, String::new(), context)
    }

    /// Rejects the response that carried `nonce`, with `INVALID_ARGUMENT`
    /// and `message` naming the resource and the problem.
    pub fn nack(version: ApiVersion, nonce: String, message: String, context: String) -> Request {
        Request::answer(version, nonce, CODE_INVALID_ARGUMENT, message, context)
    }

    fn answer(
        version: ApiVersion,
        nonce: String,
        code: i32,
        message: String,
        context: String,
    ) -> Request {
        Request {
            resource_url: type_url(version).to_owned(),
            response_nonce: nonce,
            status: Some(Status { code, message }),
            context,
        }
    }

    /// True for what the spec calls the first request: no nonce and no
    /// status.
    pub fn is_initial(&self) -> bool {
        self.status.is_none() && self.response_nonce.is_empty()
    }
}

/// What one owner response asks the consumer to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// Create or replace the service, sent whole. `created` is true when the
    /// consumer does not have the name from this stream: v1alpha1 says
    /// CREATE for it and UPDATE otherwise. v1alpha2 has only UPSERT, so an
    /// upsert decoded from v1alpha2 always reads `created: false`.
    Upsert {
        service: Arc<FederatedService>,
        created: bool,
    },
    /// Remove the service named by the response's `resource_id`.
    Delete,
}

/// Owner → consumer: one service, upserted or deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Unique per stream; the consumer echoes it in its ACK/NACK.
    pub nonce: String,
    /// The service name. v1alpha1 has no `resource_id` field: the name
    /// travels inside the resource, also for a delete.
    pub resource_id: String,
    pub operation: Operation,
    /// The context of the consumer's first request, echoed (v1alpha2 only;
    /// always empty from v1alpha1).
    pub context: String,
}

/// Why a request could not be read (the owner ends the stream with
/// `INVALID_ARGUMENT` and this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A v1alpha2 wrapper without a request: the peer is pushing responses
    /// to an owner.
    #[error(
        "expected a request, got a response: the peer pushes as an owner on a stream where it should consume"
    )]
    NotARequest,
}

/// What was wrong with a response. Everything but [`NotAResponse`] is
/// NACKed: the stream goes on.
///
/// [`NotAResponse`]: ResponseError::NotAResponse
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// A v1alpha2 wrapper without a response carries nothing for a consumer.
    #[error("expected a response; the wrapper carries none")]
    NotAResponse,
    /// The operation needs the service but no resource came with it
    /// (`operation` as the version spells it: `UPSERT`, `CREATE/UPDATE`).
    #[error("{operation} without a resource")]
    MissingResource { operation: &'static str },
    /// The operation is `UNKNOWN` (0) or a value this build does not know;
    /// `expected` lists the ones the version has.
    #[error("operation {code} is not {expected}")]
    UnknownOperation { code: i32, expected: &'static str },
    /// The resource did not decode or validate.
    #[error(transparent)]
    Resource(#[from] DecodeError),
}

/// A response the codec could not read, with what it could read of it, so
/// that the consumer can NACK the nonce and name the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    pub nonce: String,
    /// The service name, when the message still gave it; else empty.
    pub resource_id: String,
    pub error: ResponseError,
}

#[cfg(test)]
mod tests;
