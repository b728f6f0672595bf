//! The one error type of this crate: every way a certificate, key, bundle or
//! peer identity can be unacceptable, each variant naming the bad value.

use std::path::PathBuf;

use crate::spiffe::{SpiffeError, SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate does not parse as X.509: {0}")]
    BadCertificate(String),
    #[error("certificate has no URI SAN; a SPIFFE SVID must have exactly one")]
    NoUriSan,
    #[error("certificate has {} URI SANs ({}); a SPIFFE SVID must have exactly one", .0.len(), .0.join(", "))]
    MultipleUriSans(Vec<String>),
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    NotSpiffe {
        uri: String,
        #[source]
        source: SpiffeError,
    },
    #[error("certificate expired at {not_after} (seconds since the Unix epoch)")]
    Expired { not_after: u64 },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error(
        "peer {id} is from trust domain {}, for which no trust bundle is configured (configured: {known})",
        .id.trust_domain()
    )]
    UnknownTrustDomain { id: SpiffeId, known: String },
    #[error("certificate chain of {id} does not verify to {against}: {reason}")]
    ChainInvalid {
        id: SpiffeId,
        against: String,
        reason: String,
    },
    #[error("peer {got} is not in trust domain {expected}")]
    WrongTrustDomain {
        expected: TrustDomain,
        got: SpiffeId,
    },
    #[error("peer {got} is not one of the allowed SPIFFE IDs ({expected})")]
    SanMismatch { expected: String, got: SpiffeId },
    #[error("two trust bundles are configured for trust domain {0}")]
    DuplicateTrustDomain(TrustDomain),
    #[error(
        "no trust bundle configured; a server needs at least one to verify client certificates"
    )]
    NoTrustBundles,
    #[error("private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad PEM: {source}")]
    Pem {
        /// A file path, or a description such as `certificate PEM` for data
        /// that did not come from a file.
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no CERTIFICATE block found")]
    NoCertificates { path: String },
    #[error("{path}: no private key block found")]
    NoPrivateKey { path: String },
    #[error("trust bundle {path}: certificate {index} is not a usable CA: {reason}")]
    BadTrustAnchor {
        path: String,
        index: usize,
        reason: String,
    },
    #[error("refusing to overwrite existing {}", .0.display())]
    AlreadyExists(PathBuf),
    #[error("building the rustls configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("minting a certificate failed: {0}")]
    Mint(#[from] rcgen::Error),
}
