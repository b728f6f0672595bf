//! Federation: the owner side (our `DiscoveryService`, one session per
//! consumer stream) and the consumer side (one dialer per peer). The protocol
//! logic lives in sans-I/O state machines ([`owner_session`],
//! [`consumer_session`]); the tonic code around them only moves messages.

pub mod consumer_session;
pub mod owner_session;
