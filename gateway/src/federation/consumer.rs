//! The consumer side on the wire: one task per peer we import from. In the
//! usual direction (`dial: consumer`) it dials the peer over mTLS, opens the
//! stream in the peer's API version and reconnects with backoff when the
//! session says so; for a peer whose owner dials us (`dial: owner`) it takes
//! the streams the federation server accepted from that peer instead
//! ([`accept`]). Either way the same loop feeds every response to the
//! [`ConsumerSession`], sends back its ACK/NACK, publishes the imports and
//! persists them to the cache. The protocol decisions are [`session`]'s (the
//! sans-I/O state machine beside this file) and the wire encoding is
//! `elsinore_federation_api::message`'s; this file must not decide what a
//! response means nor build a proto by hand.

pub(crate) mod accept;
pub mod session;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use elsinore_federation_api::ApiVersion;
use elsinore_federation_api::message::{
    self, Rejected, ResponseError, SNAPSHOT_SIZE_HEADER, TRUST_BUNDLE_HEADER, WINDOW_HEADER,
};
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Streaming};

use self::session::{AfterClose, CloseReason, ConsumerSession, ConsumerSettings, Reply, SyncState};
use super::owner::sleep_until_opt;
use super::status::{ConsumerState, ConsumerView};
use crate::catalog::cache;
use crate::catalog::claims::{Claims, Rule};
use crate::config::HostPort;
use crate::state::{PeerState, Shared};

/// How often a changed import set is published at most (readers see a batch).
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// While a snapshot streams in, publish less often: every publish rebuilds
/// the merged imports view (O(imports)), and a 100,000-entry snapshot would
/// otherwise spend its time re-resolving names nobody can use yet.
const SNAPSHOT_PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How often a changed import set is written to the cache at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Why a stream ended when the owner closed it with status OK.
const CLEAN_END: &str = "owner closed the stream";

/// Everything one consumer task needs.
pub struct ConsumerTask {
    pub shared: Arc<Shared>,
    pub peer: Arc<PeerState>,
    /// Our identity and this peer's bundle are read from here on every dial.
    pub credentials: Arc<crate::credentials::Credentials>,
    pub settings: ConsumerSettings,
    pub window: u32,
    pub cache_dir: Option<std::path::PathBuf>,
    pub shutdown: CancellationToken,
}

/// Where the streams of one consumer task come from.
pub enum Source {
    /// We dial the owner at this address (`dial: consumer`).
    Dial(HostPort),
    /// The owner dials us and pushes (`dial: owner`): the federation server
    /// hands over each stream it accepted from this peer.
    Accept(mpsc::Receiver<accept::Accepted>),
}

/// How one stream ended, seen from the loop that serves it.
enum StreamEnd {
    /// The gateway is shutting down.
    Shutdown,
    /// The stream (or the dial) ended; what it means for retrying.
    Closed(CloseReason),
    /// A newer stream from the same owner arrived (accepting only): it
    /// replaces this one.
    Replaced(Box<accept::Accepted>),
}

/// One owner response as the codec read it.
type Received = Result<message::Response, Rejected>;

/// The open stream in one of the two versions.
enum Wire {
    V2 {
        rx: Streaming<rd2::BidirectionalStream>,
        tx: mpsc::Sender<rd2::BidirectionalStream>,
        context: String,
        /// What a request from the owner ends the stream with.
        wrong_way: tonic::Status,
    },
    V1 {
        rx: Streaming<rd1::StreamResponse>,
        tx: mpsc::Sender<rd1::StreamRequest>,
    },
    /// A v1alpha2 stream the owner opened to us: we are the gRPC server, so
    /// our requests go out in the response stream.
    Accepted {
        rx: Streaming<rd2::BidirectionalStream>,
        tx: mpsc::Sender<Result<rd2::BidirectionalStream, tonic::Status>>,
        context: String,
        /// What a request from the owner is refused with: it names the
        /// config key (built once, when the stream is accepted).
        wrong_direction: tonic::Status,
    },
}

impl Wire {
    async fn next(&mut self) -> Result<Option<Received>, tonic::Status> {
        match self {
            // An owner that sends requests on a stream we dialed is waiting
            // for us to push (its config says the owner dials); one that
            // sends requests on a stream it dialed to us thinks it is our
            // consumer. Either way no catalog flows: end it naming the key.
            Wire::V2 { rx, wrong_way, .. } => next_v2(rx, wrong_way).await,
            Wire::V1 { rx, .. } => Ok(rx.message().await?.map(message::Response::from_v1alpha1)),
            Wire::Accepted {
                rx,
                wrong_direction,
                ..
            } => next_v2(rx, wrong_direction).await,
        }
    }

    /// Ends a stream we accepted with `status` (the dialing owner sees it);
    /// a stream we dialed ends when it is dropped. Best effort: the stream
    /// being ended may be a dead connection whose queue no longer drains,
    /// and waiting on it would stall this peer's consumer.
    fn fail(&self, status: tonic::Status) {
        if let Wire::Accepted { tx, .. } = self {
            let _ = tx.try_send(Err(status));
        }
    }

    /// Tells the owner, before the stream is dropped, that a message broke
    /// `limits.messageBytes`: a status without a nonce (none could be read),
    /// code `RESOURCE_EXHAUSTED`. An owner counts it as an unknown nonce.
    async fn refuse_oversized(&mut self, message: String) {
        let (version, context) = match self {
            Wire::V2 { context, .. } => (ApiVersion::V1alpha2, context.clone()),
            Wire::V1 { .. } => (ApiVersion::V1alpha1, String::new()),
            // We are the gRPC server: the stream ends with the status itself.
            Wire::Accepted { .. } => {
                self.fail(tonic::Status::resource_exhausted(message));
                return;
            }
        };
        let mut request = message::Request::nack(version, String::new(), message, context);
        if let Some(status) = request.status.as_mut() {
            status.code = Code::ResourceExhausted as i32;
        }
        // Bounded: the stream is being abandoned, a stuck owner must not
        // hold the reconnect up.
        let sent = async {
            match self {
                Wire::V2 { tx, .. } => drained(tx, tx.send(request.to_v1alpha2()).await).await,
                Wire::V1 { tx, .. } => drained(tx, tx.send(request.to_v1alpha1()).await).await,
                Wire::Accepted { .. } => {}
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), sent).await;
    }

    async fn reply(&mut self, reply: Reply) -> bool {
        let (version, context) = match self {
            Wire::V2 { context, .. } | Wire::Accepted { context, .. } => {
                (ApiVersion::V1alpha2, context.clone())
            }
            Wire::V1 { .. } => (ApiVersion::V1alpha1, String::new()),
        };
        let request = match reply {
            Reply::Ack { nonce } => message::Request::ack(version, nonce, context),
            Reply::Nack { nonce, message } => {
                message::Request::nack(version, nonce, message, context)
            }
        };
        match self {
            Wire::V2 { tx, .. } => tx.send(request.to_v1alpha2()).await.is_ok(),
            Wire::V1 { tx, .. } => tx.send(request.to_v1alpha1()).await.is_ok(),
            Wire::Accepted { tx, .. } => tx.send(Ok(request.to_v1alpha2())).await.is_ok(),
        }
    }
}

/// The next response on a v1alpha2 stream, whichever side dialed it; a
/// request instead ends the stream with `wrong_way`.
async fn next_v2(
    rx: &mut Streaming<rd2::BidirectionalStream>,
    wrong_way: &tonic::Status,
) -> Result<Option<Received>, tonic::Status> {
    loop {
        let Some(m) = rx.message().await? else {
            return Ok(None);
        };
        if m.request.is_some() {
            return Err(wrong_way.clone());
        }
        match message::Response::from_v1alpha2(m) {
            // A bidirectional wrapper without a response carries nothing for us.
            Err(Rejected {
                error: ResponseError::NotAResponse,
                ..
            }) => continue,
            received => return Ok(Some(received)),
        }
    }
}

/// Waits until the transport took everything queued on `tx` (so a last
/// message goes out before the stream is dropped).
async fn drained<T, E>(tx: &mpsc::Sender<T>, sent: Result<(), E>) {
    if sent.is_err() {
        return;
    }
    while tx.capacity() < tx.max_capacity() && !tx.is_closed() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn close_reason(status: &tonic::Status) -> CloseReason {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unauthenticated => CloseReason::Unauthenticated(text),
        Code::InvalidArgument => CloseReason::InvalidArgument(text),
        _ => CloseReason::Other(text),
    }
}

impl ConsumerTask {
    /// Runs until shutdown, then waits for the last cache write.
    pub async fn run(self, source: Source) {
        let name = self.peer.config.name.clone();
        let writer = self
            .cache_dir
            .clone()
            .map(|dir| CacheWriter::spawn(dir, name.clone()));
        match source {
            Source::Dial(address) => {
                let span = tracing::info_span!("consumer", peer = %name, address = %address);
                let run = self.run_dialing(&address, writer.as_ref());
                tracing::Instrument::instrument(run, span).await;
            }
            Source::Accept(mut incoming) => {
                let span = tracing::info_span!("consumer", peer = %name, dial = "owner");
                let run = accept::run(&self, &mut incoming, writer.as_ref());
                tracing::Instrument::instrument(run, span).await;
            }
        }
        if let Some(writer) = writer {
            writer.close().await;
        }
    }

    async fn run_dialing(&self, address: &HostPort, writer: Option<&CacheWriter>) {
        let mut stats = Counters::default();
        let mut session = self.new_session(&mut stats);
        self.publish(&session, &stats);
        let mut attempt_at = Instant::now();
        loop {
            // Wait for the next attempt while still expiring stale imports.
            while Instant::now() < attempt_at || stats.failed.is_some() {
                let deadline = match (session.next_deadline(), stats.failed.is_some()) {
                    (Some(d), true) => Some(d),
                    (None, true) => None,
                    (d, false) => Some(d.map_or(attempt_at, |d| d.min(attempt_at))),
                };
                tokio::select! {
                    _ = self.shutdown.cancelled() => return self.save_cache(writer, &session),
                    _ = sleep_until_opt(deadline) => {}
                }
                if !session.on_tick(Instant::now()).is_empty() {
                    self.publish(&session, &stats);
                    self.save_cache(writer, &session);
                }
            }
            let mut wire = tokio::select! {
                _ = self.shutdown.cancelled() => return self.save_cache(writer, &session),
                opened = self.open(address, &mut session) => opened,
            };
            let end = match &mut wire {
                Ok(wire) => {
                    stats.connected = true;
                    self.serve(&mut session, &mut stats, writer, wire, None)
                        .await
                }
                Err(status) => StreamEnd::Closed(close_reason(status)),
            };
            let reason = match end {
                StreamEnd::Closed(reason) => reason,
                // Dialing: nothing hands over a stream.
                StreamEnd::Shutdown | StreamEnd::Replaced(_) => {
                    return self.save_cache(writer, &session);
                }
            };
            match self.stream_ended(&mut session, &mut stats, reason, rand::random::<f64>()) {
                AfterClose::ReconnectAt(at) => {
                    stats.reconnects += 1;
                    attempt_at = at;
                }
                AfterClose::GiveUp { reason } => {
                    tracing::error!(%reason, "peer refused federation; not retrying");
                    stats.failed = Some(reason);
                }
            }
            self.publish(&session, &stats);
            self.save_cache(writer, &session);
        }
    }

    /// The bookkeeping of a stream (or dial) that ended, in both directions.
    fn stream_ended(
        &self,
        session: &mut ConsumerSession,
        stats: &mut Counters,
        reason: CloseReason,
        jitter: f64,
    ) -> AfterClose {
        let ended = match &reason {
            // Draining or restarting: not an error. Imports stay (stale
            // after `staleAfter`) and we dial again with backoff.
            CloseReason::Other(text) if text == CLEAN_END => {
                tracing::info!(
                    "owner ended the stream cleanly; keeping its imports until staleAfter"
                );
                "the owner ended the stream cleanly (draining or restarting)".to_owned()
            }
            CloseReason::Unauthenticated(text)
            | CloseReason::InvalidArgument(text)
            | CloseReason::Other(text) => {
                tracing::warn!(reason = ?reason, "federation stream lost");
                format!("stream lost: {text}")
            }
        };
        if stats.connected {
            stats.last_stream_end = Some(ended);
        }
        if session.stats().snapshot_complete {
            stats.synced_until = Some(SystemTime::now());
        }
        let after = session.on_stream_closed(Instant::now(), reason, jitter);
        stats.connected = false;
        stats.attempted = true;
        after
    }

    /// Serves one open stream until it ends: every response to the session,
    /// its ACK/NACK back, imports published and saved in batches. With
    /// `incoming` (accepting), a newer stream from the owner ends this one.
    async fn serve(
        &self,
        session: &mut ConsumerSession,
        stats: &mut Counters,
        writer: Option<&CacheWriter>,
        wire: &mut Wire,
        mut incoming: Option<&mut mpsc::Receiver<accept::Accepted>>,
    ) -> StreamEnd {
        self.publish(session, stats);
        let mut dirty_since: Option<Instant> = None;
        let mut last_save = Instant::now();
        let mut unsaved = false;
        loop {
            let every = if session.stats().snapshot_complete {
                PUBLISH_EVERY
            } else {
                SNAPSHOT_PUBLISH_EVERY
            };
            let publish_at = dirty_since.map(|t| t + every);
            let deadline = match (session.next_deadline(), publish_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return StreamEnd::Shutdown,
                newer = accept::next(&mut incoming) => match newer {
                    Some(newer) => return StreamEnd::Replaced(Box::new(newer)),
                    None => return StreamEnd::Shutdown,
                },
                next = wire.next() => match next {
                    Err(status) if status.code() == Code::OutOfRange
                        && status.message().contains("message length too large") =>
                    {
                        return self.refuse_oversized(session, wire, &status).await;
                    }
                    Err(status) => {
                        wire.fail(status.clone());
                        return StreamEnd::Closed(close_reason(&status));
                    }
                    Ok(None) => return StreamEnd::Closed(CloseReason::Other(CLEAN_END.to_owned())),
                    Ok(Some(r)) => {
                        let was_complete = session.stats().snapshot_complete;
                        let service = match &r {
                            Ok(r) => r.resource_id.clone(),
                            Err(r) => r.resource_id.clone(),
                        };
                        self.refresh_local_names(session, stats);
                        let handled = session.on_message(Instant::now(), r);
                        let reply = handled.reply;
                        if !handled.reconciled.is_empty() {
                            tracing::info!(removed = ?handled.reconciled, "snapshot complete: removed entries the owner no longer has");
                        }
                        log_nack(&service, &reply, handled.refused);
                        if !wire.reply(reply).await {
                            return StreamEnd::Closed(CloseReason::Other("request stream closed".to_owned()));
                        }
                        dirty_since.get_or_insert_with(Instant::now);
                        unsaved = true;
                        if !was_complete && session.stats().snapshot_complete {
                            // Snapshot complete: publish and persist at once.
                            dirty_since = Instant::now().checked_sub(SNAPSHOT_PUBLISH_EVERY);
                        }
                    }
                },
                _ = sleep_until_opt(deadline) => {}
            }
            let now = Instant::now();
            let was_complete = session.stats().snapshot_complete;
            let removed = session.on_tick(now);
            if !was_complete && session.stats().snapshot_complete {
                // A foreign owner's snapshot completes by quiet period: show it at once.
                dirty_since = now.checked_sub(SNAPSHOT_PUBLISH_EVERY);
                unsaved = true;
            } else if !removed.is_empty() {
                dirty_since.get_or_insert(now);
                unsaved = true;
            }
            if dirty_since.is_some_and(|t| now >= t + every) {
                stats.attempted |= session.stats().snapshot_complete;
                self.publish(session, stats);
                dirty_since = None;
                if unsaved && (now >= last_save + SAVE_EVERY || session.stats().snapshot_complete) {
                    self.save_cache(writer, session);
                    last_save = now;
                    unsaved = false;
                }
            }
        }
    }

    /// Ends the stream on a message over `limits.messageBytes`, which
    /// tonic refused before decoding it (so memory stays bounded).
    async fn refuse_oversized(
        &self,
        session: &mut ConsumerSession,
        wire: &mut Wire,
        status: &tonic::Status,
    ) -> StreamEnd {
        let limit = self.peer.config.limits.message_bytes;
        let message = format!(
            "a message broke limits.messageBytes ({limit}): {}; ending the stream",
            status.message()
        );
        tracing::warn!(rule = %Rule::MessageBytes, %message, "refused a message from the owner");
        session.on_message_too_large();
        wire.refuse_oversized(message.clone()).await;
        StreamEnd::Closed(CloseReason::Other(format!("ResourceExhausted: {message}")))
    }

    async fn open(
        &self,
        address: &HostPort,
        session: &mut ConsumerSession,
    ) -> Result<Wire, tonic::Status> {
        // The owner's certificate chain of the last dial: a bundle the
        // owner publishes is judged against it (credentials::learned).
        let chain: super::transport::ChainSlot = Arc::default();
        let channel = super::transport::connect_channel(
            Arc::clone(&self.credentials),
            &self.peer.config.name,
            address,
            Some(Arc::clone(&chain)),
        )
        .await?;
        let window = self.window.to_string();
        let (wire, headers) = match self.peer.config.api_version {
            ApiVersion::V1alpha2 => {
                let context = format!("elsinore/{}", self.shared.mesh);
                let first = message::Request::initial(ApiVersion::V1alpha2, context.clone());
                let (tx, request) = self.opening(first.to_v1alpha2(), &window).await;
                let mut client =
                    rd2::discovery_service_client::DiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(self.peer.config.limits.message_bytes);
                let (headers, rx, _) = client.establish_stream(request).await?.into_parts();
                let wrong_way = accept::answered_wrong_way(&self.shared, &self.peer);
                let wire = Wire::V2 {
                    rx,
                    tx,
                    context,
                    wrong_way,
                };
                (wire, headers)
            }
            ApiVersion::V1alpha1 => {
                let first = message::Request::initial(ApiVersion::V1alpha1, String::new());
                let (tx, request) = self.opening(first.to_v1alpha1(), &window).await;
                let mut client =
                    rd1::discovery_service_client::DiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(self.peer.config.limits.message_bytes);
                let (headers, rx, _) = client.establish_stream(request).await?.into_parts();
                (Wire::V1 { rx, tx }, headers)
            }
        };
        let size = headers
            .get(SNAPSHOT_SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let granted = headers
            .get(WINDOW_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("1");
        tracing::info!(snapshot_size = ?size, window = granted, "federation stream open");
        if let Some(pem) = headers
            .get_bin(TRUST_BUNDLE_HEADER)
            .and_then(|v| v.to_bytes().ok())
        {
            let chain = chain.lock().ok().and_then(|mut c| c.take());
            self.learn_bundle(pem.to_vec(), chain).await;
        }
        let removed = session.on_stream_open(Instant::now(), size);
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, "empty snapshot: removed entries the owner no longer has");
        }
        Ok(wire)
    }

    /// The request side of a stream we dial, in either version's messages:
    /// its sender, and the request that carries `first` and our window.
    async fn opening<M>(
        &self,
        first: M,
        window: &str,
    ) -> (mpsc::Sender<M>, Request<ReceiverStream<M>>) {
        let (tx, rx) = mpsc::channel(self.window as usize + 8);
        let _ = tx.send(first).await;
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Ok(v) = window.parse() {
            request.metadata_mut().insert(WINDOW_HEADER, v);
        }
        (tx, request)
    }

    /// Hands a bundle the owner published on this (authenticated) stream to
    /// the credentials, which decide (`peers[].followTrustBundle`).
    async fn learn_bundle(
        &self,
        pem: Vec<u8>,
        chain: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    ) {
        let credentials = Arc::clone(&self.credentials);
        let peer = self.peer.config.name.clone();
        let learned =
            tokio::task::spawn_blocking(move || credentials.learn(&peer, &pem, chain.as_deref()))
                .await;
        match learned {
            Ok(Ok(outcome)) => tracing::debug!(?outcome, "published trust bundle"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "trust bundle published by the peer refused")
            }
            Err(error) => tracing::error!(%error, "learning the peer's trust bundle failed"),
        }
    }

    /// The session of this task, whichever side dials: set up once, with
    /// the claim rules for this peer and what the cache holds (restored
    /// through those rules).
    fn new_session(&self, stats: &mut Counters) -> ConsumerSession {
        let mut session = ConsumerSession::new(self.settings.clone());
        let peers: Vec<_> = self.shared.peers.iter().map(|p| p.config.clone()).collect();
        session.set_claims(Claims::for_peer(&self.peer.config, &peers));
        self.refresh_local_names(&mut session, stats);
        self.restore_cache(&mut session);
        session
    }

    /// Tells the claim rules this mesh's export names when they changed
    /// (a reload) since the last look. A read of the watch per message: no
    /// lock is held beyond the borrow.
    fn refresh_local_names(&self, session: &mut ConsumerSession, counters: &mut Counters) {
        let exports = Arc::clone(&self.shared.exports.borrow());
        if counters
            .exports_seen
            .as_ref()
            .is_some_and(|seen| Arc::ptr_eq(seen, &exports))
        {
            return;
        }
        session.claims_mut().set_local(exports.fqdns());
        counters.exports_seen = Some(exports);
    }

    fn restore_cache(&self, session: &mut ConsumerSession) {
        let Some(dir) = &self.cache_dir else { return };
        match cache::load(dir, &self.peer.config.name) {
            Ok(entries) if entries.is_empty() => {}
            Ok(entries) => {
                let now = SystemTime::now();
                let n = entries.len();
                let entries = entries
                    .into_iter()
                    .map(|(svc, at)| (svc, now.duration_since(at).unwrap_or_default()))
                    .collect();
                session.restore(entries, Instant::now());
                tracing::info!(
                    entries = n,
                    kept = session.imports().len(),
                    "restored imports from the cache"
                );
            }
            Err(error) => {
                tracing::error!(%error, "import cache unreadable; starting without it");
            }
        }
    }

    /// Hands the current imports to the cache writer (no file I/O here).
    fn save_cache(&self, writer: Option<&CacheWriter>, session: &ConsumerSession) {
        let Some(writer) = writer else { return };
        let now = Instant::now();
        let wall = SystemTime::now();
        let entries: Vec<_> = session
            .imports()
            .values()
            .map(|i| {
                (
                    i.service.clone(),
                    wall - now.saturating_duration_since(i.confirmed_at),
                )
            })
            .collect();
        writer.latest.send_replace(Some(Arc::new(entries)));
    }

    fn publish(&self, session: &ConsumerSession, counters: &Counters) {
        let s = session.stats();
        let (state, detail) = match session.state() {
            SyncState::Connecting => (ConsumerState::Connecting, None),
            SyncState::Syncing => (ConsumerState::Syncing, None),
            SyncState::Synced => (ConsumerState::Synced, None),
            SyncState::Disconnected { .. } => (
                ConsumerState::Disconnected,
                counters.last_stream_end.clone(),
            ),
            SyncState::Failed { reason } => (ConsumerState::Failed, Some(reason.clone())),
            SyncState::Stopped => (ConsumerState::Stopped, None),
        };
        let view = ConsumerView {
            state,
            detail: detail.or_else(|| counters.failed.clone()),
            attempted: counters.attempted || s.snapshot_complete || counters.failed.is_some(),
            connected: counters.connected,
            snapshot_complete: s.snapshot_complete,
            messages: s.messages,
            acks: s.acks,
            nacks: s.nacks,
            reconnects: counters.reconnects,
            last_ack_at: s.last_ack_at.map(|t| SystemTime::now() - t.elapsed()),
            last_nack: s.last_nack.clone(),
            synced_until: counters.synced_until,
            refused: s.refused.clone(),
            refusals: session.refusals().iter().cloned().collect(),
            services: session
                .imports()
                .values()
                .map(|i| i.service.clone())
                .collect(),
        };
        self.peer.consumer.send_replace(Arc::new(view));
        self.shared.imports_changed.notify_one();
    }
}

/// Driver-side counters the session does not keep.
#[derive(Default)]
struct Counters {
    connected: bool,
    /// How the last open stream ended (not a failed dial): shown while
    /// disconnected, so a drained peer reads differently from a broken one.
    last_stream_end: Option<String>,
    attempted: bool,
    reconnects: u64,
    failed: Option<String>,
    /// When the last stream with a complete snapshot ended.
    synced_until: Option<SystemTime>,
    /// The export catalog the claim rules last saw.
    exports_seen: Option<Arc<crate::catalog::ExportCatalog>>,
}

/// A NACK, in the log: a refused claim names its rule.
fn log_nack(service: &str, reply: &Reply, refused: Option<Rule>) {
    match (reply, refused) {
        (Reply::Nack { message, .. }, Some(rule)) => {
            tracing::warn!(%service, %rule, %message, "refused an entry the peer may not claim");
        }
        (Reply::Nack { message, .. }, None) => {
            tracing::warn!(%service, %message, "NACKed an entry");
        }
        (Reply::Ack { .. }, _) => {}
    }
}

type CacheEntries = Arc<Vec<(Arc<elsinore_federation_api::FederatedService>, SystemTime)>>;

/// Writes one peer's import cache off the async runtime: the consumer hands
/// over the latest entries, the writer saves them on a blocking thread, one
/// write at a time (in order), and a burst of updates becomes one write.
struct CacheWriter {
    latest: tokio::sync::watch::Sender<Option<CacheEntries>>,
    task: tokio::task::JoinHandle<()>,
}

impl CacheWriter {
    fn spawn(dir: std::path::PathBuf, peer: String) -> CacheWriter {
        let (latest, mut rx) = tokio::sync::watch::channel::<Option<CacheEntries>>(None);
        let task = tokio::spawn(async move {
            // Ends once the sender is dropped and the last value is written.
            while rx.changed().await.is_ok() {
                let Some(entries) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let (dir, peer) = (dir.clone(), peer.clone());
                let saved =
                    tokio::task::spawn_blocking(move || cache::save(&dir, &peer, &entries)).await;
                match saved {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(%error, "could not write the import cache"),
                    Err(error) => tracing::error!(%error, "import cache writer failed"),
                }
            }
        });
        CacheWriter { latest, task }
    }

    /// Flushes the last entries handed over and stops.
    async fn close(self) {
        drop(self.latest);
        let _ = self.task.await;
    }
}
