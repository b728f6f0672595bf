//! Minting of development certificates: a self-signed CA per trust domain
//! and SVID leaves signed by it, plus `init`, which writes a CA and a gateway
//! identity to a directory. For development and tests; production identities
//! come from the mesh's own CA.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::CertError;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Tolerates clocks of peers running slightly behind ours.
const BACKDATE: Duration = Duration::minutes(5);
const CA_VALIDITY: Duration = Duration::days(365);
const LEAF_VALIDITY: Duration = Duration::days(90);

/// A development CA: a self-signed ECDSA P-256 certificate and its key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A freshly issued leaf certificate and its private key (PKCS#8), as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA for `td`, valid for one year.
    pub fn new(td: &TrustDomain) -> Result<Ca, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(CA_VALIDITY);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Elsinore dev CA {td}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA from its certificate and private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        const CERT: &str = "CA certificate PEM";
        const KEY: &str = "CA private key PEM";
        let der = crate::identity::parse_certs(cert_pem.as_bytes(), CERT)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::NoCertificates {
                path: CERT.to_owned(),
            })?;
        let key = KeyPair::from_pem(key_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        // Leaves signed by a key that is not the CA's would fail to verify
        // only at the peer; catch it here.
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::KeyMismatch {
                cert: CERT.to_owned(),
                key: KEY.to_owned(),
            });
        }
        Ok(Ca {
            issuer: Issuer::from_ca_cert_der(&der, key)?,
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// An SVID for `id`: ECDSA P-256, 90 days, server and client auth,
    /// exactly one URI SAN (`id`) plus the given DNS and IP SANs.
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<Issued, CertError> {
        let uri = id.to_string();
        self.issue_with_uris(&[uri.as_str()], dns, ips)
    }

    /// Like [`Ca::issue`], valid for `validity` from now (whole seconds):
    /// for tests of what happens when a certificate expires.
    pub fn issue_valid_for(
        &self,
        id: &SpiffeId,
        validity: std::time::Duration,
    ) -> Result<Issued, CertError> {
        let uri = id.to_string();
        let secs = i64::try_from(validity.as_secs()).unwrap_or(i64::MAX);
        self.issue_for(&[uri.as_str()], &[], &[], Duration::seconds(secs))
    }

    /// Like [`Ca::issue`] with arbitrary URI SANs (none, several, not
    /// SPIFFE): for tests of how non-SVIDs are rejected.
    pub fn issue_with_uris(
        &self,
        uris: &[&str],
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<Issued, CertError> {
        self.issue_for(uris, dns, ips, LEAF_VALIDITY)
    }

    fn issue_for(
        &self,
        uris: &[&str],
        dns: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(validity);
        // CN is limited to 64 bytes; the URI SAN is what identifies anyway.
        if let [uri] = uris
            && uri.len() <= 64
        {
            params.distinguished_name.push(DnType::CommonName, *uri);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut sans = Vec::with_capacity(uris.len() + dns.len() + ips.len());
        for uri in uris {
            sans.push(SanType::URI((*uri).try_into()?));
        }
        for name in dns {
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What every certificate we mint starts from: valid from a little before
/// now (clocks of two hosts differ) for `validity`, organization Elsinore.
/// A new DN, not rcgen's default (which carries a CN of its own).
fn base_params(validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Elsinore");
    params.distinguished_name = dn;
    params
}

/// The files written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
}

/// Creates `out` if needed and writes a new CA for `td` (`ca.pem`, `ca.key`)
/// and a gateway identity `spiffe://TD/ns/elsinore/sa/gateway` signed by it
/// (`gateway.pem`, `gateway.key`). Keys are written mode 0600. Refuses to
/// overwrite an existing `ca.key`, since every identity the old CA signed
/// would silently stop verifying.
pub fn init(
    td: &TrustDomain,
    out: &Path,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<InitFiles, CertError> {
    let files = InitFiles {
        ca_cert: out.join("ca.pem"),
        ca_key: out.join("ca.key"),
        gateway_cert: out.join("gateway.pem"),
        gateway_key: out.join("gateway.key"),
    };
    if files.ca_key.exists() {
        return Err(CertError::AlreadyExists(files.ca_key));
    }
    let ca = Ca::new(td)?;
    let gateway = ca.issue(&SpiffeId::gateway(td.clone()), dns, ips)?;
    std::fs::create_dir_all(out).map_err(|source| CertError::Io {
        path: out.to_owned(),
        source,
    })?;
    // create_new closes the race with a concurrent init between the check
    // above and this write.
    write_file(&files.ca_key, ca.key_pem().as_bytes(), true, true)?;
    write_file(&files.ca_cert, ca.cert_pem().as_bytes(), false, false)?;
    write_file(&files.gateway_key, gateway.key_pem.as_bytes(), true, false)?;
    write_file(
        &files.gateway_cert,
        gateway.cert_pem.as_bytes(),
        false,
        false,
    )?;
    Ok(files)
}

fn write_file(path: &Path, data: &[u8], secret: bool, create_new: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::AlreadyExists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    // The mode above applies only to a new file; an existing key file with
    // looser permissions is tightened before the key is written into it.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}
