//! Our own identity (certificate chain + private key) and the trust bundles
//! of peers, loaded from PEM. Loading validates what can be validated up
//! front (the leaf is an SVID, the key matches it, every bundle entry is a
//! usable trust anchor) so a bad file fails at startup or reload, not at the
//! first handshake.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};

use crate::error::CertError;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid;
use crate::tls::provider;

/// A certificate chain (leaf first) with its private key and the SPIFFE ID
/// of the leaf. Cheap to clone: the key is shared, not copied.
#[derive(Clone)]
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    // PrivateKeyDer is not Clone (it zeroizes on drop); share one copy.
    key: Arc<PrivateKeyDer<'static>>,
    not_after: SystemTime,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_certs(
    pem: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            path: origin.to_owned(),
        });
    }
    Ok(certs)
}

impl Identity {
    /// From a PEM certificate chain (leaf first) and a PEM private key
    /// (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, CertError> {
        Self::from_pem_named(cert_pem, key_pem, "certificate PEM", "private key PEM")
    }

    /// From PEM files; errors name the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, CertError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        Self::from_pem_named(
            &cert_pem,
            &key_pem,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    /// From the PEM bytes read from the files `cert` and `key` (errors
    /// name them): for callers that compare bytes before parsing.
    pub fn from_pem_files(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert: &Path,
        key: &Path,
    ) -> Result<Identity, CertError> {
        Self::from_pem_named(
            cert_pem,
            key_pem,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    fn from_pem_named(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Identity, CertError> {
        let chain = parse_certs(cert_pem, cert_origin)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPrivateKey {
                path: key_origin.to_owned(),
            },
            source => CertError::Pem {
                path: key_origin.to_owned(),
                source,
            },
        })?;
        // A key that does not match the leaf would only fail at the first
        // handshake, on the peer's side, with an opaque signature error.
        match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(CertError::KeyMismatch {
                    cert: cert_origin.to_owned(),
                    key: key_origin.to_owned(),
                });
            }
            Err(e) => return Err(CertError::Tls(e)),
        }
        let leaf = &chain[0];
        let id = svid::spiffe_id_of(leaf)?;
        let not_after = svid::not_after(leaf)?;
        Ok(Identity {
            id,
            chain,
            key: Arc::new(key),
            not_after,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// Leaf first, then any intermediates, as presented in the handshake.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Expiry of the leaf certificate.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// The CA certificates of one trust domain. A peer of that trust domain must
/// chain to these roots and no others.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    anchors: Arc<[TrustAnchor<'static>]>,
}

impl TrustBundle {
    /// From PEM data holding at least one CA certificate.
    pub fn from_pem(td: TrustDomain, pem: &[u8]) -> Result<TrustBundle, CertError> {
        Self::from_pem_named(td, pem, "trust bundle PEM")
    }

    /// From a PEM file holding at least one CA certificate.
    pub fn load(td: TrustDomain, path: &Path) -> Result<TrustBundle, CertError> {
        let pem = read(path)?;
        Self::from_pem_named(td, &pem, &path.display().to_string())
    }

    /// From the PEM bytes read from `path` (errors name it).
    pub fn from_pem_file_bytes(
        td: TrustDomain,
        pem: &[u8],
        path: &Path,
    ) -> Result<TrustBundle, CertError> {
        Self::from_pem_named(td, pem, &path.display().to_string())
    }

    /// From CA certificates already decoded (e.g. the union of two
    /// bundles); `origin` names them in errors.
    pub fn from_der(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<TrustBundle, CertError> {
        if roots.is_empty() {
            return Err(CertError::NoCertificates {
                path: origin.to_owned(),
            });
        }
        Self::from_roots(trust_domain, roots, origin)
    }

    fn from_pem_named(
        trust_domain: TrustDomain,
        pem: &[u8],
        origin: &str,
    ) -> Result<TrustBundle, CertError> {
        let roots = parse_certs(pem, origin)?;
        Self::from_roots(trust_domain, roots, origin)
    }

    fn from_roots(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<TrustBundle, CertError> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| CertError::BadTrustAnchor {
                        path: origin.to_owned(),
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle {
            trust_domain,
            roots,
            anchors: anchors.into(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}
