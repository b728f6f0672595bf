//! The owner side when the owner dials (`peers[].dial: owner`, Hamlet
//! v1alpha2 Appendix A): one task per such peer with a `federation`
//! address dials the peer's federation listener over mTLS (the same
//! connector as our consumer), opens `EstablishStream`, waits for the
//! consumer's first request (it travels in the response stream), and then
//! runs the same [`OwnerSession`] as a stream a consumer opened to us —
//! per-peer filtering, window, NACK accounting — through [`drive`]. It
//! dials again with the consumer's backoff whenever the stream ends.
//!
//! The Elsinore extensions go the other way round: we put the snapshot
//! size and the window we offer in the request metadata, and a consumer
//! that is another Elsinore answers the window it grants in the response
//! metadata. A foreign consumer answers nothing and gets one in flight.

use std::sync::Arc;
use std::time::Duration;

use elsinore_federation_api::ApiVersion;
use elsinore_federation_api::message::{
    self, RequestError, SNAPSHOT_SIZE_HEADER, TRUST_BUNDLE_HEADER, WINDOW_HEADER,
};
use elsinore_federation_api::proto::federation::resourcediscovery::v1alpha2 as rd2;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

use super::session::{OwnerSession, OwnerSettings};
use super::{OwnerOptions, drive};
use crate::config::HostPort;
use crate::federation::consumer::accept::answered_wrong_way;
use crate::federation::consumer::session::{ConsumerSettings, backoff_delay};
use crate::state::{PeerState, Shared};

/// Everything one dialing owner needs.
pub struct OwnerDialer {
    pub shared: Arc<Shared>,
    pub peer: Arc<PeerState>,
    /// The peer's federation listener.
    pub address: HostPort,
    /// Our identity and this peer's bundle are read from here on every dial.
    pub credentials: Arc<crate::credentials::Credentials>,
    pub options: OwnerOptions,
    /// Only the backoff figures are used: the same as our consumer's.
    pub backoff: ConsumerSettings,
    pub shutdown: CancellationToken,
}

impl OwnerDialer {
    /// Dials, serves, and dials again, until shutdown or until the peer
    /// refuses us in a way the spec says not to retry.
    pub async fn run(self) {
        let span = tracing::info_span!("owner_dial", peer = %self.peer.config.name, address = %self.address);
        tracing::Instrument::instrument(self.run_inner(), span).await;
    }

    async fn run_inner(&self) {
        let mut failures: u32 = 0;
        loop {
            let worked = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                opened = self.open() => match opened {
                    Ok(stream) => self.serve(stream).await,
                    Err(status) if matches!(status.code(), Code::Unauthenticated | Code::InvalidArgument) => {
                        // As a consumer does with these codes: the peer
                        // says we are not federated, or not this way.
                        tracing::error!(code = ?status.code(), message = status.message(), "peer refused our stream; not dialing again");
                        return;
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), message = status.message(), "could not open the stream to the consumer");
                        false
                    }
                },
            };
            if self.shutdown.is_cancelled() {
                return;
            }
            // A stream that delivered its snapshot starts the count again.
            failures = if worked {
                1
            } else {
                failures.saturating_add(1)
            };
            let delay: Duration = backoff_delay(&self.backoff, failures, rand::random::<f64>());
            tracing::info!(?delay, "dialing the consumer again");
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn open(&self) -> Result<Opened, Status> {
        let channel = crate::federation::transport::connect_channel(
            Arc::clone(&self.credentials),
            &self.peer.config.name,
            &self.address,
            None,
        )
        .await?;
        // The snapshot is what the peer may see now; changes while the
        // consumer's first request is on its way reach it as updates.
        let snapshot = self
            .shared
            .exports
            .borrow()
            .visible_to(&self.peer.config.name);
        let max_window = self.options.max_window.max(1);
        let (tx, rx) = mpsc::channel(max_window as usize + 1);
        // The session ends a stream by sending an error; as the gRPC client
        // we cannot send a status, so the request stream just ends there.
        let outbound = tokio_stream::StreamExt::map_while(ReceiverStream::new(rx), Result::ok);
        let mut request = Request::new(outbound);
        request
            .metadata_mut()
            .insert(SNAPSHOT_SIZE_HEADER, snapshot.len().into());
        request
            .metadata_mut()
            .insert(WINDOW_HEADER, max_window.into());
        // Our trust bundle, as on a stream the consumer dials (there in the
        // response headers). Subscribed before reading: a change after
        // this read ends the stream, and the next dial carries the new one.
        let bundle_changes = self.credentials.published_changes();
        if let Some(pem) = &self.credentials.current().published_bundle {
            request.metadata_mut().insert_bin(
                TRUST_BUNDLE_HEADER,
                tonic::metadata::MetadataValue::from_bytes(pem),
            );
        }
        let mut client = rd2::discovery_service_client::DiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.peer.config.limits.message_bytes);
        let response = client.establish_stream(request).await?;
        let window = response
            .metadata()
            .get(WINDOW_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(1, |granted| granted.clamp(1, max_window));
        Ok(Opened {
            inbound: response.into_inner(),
            tx,
            snapshot,
            window,
            bundle_changes,
        })
    }

    /// Runs the owner session on an open stream; true when the whole
    /// snapshot went out.
    async fn serve(&self, stream: Opened) -> bool {
        let Opened {
            inbound,
            tx,
            snapshot,
            window,
            bundle_changes,
        } = stream;
        tracing::info!(
            snapshot_size = snapshot.len(),
            window,
            "stream to the consumer open"
        );
        let wrong_way = answered_wrong_way(&self.shared, &self.peer);
        let inbound = inbound.map(move |m| {
            message::Request::from_v1alpha2(m?).map_err(|e| match e {
                // The consumer pushes responses: it expects to be the
                // owner, as its config and ours disagree on who dials.
                RequestError::NotARequest => wrong_way.clone(),
            })
        });
        let session = OwnerSession::new(OwnerSettings {
            version: ApiVersion::V1alpha2,
            window,
            ack_timeout: self.options.ack_timeout,
        });
        drive(
            session,
            Arc::clone(&self.peer),
            snapshot,
            Box::pin(inbound),
            self.shared.exports.subscribe(),
            tx,
            message::Response::to_v1alpha2,
            self.shutdown.clone(),
            Some(bundle_changes),
        )
        .await
    }
}

/// A stream we opened to the consumer, before its first request.
struct Opened {
    inbound: tonic::Streaming<rd2::BidirectionalStream>,
    tx: mpsc::Sender<Result<rd2::BidirectionalStream, Status>>,
    snapshot: std::collections::BTreeMap<String, Arc<elsinore_federation_api::FederatedService>>,
    window: u32,
    bundle_changes: tokio::sync::watch::Receiver<u64>,
}
