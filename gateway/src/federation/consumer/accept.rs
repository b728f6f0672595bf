//! The consumer side when the owner dials (`peers[].dial: owner`, Hamlet
//! v1alpha2 Appendix A): the peer's owner opens `EstablishStream` to our
//! federation server and pushes. The gRPC handler only hands the accepted
//! stream over ([`handoff`]); this peer's consumer task then runs the same
//! [`ConsumerSession`] and the same stream loop as when we dial, with our
//! requests travelling in the server's response stream. What differs is
//! only who waits for whom: instead of dialing with backoff, the task waits
//! for the owner's next stream, expiring stale imports meanwhile.
//!
//! One stream per peer at a time: a newer stream from the same peer
//! replaces the open one (which ends with `ABORTED`). The newer one wins
//! because an owner only dials again when it lost its stream, and the old
//! one may be a half-open connection we have not noticed yet; refusing the
//! newcomer would lock the owner out until keep-alive found the corpse.
//!
//! The Elsinore extensions travel the other way round from the usual
//! direction: a dialing Elsinore owner puts its snapshot size and the
//! window it offers in its request metadata, and we answer the window we
//! grant in the response metadata. A foreign owner sends neither and gets
//! one message in flight and the quiet-period snapshot, as in the usual
//! direction.

use elsinore_federation_api::ApiVersion;
use elsinore_federation_api::message::{
    self, SNAPSHOT_SIZE_HEADER, TRUST_BUNDLE_HEADER, WINDOW_HEADER,
};
use elsinore_federation_api::proto::federation::resourcediscovery::v1alpha2 as rd2;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::session::{CloseReason, ConsumerSession};
use super::{CacheWriter, ConsumerTask, Counters, StreamEnd, Wire};
use crate::config::DialMode;
use crate::federation::owner::sleep_until_opt;
use crate::federation::transport::PeerConn;
use crate::state::{PeerState, Shared};

/// A stream the owner opened to us, as the gRPC handler hands it over.
pub struct Accepted {
    inbound: Streaming<rd2::BidirectionalStream>,
    outbound: mpsc::Sender<Result<rd2::BidirectionalStream, Status>>,
    /// The snapshot size a dialing Elsinore announced; `None` from a
    /// foreign owner.
    announced: Option<usize>,
    /// The window we granted, if the owner offered one.
    window: Option<u32>,
    /// The trust bundle a dialing Elsinore publishes in its request
    /// headers, with the client chain its connection was verified by.
    bundle: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    wrong_direction: Status,
}

/// The response stream the federation server returns for an accepted push.
pub type PushStream = ReceiverStream<Result<rd2::BidirectionalStream, Status>>;

/// Hands a stream from `peer` (configured `dial: owner`) to its consumer
/// task over `to`, and answers the response headers: the window granted
/// (at most `our_window`) when the owner offered one.
pub async fn handoff(
    shared: &Shared,
    peer: &PeerState,
    request: Request<Streaming<rd2::BidirectionalStream>>,
    to: &mpsc::Sender<Accepted>,
    our_window: u32,
) -> Result<Response<PushStream>, Status> {
    let announced = header(&request, SNAPSHOT_SIZE_HEADER).and_then(|v| v.parse::<usize>().ok());
    let window = header(&request, WINDOW_HEADER)
        .and_then(|v| v.parse::<u32>().ok())
        .map(|offered| offered.clamp(1, our_window.max(1)));
    let bundle = request
        .metadata()
        .get_bin(TRUST_BUNDLE_HEADER)
        .and_then(|v| v.to_bytes().ok())
        .map(|pem| {
            let chain = request
                .extensions()
                .get::<PeerConn>()
                .map(|c| c.chain.to_vec())
                .unwrap_or_default();
            (pem.to_vec(), chain)
        });
    // Room for a full window of replies, so the loop never waits on the
    // owner to read them while the owner waits on us.
    let (outbound, rx) = mpsc::channel(window.unwrap_or(1) as usize + 8);
    let accepted = Accepted {
        inbound: request.into_inner(),
        outbound,
        announced,
        window,
        bundle,
        wrong_direction: wrong_direction(shared, peer),
    };
    to.send(accepted)
        .await
        .map_err(|_| Status::unavailable("gateway shutting down"))?;
    let mut response = Response::new(ReceiverStream::new(rx));
    if let Some(w) = window {
        response.metadata_mut().insert(WINDOW_HEADER, w.into());
    }
    Ok(response)
}

fn header<'a, T>(request: &'a Request<T>, name: &str) -> Option<&'a str> {
    request.metadata().get(name)?.to_str().ok()
}

/// What a stream in the direction `peer`'s config does not expect is
/// refused with: `InvalidArgument` naming the key to change.
pub fn wrong_direction(shared: &Shared, peer: &PeerState) -> Status {
    let (name, key) = (&peer.config.name, dial_key(shared, peer));
    Status::invalid_argument(match peer.config.dial {
        DialMode::Consumer => format!(
            "peer {name:?} is configured to dial us as a consumer ({key}: consumer) but sent a response, as an owner pushing its catalog does; to accept its pushes set {key}: owner"
        ),
        DialMode::Owner => format!(
            "peer {name:?} is configured to dial us as an owner and push ({key}: owner) but sent a request, as a consumer does; to serve it as a consumer set {key}: consumer"
        ),
    })
}

/// What ends a stream *we* dialed when the peer answers it the other way
/// round (its config says the other side dials): `InvalidArgument` naming
/// the key both sides must agree on.
pub fn answered_wrong_way(shared: &Shared, peer: &PeerState) -> Status {
    let (name, key) = (&peer.config.name, dial_key(shared, peer));
    Status::invalid_argument(match peer.config.dial {
        DialMode::Consumer => format!(
            "peer {name:?} sent a request on the stream we dialed as its consumer ({key}: consumer), as a consumer waiting for its owner's push does; both sides must agree on who dials ({key})"
        ),
        DialMode::Owner => format!(
            "peer {name:?} sent a response on the stream we dialed as its owner ({key}: owner), as an owner pushing its catalog does; both sides must agree on who dials ({key})"
        ),
    })
}

/// `peers[i].dial` of `peer`, as the config spells it.
fn dial_key(shared: &Shared, peer: &PeerState) -> String {
    let index = shared
        .peers
        .iter()
        .position(|p| p.config.name == peer.config.name)
        .unwrap_or_default();
    format!("peers[{index}].dial")
}

/// The next stream handed over, when accepting; never, when dialing.
pub(super) async fn next(incoming: &mut Option<&mut mpsc::Receiver<Accepted>>) -> Option<Accepted> {
    match incoming {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The accepting consumer's loop: wait for the owner's stream, serve it,
/// keep the imports (stale after `staleAfter`) while no stream is open.
pub(super) async fn run(
    task: &ConsumerTask,
    incoming: &mut mpsc::Receiver<Accepted>,
    writer: Option<&CacheWriter>,
) {
    // We cannot make the owner dial: readiness does not wait for it.
    let mut stats = Counters {
        attempted: true,
        ..Counters::default()
    };
    let mut session = task.new_session(&mut stats);
    task.publish(&session, &stats);
    let mut next_stream: Option<Accepted> = None;
    let mut opened_before = false;
    loop {
        let accepted = match next_stream.take() {
            Some(accepted) => accepted,
            None => loop {
                tokio::select! {
                    _ = task.shutdown.cancelled() => return task.save_cache(writer, &session),
                    accepted = incoming.recv() => match accepted {
                        Some(accepted) => break accepted,
                        None => return task.save_cache(writer, &session),
                    },
                    _ = sleep_until_opt(session.next_deadline()) => {
                        if !session.on_tick(Instant::now()).is_empty() {
                            task.publish(&session, &stats);
                            task.save_cache(writer, &session);
                        }
                    }
                }
            },
        };
        let Some(mut wire) = open(task, &mut session, accepted).await else {
            continue;
        };
        // Every stream after the first is the owner coming back.
        if std::mem::replace(&mut opened_before, true) {
            stats.reconnects += 1;
        }
        stats.connected = true;
        let end = task
            .serve(&mut session, &mut stats, writer, &mut wire, Some(incoming))
            .await;
        match end {
            StreamEnd::Shutdown => return task.save_cache(writer, &session),
            StreamEnd::Replaced(newer) => {
                tracing::info!("the owner opened a new stream; it replaces the open one");
                wire.fail(Status::aborted(
                    "replaced by a newer stream from the same peer",
                ));
                task.publish(&session, &stats);
                task.save_cache(writer, &session);
                next_stream = Some(*newer);
            }
            StreamEnd::Closed(reason) => {
                // Nothing to retry on our side (the owner dials), and no
                // refusal of the owner's makes us stop accepting its next
                // stream: every end is a lost stream.
                let reason = match reason {
                    CloseReason::Unauthenticated(text)
                    | CloseReason::InvalidArgument(text)
                    | CloseReason::Other(text) => CloseReason::Other(text),
                };
                let _ = task.stream_ended(&mut session, &mut stats, reason, 0.0);
                task.publish(&session, &stats);
                task.save_cache(writer, &session);
            }
        }
    }
}

/// Sends our first request on an accepted stream and opens the session's
/// stream. `None` when the owner is already gone.
async fn open(
    task: &ConsumerTask,
    session: &mut ConsumerSession,
    accepted: Accepted,
) -> Option<Wire> {
    let Accepted {
        inbound,
        outbound,
        announced,
        window,
        bundle,
        wrong_direction,
    } = accepted;
    let context = format!("elsinore/{}", task.shared.mesh);
    let first = message::Request::initial(ApiVersion::V1alpha2, context.clone());
    if outbound.send(Ok(first.to_v1alpha2())).await.is_err() {
        tracing::info!("the owner's stream ended before our first request");
        return None;
    }
    tracing::info!(
        snapshot_size = ?announced,
        window = window.unwrap_or(1),
        "federation stream accepted from the owner"
    );
    if let Some((pem, chain)) = bundle {
        task.learn_bundle(pem, Some(chain)).await;
    }
    let removed = session.on_stream_open(Instant::now(), announced);
    if !removed.is_empty() {
        tracing::info!(removed = ?removed, "empty snapshot: removed entries the owner no longer has");
    }
    Some(Wire::Accepted {
        rx: inbound,
        tx: outbound,
        context,
        wrong_direction,
    })
}
