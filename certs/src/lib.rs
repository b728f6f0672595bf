//! Identity for Elsinore: SPIFFE IDs and trust domains, PEM loading, one
//! trust bundle per peer trust domain, rustls configs that require mTLS and
//! verify both the chain to *that peer's* bundle and the URI SAN's trust
//! domain, and minting of development CAs and gateway certificates. Knows
//! nothing of the gateway.

pub mod spiffe;

pub use spiffe::{SpiffeError, SpiffeId, TrustDomain};
