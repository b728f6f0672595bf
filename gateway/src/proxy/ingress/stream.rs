//! The ingress's stream stage: an authorized connection of an opaque export
//! (TCP, TLS, mTLS, HTTPS, Mongo) is spliced, bytes as they come, to one of
//! the export's backends, and the bytes moved are logged. It must not look
//! into the bytes: what the peer may reach was settled by the handshake.
//! The backend's bytes are read straight into TLS records
//! ([`splice_from_tls`]), as the egress does with a client's.

use elsinore_transport::splice::splice_from_tls;
use tokio::io::AsyncWriteExt;

use super::PeerStream;
use super::handshake::{Inner, REFUSAL_CLOSE_TIMEOUT};
use super::routes::Upstream;
use super::stats::bump;
use crate::proxy::error::{ProxyError, Side};

/// Splices an authorized connection of an opaque export to one of its
/// backends until either side closes, the idle timeout passes or the
/// drain is cut.
pub(super) async fn forward_opaque(tls: PeerStream, upstream: &Upstream, inner: &Inner) {
    let tuning = inner.tuning();
    // Boxed, as the handshake before it: a held connection's task keeps only
    // the splice's state, not that of every step before it.
    let (backend, addr) = match Box::pin(upstream.backends.connect(tuning.connect_timeout)).await {
        Ok(pair) => pair,
        Err(e) => {
            bump(&inner.stats.upstream_errors);
            tracing::warn!(error = %e, label = e.label(), "ingress splice: no backend");
            let mut tls = tls;
            let _ = tokio::time::timeout(REFUSAL_CLOSE_TIMEOUT, tls.shutdown()).await;
            return;
        }
    };
    bump(&inner.stats.spliced);
    tracing::debug!(backend = %addr, "splicing");
    tokio::select! {
        res = splice_from_tls(tls, backend, tuning.idle_timeout) => match res.map_err(ProxyError::from) {
            Ok((up, down)) => {
                tracing::debug!(backend = %addr, bytes.up = up, bytes.down = down, "splice finished");
            }
            Err(e) => {
                if e.side == Side::Upstream {
                    bump(&inner.stats.upstream_errors);
                }
                tracing::info!(backend = %addr, error = %e, label = e.label(), "splice ended");
            }
        },
        // A stream in flight outlives the start of a drain, not its end.
        _ = inner.ctx.abort.cancelled() => {
            tracing::debug!(backend = %addr, "splice cut: drain timed out");
        }
    }
}
