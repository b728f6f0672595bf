//! Identity for Elsinore: SPIFFE IDs and trust domains, PEM loading, one
//! trust bundle per peer trust domain, rustls configs that require mTLS and
//! verify both the chain to *that peer's* bundle and the URI SAN's trust
//! domain, and minting of development CAs and gateway certificates. Knows
//! nothing of the gateway.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
pub mod identity;
pub mod mint;
pub mod spiffe;
pub mod svid;
pub mod tls;

pub use error::CertError;
pub use identity::{Identity, TrustBundle};
pub use mint::{Ca, InitFiles, Issued, init};
pub use spiffe::{SpiffeError, SpiffeId, TrustDomain};
pub use svid::{check_not_expired, claimed_trust_domain, not_after, peer_spiffe_id, spiffe_id_of};
pub use tls::{
    chain_verifies, client_config, client_config_with_versions, server_config,
    server_config_with_versions,
};
