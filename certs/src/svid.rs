//! Reading a SPIFFE ID and expiry out of an X.509 certificate (an X509-SVID).
//! Parsing only: whether the certificate is trusted is `tls`'s business.

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::error::CertError;
use crate::spiffe::SpiffeId;

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CertError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::BadCertificate(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        )));
    }
    Ok(parsed)
}

/// The SPIFFE ID of an X509-SVID.
///
/// The SPIFFE X509-SVID spec requires exactly one URI SAN, and it must be a
/// SPIFFE ID; a certificate with none or several is not an SVID, however
/// plausible one of its URIs looks, so both are errors rather than "pick the
/// first spiffe:// one".
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertError> {
    let parsed = parse(cert)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| CertError::BadCertificate(format!("subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(CertError::NoUriSan),
        [uri] => uri.parse().map_err(|source| CertError::NotSpiffe {
            uri: (*uri).to_owned(),
            source,
        }),
        many => Err(CertError::MultipleUriSans(
            many.iter().map(|u| (*u).to_owned()).collect(),
        )),
    }
}

/// The trust domain a certificate's `spiffe://` URI SAN names, if it has
/// one. SPIFFE CA certificates carry `spiffe://<trust domain>` (no path),
/// which is not a workload ID, so this reads only the authority.
pub fn claimed_trust_domain(cert: &CertificateDer<'_>) -> Result<Option<String>, CertError> {
    let parsed = parse(cert)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| CertError::BadCertificate(format!("subjectAltName: {e}")))?;
    let Some(san) = san else { return Ok(None) };
    Ok(san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_ascii_lowercase()),
        _ => None,
    }))
}

/// Fails with [`CertError::Expired`] once `now` is past the certificate's
/// notAfter. For sessions resumed without a fresh chain verification: the
/// identity a ticket carries must not outlive its certificate.
pub fn check_not_expired(cert: &CertificateDer<'_>, now: SystemTime) -> Result<(), CertError> {
    let not_after = not_after(cert)?;
    if now > not_after {
        let at = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return Err(CertError::Expired { not_after: at });
    }
    Ok(())
}

/// The certificate's notAfter time.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, CertError> {
    let parsed = parse(cert)?;
    let ts = parsed.validity().not_after.timestamp();
    let at = if ts >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(ts.unsigned_abs()))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(ts.unsigned_abs()))
    };
    at.ok_or_else(|| CertError::BadCertificate(format!("notAfter {ts} is out of range")))
}

/// The SPIFFE ID of the peer after a handshake, from
/// `conn.peer_certificates()`. The first certificate is the peer's leaf.
pub fn peer_spiffe_id(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, CertError> {
    match certs {
        Some([leaf, ..]) => spiffe_id_of(leaf),
        _ => Err(CertError::NoPeerCertificate),
    }
}
