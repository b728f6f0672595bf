//! Federation: the owner side (our `DiscoveryService`, one session per
//! consumer stream) and the consumer side (one dialer per peer). The protocol
//! logic lives in sans-I/O state machines (`owner/session.rs`,
//! `consumer/session.rs`); the tonic code around them ([`owner`],
//! [`consumer`], [`transport`]) only moves messages.

pub mod consumer;
pub mod owner;
pub mod transport;

/// Response metadata (owner → consumer): how many messages form the initial
/// snapshot, so a consumer knows when it is complete. Foreign peers ignore it.
pub const SNAPSHOT_SIZE_HEADER: &str = "elsinore-snapshot-size";
/// Request metadata (consumer → owner) asking for a window of in-flight
/// messages; the owner answers with the window it grants. Only sent and
/// honoured between Elsinore gateways.
pub const WINDOW_HEADER: &str = "elsinore-window";
