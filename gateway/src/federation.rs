//! Federation: the owner side (our `DiscoveryService`, one session per
//! consumer stream) and the consumer side (one dialer per peer), each a
//! task beside its sans-I/O state machine ([`owner`] + `owner/session.rs`,
//! [`consumer`] + `consumer/session.rs`), the mTLS [`transport`] they
//! share, and what `/peers` shows of both roles ([`status`]). The tasks only move messages; the protocol decisions are the
//! sessions', and the wire encoding (both versions, the Elsinore metadata
//! headers) is `elsinore_federation_api::message`'s. Nothing here may build
//! or read a Hamlet proto field by hand.

pub mod consumer;
pub mod owner;
pub mod status;
pub mod transport;
