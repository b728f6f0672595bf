//! The connection to the owner's ingress: TCP to one of its endpoints,
//! the mTLS handshake presenting our identity and verifying the owner's
//! against that peer's bundle and the service's SANs (client configs cached
//! per expected identity and ALPN, per generation of credentials), and for HTTP the
//! HTTP/2 handshake of a pooled connection. It does not pick the endpoint or
//! carry traffic: the stream and HTTP stages do.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use elsinore_federation_api::Endpoint;
use elsinore_transport::h2::client as h2client;

use super::stats::EgressStats;
use super::{Egress, lock};
use crate::catalog::routes::{RemoteIdentity, VipEntry};
use crate::dns::resolver::{self, ConnectError};
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::tls::{self, TlsStream};

use crate::config::defaults::EGRESS_TLS_CACHE_MAX as TLS_CACHE_MAX;

/// A client config per expected identity (equal by peer and SANs: the
/// entries of one service share it) and ALPN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct TlsKey {
    remote: Arc<RemoteIdentity>,
    h2: bool,
}

impl Egress {
    /// Client configs per (peer, SANs, ALPN), built on first use.
    pub(super) fn client_config(
        &self,
        entry: &VipEntry,
        h2: bool,
    ) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
        let remote = &entry.remote;
        let key = TlsKey {
            remote: Arc::clone(remote),
            h2,
        };
        let generation = self.ctx.credentials.generation();
        {
            let cache = lock(&self.tls);
            if cache.0 == generation
                && let Some(config) = cache.1.get(&key)
            {
                return Ok(config.clone());
            }
        }
        let material = self.ctx.credentials.current();
        let bundle = material.bundles.get(&remote.peer).ok_or_else(|| {
            ProxyError::internal(
                ErrorKind::HandshakeFailed,
                format!("no trust bundle configured for peer {}", remote.peer),
            )
        })?;
        if remote.ids.is_empty() {
            // Without an identity to expect, any certificate of the peer's
            // trust domain would do: that is not what `sans` promises.
            return Err(ProxyError::upstream(
                ErrorKind::HandshakeFailed,
                format!(
                    "service {} of peer {} lists no SPIFFE ID in its sans ({:?}); refusing to connect",
                    entry.fqdn, remote.peer, remote.sans
                ),
            )
            .with_retry_safe(false));
        }
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[] };
        let config =
            elsinore_certs::client_config(&material.identity, bundle, Some(&remote.ids), alpn)
                .map_err(|e| {
                    ProxyError::internal(
                        ErrorKind::HandshakeFailed,
                        format!(
                            "cannot build the TLS client config for peer {}: {e}",
                            remote.peer
                        ),
                    )
                })?;
        let mut config = (*config).clone();
        if !self.ctx.tuning.tls_resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let config = tls::client_config(config);
        let mut cache = lock(&self.tls);
        if cache.0 != material.generation || cache.1.len() >= TLS_CACHE_MAX {
            *cache = (material.generation, HashMap::new());
        }
        cache.1.insert(key, config.clone());
        Ok(config)
    }

    /// Connects to one endpoint of the owner and completes the mTLS handshake.
    pub(super) async fn dial_tls(
        &self,
        entry: &VipEntry,
        endpoint: &Endpoint,
        sni: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<TlsStream, ProxyError> {
        let tuning = &self.ctx.tuning;
        let target = format!("{}:{}", endpoint.address, endpoint.port);
        let timeout = tuning.connect_timeout;
        let connected = resolver::connect(&endpoint.address, endpoint.port, Some(timeout)).await;
        let tcp = connected.map_err(|e| {
            let (kind, what) = match &e {
                ConnectError::Resolve(e) => (e.kind(), format!("resolving {target}: {e}")),
                ConnectError::Connect(addr, e) => (e.kind(), format!("{target} ({addr}): {e}")),
            };
            let kind = if kind == io::ErrorKind::TimedOut {
                ErrorKind::ConnectTimeout
            } else {
                ErrorKind::ConnectFailed
            };
            ProxyError::upstream(kind, what)
        })?;
        let _ = tcp.set_nodelay(true);
        let server_name =
            rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(|_| {
                ProxyError::upstream(
                    ErrorKind::HandshakeFailed,
                    format!("SNI {sni:?} of {} is not a valid server name", entry.fqdn),
                )
                .with_retry_safe(false)
            })?;
        let handshake = tls::connect(config, server_name, tcp);
        let started = Instant::now();
        match tokio::time::timeout(tuning.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => {
                EgressStats::bump(&self.stats.upstream_connects);
                let latency = &self.ctx.shared.latency;
                latency.handshake_egress.observe(started.elapsed());
                tracing::debug!(endpoint = %target, %sni, "mTLS connection to remote gateway established");
                Ok(tls)
            }
            Ok(Err(e)) => {
                EgressStats::bump(&self.stats.upstream_handshake_failures);
                let reason = tls_reason(&e);
                tracing::warn!(endpoint = %target, %sni, peer = %entry.import.peer, %reason, "mTLS handshake with remote gateway failed");
                Err(ProxyError::upstream(
                    ErrorKind::HandshakeFailed,
                    format!("{target} (SNI {sni}): {reason}"),
                ))
            }
            Err(_) => {
                EgressStats::bump(&self.stats.upstream_handshake_failures);
                tracing::warn!(endpoint = %target, %sni, peer = %entry.import.peer, "mTLS handshake with remote gateway timed out");
                Err(ProxyError::upstream(
                    ErrorKind::HandshakeTimeout,
                    format!(
                        "{target} (SNI {sni}): no handshake within {:?}",
                        tuning.handshake_timeout
                    ),
                ))
            }
        }
    }

    /// A new pooled connection: mTLS with ALPN h2, then the HTTP/2 handshake.
    pub(super) async fn dial_h2(
        &self,
        entry: &VipEntry,
        endpoint: &Endpoint,
        sni: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<h2client::Sender, ProxyError> {
        let tls = self.dial_tls(entry, endpoint, sni, config).await?;
        let target = format!("{}:{}", endpoint.address, endpoint.port);
        if tls.alpn_protocol() != Some(b"h2") {
            return Err(ProxyError::upstream(
                ErrorKind::Protocol,
                format!("{target} (SNI {sni}) did not negotiate HTTP/2 (ALPN h2)"),
            ));
        }
        let span = tracing::debug_span!("pooled", endpoint = %target);
        let handshake = h2client::handshake(tls, span);
        let sender = tokio::time::timeout(self.ctx.tuning.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                ProxyError::upstream(
                    ErrorKind::HandshakeTimeout,
                    format!(
                        "{target}: no HTTP/2 handshake within {:?}",
                        self.ctx.tuning.handshake_timeout
                    ),
                )
            })?
            .map_err(|e| {
                ProxyError::upstream(
                    ErrorKind::HandshakeFailed,
                    format!("{target}: HTTP/2 handshake: {e}"),
                )
            })?;
        Ok(sender)
    }
}

/// Why a TLS handshake failed: for a certificate we refused, the certificate
/// check's own words (which ID, which bundle, which SAN); else the error.
fn tls_reason(e: &io::Error) -> String {
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return format!("remote certificate refused: {}", other.0);
    }
    e.to_string()
}
