//! The owner side on the wire: our `DiscoveryService` for both API versions.
//! Each stream gets one task that owns an [`OwnerSession`] ([`session`], the
//! sans-I/O state machine beside this file); this file only authenticates
//! the caller, negotiates the window, and moves messages between tonic and
//! the session. It must not encode or decode protos itself: the
//! version-neutral messages and their v1alpha1/v1alpha2 codec are
//! `elsinore_federation_api::message`'s.
//!
//! The same server is where a peer configured `dial: owner` pushes its own
//! catalog: such a stream is handed to that peer's consumer task
//! (`consumer::accept`), not served here. When *we* are the owner that
//! dials, [`dial`] opens the stream and runs the same session through
//! [`drive`].

pub mod dial;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use elsinore_federation_api::message::{
    self, Operation, RequestError, SNAPSHOT_SIZE_HEADER, WINDOW_HEADER,
};
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use elsinore_federation_api::{ApiVersion, FederatedService};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use self::session::{AckOutcome, Op, Outgoing, OwnerSession, OwnerSettings};
use super::consumer::accept::{self, Accepted};
use super::status::OwnerCounters;
use super::transport::PeerConn;
use crate::config::DialMode;
use crate::state::{PeerState, Shared};

/// How long a consumer may take to send its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the owner side, from config.
#[derive(Debug, Clone)]
pub struct OwnerOptions {
    /// The largest window we grant another Elsinore.
    pub max_window: u32,
    pub ack_timeout: Duration,
}

/// Serves `DiscoveryService` (v1alpha2 and v1alpha1) for one gateway.
#[derive(Clone)]
pub struct OwnerService {
    shared: Arc<Shared>,
    options: OwnerOptions,
    shutdown: CancellationToken,
    /// Peer name → its consumer task, for peers whose owner dials us.
    accepting: Arc<HashMap<String, mpsc::Sender<Accepted>>>,
}

/// The consumer's requests, whatever version they came in.
type InboundStream = Pin<Box<dyn Stream<Item = Result<message::Request, Status>> + Send>>;

impl OwnerService {
    pub fn new(shared: Arc<Shared>, options: OwnerOptions, shutdown: CancellationToken) -> Self {
        OwnerService {
            shared,
            options,
            shutdown,
            accepting: Arc::default(),
        }
    }

    /// Streams from the peers named here (configured `dial: owner`) are
    /// pushes: they go to that peer's consumer task.
    pub fn accepting(mut self, accepting: HashMap<String, mpsc::Sender<Accepted>>) -> Self {
        self.accepting = Arc::new(accepting);
        self
    }

    /// Identifies the caller by the trust domain of its verified SPIFFE ID.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Arc<PeerState>, Status> {
        let conn = request
            .extensions()
            .get::<PeerConn>()
            .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        let id = conn
            .spiffe_id
            .as_ref()
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        match self.shared.peer_for(id.trust_domain()) {
            Some(peer) => Ok(peer.clone()),
            None => {
                tracing::warn!(client.addr = %conn.remote, spiffe_id = %id, "refused federation stream from a trust domain that is not a configured peer");
                Err(Status::unauthenticated(format!(
                    "trust domain {} is not a federated peer of mesh {}",
                    id.trust_domain(),
                    self.shared.mesh
                )))
            }
        }
    }

    /// Negotiates the window: only a caller that asked (another Elsinore)
    /// gets more than one message in flight.
    fn negotiate_window<T>(&self, request: &Request<T>) -> Option<u32> {
        let asked = request.metadata().get(WINDOW_HEADER)?.to_str().ok()?;
        let asked: u32 = asked.parse().ok()?;
        Some(asked.clamp(1, self.options.max_window.max(1)))
    }

    fn open<M: Send + 'static>(
        &self,
        peer: Arc<PeerState>,
        version: ApiVersion,
        window: Option<u32>,
        inbound: InboundStream,
        encode: fn(&message::Response) -> M,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status> {
        let snapshot = self.shared.exports.borrow().visible_to(&peer.config.name);
        let size = snapshot.len();
        let negotiated = window.unwrap_or(1);
        let (tx, rx) = mpsc::channel(negotiated as usize + 1);
        let session = OwnerSession::new(OwnerSettings {
            version,
            window: negotiated,
            ack_timeout: self.options.ack_timeout,
        });
        let exports = self.shared.exports.subscribe();
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("owner_stream", peer = %peer.config.name, version = %version, window = negotiated);
        tokio::spawn(tracing::Instrument::instrument(
            drive(
                session, peer, snapshot, inbound, exports, tx, encode, shutdown,
            ),
            span,
        ));
        let mut response = Response::new(ReceiverStream::new(rx));
        response
            .metadata_mut()
            .insert(SNAPSHOT_SIZE_HEADER, size.into());
        if let Some(w) = window {
            response.metadata_mut().insert(WINDOW_HEADER, w.into());
        }
        Ok(response)
    }
}

/// Runs one owner stream (either direction) to its end and keeps the
/// peer's owner counters. Returns whether the whole snapshot was sent, so
/// that a dialer can tell a stream that worked from one that failed early.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive<M: Send + 'static>(
    mut session: OwnerSession,
    peer: Arc<PeerState>,
    snapshot: BTreeMap<String, Arc<FederatedService>>,
    mut inbound: InboundStream,
    mut exports: tokio::sync::watch::Receiver<Arc<crate::catalog::ExportCatalog>>,
    tx: mpsc::Sender<Result<M, Status>>,
    encode: fn(&message::Response) -> M,
    shutdown: CancellationToken,
) -> bool {
    let counters = &peer.owner;
    counters.window.store(
        u64::from(session.settings().window),
        std::sync::atomic::Ordering::Relaxed,
    );
    OwnerCounters::bump(&counters.streams_total);
    OwnerCounters::bump(&counters.streams_open);
    let end = run_stream(
        &mut session,
        &peer,
        snapshot,
        &mut inbound,
        &mut exports,
        &tx,
        encode,
        &shutdown,
    )
    .await;
    counters
        .streams_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    match end {
        Ok(()) => {
            tracing::info!("stream ended cleanly (closed by the consumer, or we are draining)")
        }
        Err(status) => {
            tracing::info!(code = ?status.code(), message = status.message(), "stream ended");
            let _ = tx.send(Err(status)).await;
        }
    }
    session.snapshot_sent()
}

#[allow(clippy::too_many_arguments)]
async fn run_stream<M: Send + 'static>(
    session: &mut OwnerSession,
    peer: &PeerState,
    snapshot: BTreeMap<String, Arc<FederatedService>>,
    inbound: &mut InboundStream,
    exports: &mut tokio::sync::watch::Receiver<Arc<crate::catalog::ExportCatalog>>,
    tx: &mpsc::Sender<Result<M, Status>>,
    encode: fn(&message::Response) -> M,
    shutdown: &CancellationToken,
) -> Result<(), Status> {
    let first = tokio::select! {
        // Draining: end the stream cleanly (status OK), so the consumer
            // keeps our imports as stale and dials again, not an error.
            _ = shutdown.cancelled() => return Ok(()),
        first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.next()) => first,
    };
    let first = match first {
        Err(_) => return Err(Status::deadline_exceeded("no initial request received")),
        Ok(None) => return Ok(()),
        Ok(Some(first)) => first?,
    };
    if !first.is_initial() {
        return Err(Status::invalid_argument(
            "the first request must not carry a response_nonce or status",
        ));
    }
    session
        .start(&first.resource_url, first.context, snapshot)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    exports.mark_changed();
    let name = &peer.config.name;
    loop {
        let now = tokio::time::Instant::now();
        while let Some(out) = session.poll_send(now) {
            OwnerCounters::bump(&peer.owner.sent);
            if tx.send(Ok(encode(&response(out)))).await.is_err() {
                return Ok(());
            }
        }
        let deadline = session.next_deadline();
        tokio::select! {
            // Draining: end the stream cleanly (status OK), so the consumer
            // keeps our imports as stale and dials again, not an error.
            _ = shutdown.cancelled() => return Ok(()),
            request = inbound.next() => match request {
                None => return Ok(()),
                Some(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "inbound stream error");
                    return Ok(());
                }
                Some(Ok(request)) => {
                    let outcome = session
                        .on_request(&request.response_nonce, request.status, tokio::time::Instant::now())
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    match outcome {
                        AckOutcome::Acked { .. } => OwnerCounters::bump(&peer.owner.acks),
                        AckOutcome::Nacked { name: service, code, message } => {
                            OwnerCounters::bump(&peer.owner.nacks);
                            tracing::warn!(peer = %name, service = %service, code, %message, "consumer NACKed a service");
                            if let Ok(mut last) = peer.owner.last_nack.lock() {
                                *last = Some((service, message));
                            }
                        }
                        AckOutcome::UnknownNonce { nonce } => {
                            OwnerCounters::bump(&peer.owner.unknown_nonces);
                            tracing::debug!(%nonce, "ACK/NACK for an unknown nonce ignored");
                        }
                    }
                }
            },
            changed = exports.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("gateway shutting down"));
                }
                let view = exports.borrow_and_update().visible_to(name);
                session.on_catalog(&view);
            }
            _ = sleep_until_opt(deadline) => {
                session
                    .on_tick(tokio::time::Instant::now())
                    .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
            }
        }
    }
}

pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The session's message as the version-neutral response the codec encodes.
fn response(out: Outgoing) -> message::Response {
    let Outgoing {
        nonce,
        name,
        op,
        service,
        context,
    } = out;
    let operation = match (op, service) {
        (Op::Upsert { created }, Some(service)) => Operation::Upsert { service, created },
        _ => Operation::Delete,
    };
    message::Response {
        nonce,
        resource_id: name,
        operation,
        context,
    }
}

#[tonic::async_trait]
impl rd2::discovery_service_server::DiscoveryService for OwnerService {
    type EstablishStreamStream = accept::PushStream;

    async fn establish_stream(
        &self,
        request: Request<Streaming<rd2::BidirectionalStream>>,
    ) -> Result<Response<Self::EstablishStreamStream>, Status> {
        let peer = self.authenticate(&request)?;
        if peer.config.dial == DialMode::Owner {
            let to = self
                .accepting
                .get(&peer.config.name)
                .ok_or_else(|| Status::unavailable("this peer's consumer is not running"))?;
            return accept::handoff(&self.shared, &peer, request, to, self.options.max_window)
                .await;
        }
        let window = self.negotiate_window(&request);
        let wrong_direction = accept::wrong_direction(&self.shared, &peer);
        let inbound = request.into_inner().map(move |m| {
            message::Request::from_v1alpha2(m?).map_err(|e| match e {
                RequestError::NotARequest => wrong_direction.clone(),
            })
        });
        self.open(
            peer,
            ApiVersion::V1alpha2,
            window,
            Box::pin(inbound),
            message::Response::to_v1alpha2,
        )
    }
}

/// The v1alpha1 face of the same service.
#[derive(Clone)]
pub struct OwnerServiceV1alpha1(pub OwnerService);

#[tonic::async_trait]
impl rd1::discovery_service_server::DiscoveryService for OwnerServiceV1alpha1 {
    type EstablishStreamStream = ReceiverStream<Result<rd1::StreamResponse, Status>>;

    async fn establish_stream(
        &self,
        request: Request<Streaming<rd1::StreamRequest>>,
    ) -> Result<Response<Self::EstablishStreamStream>, Status> {
        let peer = self.0.authenticate(&request)?;
        if peer.config.dial == DialMode::Owner {
            // v1alpha1 has no owner's push: this peer's config and ours
            // disagree on who dials.
            return Err(accept::wrong_direction(&self.0.shared, &peer));
        }
        let window = self.0.negotiate_window(&request);
        let inbound = request
            .into_inner()
            .map(|r| Ok(message::Request::from_v1alpha1(r?)));
        self.0.open(
            peer,
            ApiVersion::V1alpha1,
            window,
            Box::pin(inbound),
            message::Response::to_v1alpha1,
        )
    }
}
