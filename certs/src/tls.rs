//! rustls configurations for SPIFFE mTLS: a server that requires a client
//! certificate and checks it against the bundle of the trust domain the
//! certificate claims, and a client that checks the server against one peer's
//! bundle and, optionally, a list of allowed SPIFFE IDs. Authentication is by
//! URI SAN and chain only; DNS names are never consulted. Both configs carry
//! their own aws-lc-rs provider so no process-global provider is needed.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::error::CertError;
use crate::identity::{Identity, TrustBundle};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::spiffe_id_of;

/// The one crypto provider of this crate, passed to every config explicitly.
///
/// Cipher suites: AES-128-GCM with SHA-256 first. Both are 128-bit secure
/// and SHA-256 is hardware-accelerated where SHA-512 often is not, so the
/// TLS 1.3 key schedule costs less per handshake (SHA-384, used by the
/// AES-256 suite, was the top symbol of a handshake-bound benchmark). Every
/// other suite of the default provider stays available, after it.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let preferred = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != preferred.suite());
    Arc::new(provider)
}

/// Turns our error into the rustls error that aborts the handshake; the
/// `CertError` travels inside so callers that log the handshake failure see
/// which ID, bundle or SAN was at fault (and can downcast it).
fn reject(e: CertError) -> rustls::Error {
    tracing::debug!(error = %e, "rejecting peer certificate");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// A peer's chain as one handshake presented it, and the signature
/// algorithms to check it with: what every policy verifies against its own
/// anchors.
struct Presented<'a> {
    end_entity: &'a CertificateDer<'a>,
    intermediates: &'a [CertificateDer<'a>],
    now: UnixTime,
    algs: &'a WebPkiSupportedAlgorithms,
}

impl Presented<'_> {
    /// Verifies the chain up to one of `anchors`, for the given extended
    /// key usage.
    fn verifies_to(
        &self,
        anchors: &[TrustAnchor<'_>],
        usage: webpki::KeyUsage,
    ) -> Result<(), webpki::Error> {
        let ee = webpki::EndEntityCert::try_from(self.end_entity)?;
        ee.verify_for_usage(
            self.algs.all,
            anchors,
            self.intermediates,
            self.now,
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    /// [`Self::verifies_to`] `bundle`'s CAs, failing with the error that
    /// names the leaf's `id` and the bundle.
    fn verifies_to_bundle(
        &self,
        bundle: &TrustBundle,
        id: &SpiffeId,
        usage: webpki::KeyUsage,
    ) -> Result<(), CertError> {
        self.verifies_to(bundle.anchors(), usage)
            .map_err(|e| CertError::ChainInvalid {
                id: id.clone(),
                against: format!("the trust bundle of {}", bundle.trust_domain()),
                reason: e.to_string(),
            })
    }
}

/// Peer chains that passed a verifier's checks, by their exact bytes, so
/// that the next handshake with the same peer certificate skips the chain's
/// signature checks (one ECDSA verification per CA link: a handshake-bound
/// benchmark spent about a third of its CPU in P-256 arithmetic).
///
/// What is cached is the verdict of one verifier, whose bundles and allowed
/// IDs never change (a new config builds a new verifier and an empty
/// cache), on the exact certificates presented: any other certificate is a
/// miss. An entry never outlives the earliest `notAfter` in its chain, nor
/// [`VERIFIED_TTL`]. Failures are never cached. The proof that the peer
/// holds the key (its handshake signature) is checked on every handshake
/// by rustls, outside this cache.
#[derive(Debug, Default)]
struct VerifiedChains {
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, u64>>,
}

/// How long a verified chain is trusted without checking it again.
const VERIFIED_TTL: u64 = 300;
/// Distinct chains remembered at most; peers are few, so this bounds what
/// many distinct clients could make us hold. Full means start over.
const VERIFIED_MAX: usize = 1024;

impl VerifiedChains {
    /// `verify`'s verdict on the chain, from the cache when it passed
    /// before and is still within its validity.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<(), CertError>,
    ) -> Result<(), CertError> {
        let key = chain_key(end_entity, intermediates);
        let at = now.as_secs();
        if self.lock().get(&key).is_some_and(|&until| at < until) {
            return Ok(());
        }
        verify()?;
        if let Some(not_after) = earliest_not_after(end_entity, intermediates) {
            let until = not_after.min(at.saturating_add(VERIFIED_TTL));
            let mut entries = self.lock();
            if entries.len() >= VERIFIED_MAX {
                entries.clear();
            }
            entries.insert(key, until);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, u64>> {
        // Every critical section is one lookup or insert: a panic cannot
        // leave the map half-updated.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The chain's certificates, each prefixed with its length, as one key.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<u8> {
    let certs = std::iter::once(end_entity).chain(intermediates);
    let mut key = Vec::with_capacity(certs.clone().map(|c| c.len() + 8).sum());
    for cert in certs {
        key.extend_from_slice(&(cert.len() as u64).to_be_bytes());
        key.extend_from_slice(cert.as_ref());
    }
    key
}

/// The earliest `notAfter` (Unix seconds) in the chain; `None` if a
/// certificate cannot be read (then nothing is cached).
fn earliest_not_after(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<u64> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|cert| {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            u64::try_from(parsed.validity().not_after.timestamp()).ok()
        })
        .try_fold(u64::MAX, |earliest, n| Some(earliest.min(n?)))
}

/// Whether `chain` (leaf first, then intermediates) verifies, for server
/// authentication and at the current time, to one of `bundle`'s CAs alone.
/// For callers deciding which of a peer's CAs its certificates use now.
pub fn chain_verifies(bundle: &TrustBundle, chain: &[CertificateDer<'_>]) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    let provider = provider();
    let presented = Presented {
        end_entity: leaf,
        intermediates,
        now: UnixTime::now(),
        algs: &provider.signature_verification_algorithms,
    };
    presented
        .verifies_to(bundle.anchors(), webpki::KeyUsage::server_auth())
        .is_ok()
}

/// Builds the server side of mTLS.
///
/// A client certificate is required; a client without one fails the
/// handshake. The client's leaf must be an SVID (exactly one `spiffe://` URI
/// SAN), and then:
///
/// - if a bundle is configured for the trust domain it claims, its chain
///   must verify (client-auth usage) to *that* bundle and no other, so a CA
///   of one peer can never mint identities of another peer;
/// - if no bundle is configured for its trust domain, the chain must still
///   verify to one of the configured bundles, and the handshake then
///   **succeeds**: the application must check [`crate::peer_spiffe_id`]
///   against the trust domains it serves and refuse with a clear reason (gRPC
///   `Unauthenticated`, ingress close) — a TLS alert would tell the peer
///   nothing. Callers must therefore never treat a completed handshake alone
///   as authorization;
/// - a chain that verifies to no configured bundle is rejected.
///
/// Bundles must have distinct trust domains, and there must be at least one.
pub fn server_config(
    identity: &Identity,
    bundles: &[TrustBundle],
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    server_config_with_versions(identity, bundles, alpn, rustls::DEFAULT_VERSIONS)
}

/// [`server_config`] offering only the given TLS `versions`.
pub fn server_config_with_versions(
    identity: &Identity,
    bundles: &[TrustBundle],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    if bundles.is_empty() {
        return Err(CertError::NoTrustBundles);
    }
    let mut by_domain = BTreeMap::new();
    for b in bundles {
        if by_domain
            .insert(b.trust_domain().clone(), b.clone())
            .is_some()
        {
            return Err(CertError::DuplicateTrustDomain(b.trust_domain().clone()));
        }
    }
    let provider = provider();
    let verifier = SpiffeVerifier::new(
        ClientPolicy { bundles: by_domain },
        provider.signature_verification_algorithms,
    );
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.cert_chain().to_vec(), identity.private_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Our suite order (see `provider`) also for foreign clients that lead with AES-256.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Builds the client side of mTLS towards one peer, presenting `identity`.
///
/// The server's chain must verify (server-auth usage) to `peer`'s bundle, its
/// SPIFFE ID must be in `peer`'s trust domain and, if `allowed_ids` is
/// `Some`, be one of them.
///
/// The `ServerName` the caller passes to `connect` is **not** checked against
/// the certificate: SPIFFE authenticates a workload by its URI SAN, and the
/// name we dial is an SNI routing key or an address chosen from the catalog,
/// not an identity. Checking it as well would only make callers mint DNS SANs
/// to satisfy a check that adds nothing over the URI SAN. Any `ServerName`
/// (including an IP address) may be used.
pub fn client_config(
    identity: &Identity,
    peer: &TrustBundle,
    allowed_ids: Option<&[SpiffeId]>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, CertError> {
    client_config_with_versions(identity, peer, allowed_ids, alpn, rustls::DEFAULT_VERSIONS)
}

/// [`client_config`] offering only the given TLS `versions`.
pub fn client_config_with_versions(
    identity: &Identity,
    peer: &TrustBundle,
    allowed_ids: Option<&[SpiffeId]>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, CertError> {
    let provider = provider();
    let verifier = SpiffeVerifier::new(
        ServerPolicy {
            bundle: peer.clone(),
            allowed_ids: allowed_ids.map(<[SpiffeId]>::to_vec),
        },
        provider.signature_verification_algorithms,
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.cert_chain().to_vec(), identity.private_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What one side of mTLS demands of its peer beyond what every peer must
/// be (an SVID): given the SPIFFE ID the leaf claims, already parsed, which
/// anchors the chain must verify to and which IDs are the peer.
trait PeerPolicy {
    fn check(&self, id: SpiffeId, chain: &Presented<'_>) -> Result<(), CertError>;
}

/// A verifier of either direction: the SPIFFE ID extraction, the signature
/// algorithms and the cache of chains that passed are the same for both;
/// only the `policy` differs.
#[derive(Debug)]
struct SpiffeVerifier<P> {
    policy: P,
    algs: WebPkiSupportedAlgorithms,
    verified: VerifiedChains,
}

impl<P: PeerPolicy> SpiffeVerifier<P> {
    /// A verifier with an empty cache: the cache is only valid for this
    /// policy, so a new policy always comes with a new one.
    fn new(policy: P, algs: WebPkiSupportedAlgorithms) -> Self {
        SpiffeVerifier {
            policy,
            algs,
            verified: VerifiedChains::default(),
        }
    }

    /// The policy's verdict on the chain, without the cache.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), CertError> {
        let id = spiffe_id_of(end_entity)?;
        let chain = Presented {
            end_entity,
            intermediates,
            now,
            algs: &self.algs,
        };
        self.policy.check(id, &chain)
    }

    /// [`Self::check`] behind the cache, as rustls wants the verdict.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.verified
            .check(end_entity, intermediates, now, || {
                self.check(end_entity, intermediates, now)
            })
            .map_err(reject)
    }
}

/// The handshake-signature checks, the same for both verifiers (the client
/// and the server verifier traits each ask for these three): rustls's own,
/// with the verifier's `algs`.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// The server's policy for client certificates (see [`server_config`]): a
/// known trust domain's own bundle, or, for an unknown one, any of ours.
#[derive(Debug)]
struct ClientPolicy {
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

impl PeerPolicy for ClientPolicy {
    fn check(&self, id: SpiffeId, chain: &Presented<'_>) -> Result<(), CertError> {
        let usage = webpki::KeyUsage::client_auth();
        if let Some(bundle) = self.bundles.get(id.trust_domain()) {
            return chain.verifies_to_bundle(bundle, &id, usage);
        }
        // Unknown trust domain: accept only what one of our own bundles
        // vouches for, and leave the refusal to the application (see
        // `server_config`).
        let verified = self
            .bundles
            .values()
            .any(|b| chain.verifies_to(b.anchors(), usage).is_ok());
        if verified {
            Ok(())
        } else {
            Err(CertError::UnknownTrustDomain {
                id,
                known: self.known(),
            })
        }
    }
}

impl ClientPolicy {
    fn known(&self) -> String {
        self.bundles
            .keys()
            .map(TrustDomain::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ClientCertVerifier for SpiffeVerifier<ClientPolicy> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // An empty list makes clients send their certificate whatever CA
        // issued it; our clients have exactly one identity anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// The client's policy for one peer's server certificate (see
/// [`client_config`]): that peer's bundle, its trust domain, and the
/// allowed IDs if any.
#[derive(Debug)]
struct ServerPolicy {
    bundle: TrustBundle,
    allowed_ids: Option<Vec<SpiffeId>>,
}

impl PeerPolicy for ServerPolicy {
    fn check(&self, id: SpiffeId, chain: &Presented<'_>) -> Result<(), CertError> {
        chain.verifies_to_bundle(&self.bundle, &id, webpki::KeyUsage::server_auth())?;
        // The bundle's CA may sign for other trust domains too (a shared
        // root); only IDs of the peer's own trust domain are the peer.
        if id.trust_domain() != self.bundle.trust_domain() {
            return Err(CertError::WrongTrustDomain {
                expected: self.bundle.trust_domain().clone(),
                got: id,
            });
        }
        if let Some(allowed) = &self.allowed_ids
            && !allowed.contains(&id)
        {
            return Err(CertError::SanMismatch {
                expected: allowed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                got: id,
            });
        }
        Ok(())
    }
}

impl ServerCertVerifier for SpiffeVerifier<ServerPolicy> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::mint::Ca;
    use std::cell::Cell;
    use std::time::Duration;

    /// A CA of `mesh-b.test`, its bundle, and a gateway SVID it signed.
    fn peer() -> (TrustBundle, Identity) {
        let td: TrustDomain = "mesh-b.test".parse().unwrap();
        let ca = Ca::new(&td).unwrap();
        let id: SpiffeId = "spiffe://mesh-b.test/ns/elsinore/sa/gateway"
            .parse()
            .unwrap();
        let issued = ca.issue(&id, &[], &[]).unwrap();
        let identity =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let bundle = TrustBundle::from_pem(td, ca.cert_pem().as_bytes()).unwrap();
        (bundle, identity)
    }

    fn verifier(bundle: TrustBundle) -> SpiffeVerifier<ServerPolicy> {
        SpiffeVerifier::new(
            ServerPolicy {
                bundle,
                allowed_ids: None,
            },
            provider().signature_verification_algorithms,
        )
    }

    #[test]
    fn a_verified_chain_is_not_checked_again_but_failures_always_are() {
        let (bundle, identity) = peer();
        let v = verifier(bundle);
        let ee = &identity.cert_chain()[0];
        let now = UnixTime::now();
        let calls = Cell::new(0);
        let real = || {
            calls.set(calls.get() + 1);
            v.check(ee, &[], now)
        };
        v.verified.check(ee, &[], now, real).unwrap();
        v.verified.check(ee, &[], now, real).unwrap();
        assert_eq!(
            calls.get(),
            1,
            "the second handshake used the cached verdict"
        );
        assert_eq!(v.verified.len(), 1);

        let fails = || {
            Err(CertError::UnknownTrustDomain {
                id: spiffe_id_of(ee).unwrap(),
                known: String::new(),
            })
        };
        let (_, other) = peer();
        let other_ee = &other.cert_chain()[0];
        let failing = Cell::new(0);
        for _ in 0..2 {
            let r = v.verified.check(other_ee, &[], now, || {
                failing.set(failing.get() + 1);
                fails()
            });
            assert!(r.is_err());
        }
        assert_eq!(failing.get(), 2, "a failure is never cached");
    }

    #[test]
    fn a_cached_chain_expires_with_its_certificate() {
        let (bundle, identity) = peer();
        let v = verifier(bundle);
        let ee = &identity.cert_chain()[0];
        v.verify_server_cert(
            ee,
            &[],
            &ServerName::try_from("x").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap();
        assert_eq!(v.verified.len(), 1);
        // A year on, the 90-day SVID has expired: the cache must not say
        // otherwise.
        let later = UnixTime::since_unix_epoch(
            UnixTime::now()
                .as_secs()
                .checked_add(365 * 86_400)
                .map(Duration::from_secs)
                .unwrap(),
        );
        let err = v
            .verify_server_cert(ee, &[], &ServerName::try_from("x").unwrap(), &[], later)
            .unwrap_err();
        assert!(
            err.to_string().contains("expired") || err.to_string().contains("Expired"),
            "{err}"
        );
        // Nor beyond the TTL, even while the certificate is valid.
        let calls = Cell::new(0);
        let soon = UnixTime::since_unix_epoch(Duration::from_secs(
            UnixTime::now().as_secs() + VERIFIED_TTL + 1,
        ));
        v.verified
            .check(ee, &[], soon, || {
                calls.set(calls.get() + 1);
                Ok(())
            })
            .unwrap();
        assert_eq!(calls.get(), 1, "re-verified after {VERIFIED_TTL} s");
    }

    #[test]
    fn aes_128_gcm_sha256_is_preferred_and_nothing_is_dropped() {
        let ours = super::provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let default = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(ours.cipher_suites.len(), default.cipher_suites.len());
    }
}
