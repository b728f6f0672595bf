//! Raw TCP imports (TCP, TLS, HTTPS, MONGO, mTLS: what egress does not
//! terminate): one mTLS connection to the owner per client connection,
//! spliced. It must not look into the bytes it carries.

use std::sync::atomic::Ordering;

use elsinore_transport::splice::splice_to_tls;
use tokio::net::TcpStream;

use super::Egress;
use super::routes::no_endpoints;
use crate::catalog::routes::VipEntry;
use crate::proxy::error::ProxyError;

impl Egress {
    /// A raw connection: one mTLS connection to the first endpoint (in
    /// round-robin order) that answers, then the splice.
    pub(super) async fn serve_stream(
        &self,
        entry: &VipEntry,
        client: TcpStream,
    ) -> Result<(), ProxyError> {
        let targets = &entry.upstreams;
        if targets.is_empty() {
            return Err(no_endpoints(entry));
        }
        let config = self.client_config(entry, false)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        let mut upstream = None;
        for k in 0..targets.len() {
            let target = &targets[(start + k) % targets.len()];
            // Boxed: a held connection's task keeps the splice's state, not
            // the dial's.
            let dial =
                Box::pin(self.dial_tls(entry, &target.endpoint, &target.key.sni, config.clone()));
            match dial.await {
                Ok(tls) => {
                    // Boxed: the splice below moves it into its own state.
                    upstream = Some(Box::new(tls));
                    break;
                }
                Err(e) if e.retry_safe => {
                    tracing::debug!(error = %e, "endpoint failed; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(upstream) = upstream else {
            return Err(last.unwrap_or_else(|| no_endpoints(entry)));
        };
        let (sent, received) = tokio::select! {
            spliced = splice_to_tls(client, upstream, self.ctx.tuning.idle_timeout) => spliced?,
            // A stream in flight outlives the start of a drain, not its end.
            _ = self.ctx.abort.cancelled() => return Ok(()),
        };
        tracing::debug!(sent, received, "connection finished");
        Ok(())
    }
}
