//! The owner side on the wire: our `DiscoveryService` for both API versions.
//! Each stream gets one task that owns an [`OwnerSession`] ([`session`], the
//! sans-I/O state machine beside this file); this file only authenticates
//! the caller (its trust domain names the peer, its SPIFFE ID must be one
//! of the peer's `identities`), negotiates the window, publishes our trust
//! bundle in the response metadata (ending streams when it changes), and
//! moves messages between tonic and the session. It must not encode or decode protos itself: the
//! version-neutral messages and their v1alpha1/v1alpha2 codec are
//! `elsinore_federation_api::message`'s.
//!
//! The same server is where a peer configured `dial: owner` pushes its own
//! catalog: such a stream is handed to that peer's consumer task
//! (`consumer::accept`), not served here. When *we* are the owner that
//! dials, [`dial`] opens the stream and runs the same session through
//! [`drive`].

pub(crate) mod dial;
pub(crate) mod session;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use elsinore_federation_api::message::{
    self, Operation, RequestError, SNAPSHOT_SIZE_HEADER, TRUST_BUNDLE_HEADER, WINDOW_HEADER,
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
use super::status::{OwnerCounters, StreamRefusal};
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
    /// Where our published trust bundle comes from; `None` = none.
    credentials: Option<Arc<crate::credentials::Credentials>>,
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
            credentials: None,
            accepting: Arc::default(),
        }
    }

    /// Publishes our trust bundle (`identity.trustBundle`) on every stream,
    /// and ends open streams when it changes so consumers read the new one.
    pub fn publishing(mut self, credentials: Arc<crate::credentials::Credentials>) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Streams from the peers named here (configured `dial: owner`) are
    /// pushes: they go to that peer's consumer task.
    pub fn accepting(mut self, accepting: HashMap<String, mpsc::Sender<Accepted>>) -> Self {
        self.accepting = Arc::new(accepting);
        self
    }

    /// Identifies the caller: the trust domain of its verified SPIFFE ID
    /// names the peer, and the ID must be one of that peer's `identities`
    /// (any workload of the peer's mesh holds a certificate of its trust
    /// domain; only the listed ones speak for the peer). A refusal is a gRPC
    /// status, not a TLS alert, so the caller's operator reads why.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Arc<PeerState>, Status> {
        let refusals = &self.shared.stream_refusals;
        let conn = request
            .extensions()
            .get::<PeerConn>()
            .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        let id = conn.spiffe_id.as_ref().map_err(|e| {
            refusals.bump(StreamRefusal::NoPeerIdentity);
            tracing::warn!(client.addr = %conn.remote, reason = StreamRefusal::NoPeerIdentity.label(), "refused federation stream: client certificate: {e}");
            Status::unauthenticated(format!("client certificate: {e}"))
        })?;
        let Some(peer) = self.shared.peer_for(id.trust_domain()) else {
            refusals.bump(StreamRefusal::UnknownPeer);
            tracing::warn!(client.addr = %conn.remote, spiffe_id = %id, reason = StreamRefusal::UnknownPeer.label(), "refused federation stream from a trust domain that is not a configured peer");
            return Err(Status::unauthenticated(format!(
                "trust domain {} is not a federated peer of mesh {}",
                id.trust_domain(),
                self.shared.mesh
            )));
        };
        if !peer.config.allows(id) {
            refusals.bump(StreamRefusal::IdentityNotAllowed);
            tracing::warn!(client.addr = %conn.remote, spiffe_id = %id, peer = %peer.config.name, reason = StreamRefusal::IdentityNotAllowed.label(), "refused federation stream: the identity is not one of the peer's allowed identities (peers[].identities)");
            return Err(Status::permission_denied(format!(
                "{id} may not speak for peer {} of mesh {} (not in its allowed identities)",
                peer.config.name, self.shared.mesh
            )));
        }
        Ok(peer.clone())
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
        let published = self.credentials.as_ref().map(|c| {
            // Subscribed before reading: a change after this read ends the stream.
            let changes = c.published_changes();
            (changes, c.current().published_bundle.clone())
        });
        let (changes, bundle) = match published {
            Some((changes, bundle)) => (Some(changes), bundle),
            None => (None, None),
        };
        let span = tracing::info_span!("owner_stream", peer = %peer.config.name, version = %version, window = negotiated);
        tokio::spawn(tracing::Instrument::instrument(
            drive(
                session, peer, snapshot, inbound, exports, tx, encode, shutdown, changes,
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
        if let Some(pem) = bundle {
            response.metadata_mut().insert_bin(
                TRUST_BUNDLE_HEADER,
                tonic::metadata::MetadataValue::from_bytes(&pem),
            );
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
    bundle_changes: Option<tokio::sync::watch::Receiver<u64>>,
) -> bool {
    let counters = &peer.owner;
    counters.window.store(
        u64::from(session.settings().window),
        std::sync::atomic::Ordering::Relaxed,
    );
    OwnerCounters::bump(&counters.streams_total);
    OwnerCounters::bump(&counters.streams_open);
    let stream = run_stream(
        &mut session,
        &peer,
        snapshot,
        &mut inbound,
        &mut exports,
        &tx,
        encode,
        &shutdown,
    );
    // The bundle travels in the response headers, sent once: a consumer
    // reads a new one on its next stream, so a change ends this one.
    let end = tokio::select! {
        end = stream => end,
        () = bundle_changed(bundle_changes) => Err(Status::unavailable(
            "the owner's trust bundle changed: reconnect to read the new one",
        )),
    };
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

async fn bundle_changed(changes: Option<tokio::sync::watch::Receiver<u64>>) {
    match changes {
        Some(mut changes) => {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
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
