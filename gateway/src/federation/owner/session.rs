//! The owner side of one Hamlet federation stream, as a sans-I/O state
//! machine: one [`OwnerSession`] per consumer stream. It owns the snapshot
//! bookkeeping, the *pending* map (latest state per service name not yet
//! sent), the messages in flight (nonce → name) with their send times, nonce
//! generation and ACK/NACK accounting. It does no I/O and spawns nothing: the
//! tonic code around it feeds events in (`start`, `on_request`, `on_catalog`,
//! `on_tick`) with the current time, and drains `poll_send` into the stream.
//! It knows nothing of protos; the caller turns an [`Outgoing`] into the
//! version-neutral `message::Response`, which the federation-api codec
//! encodes in the negotiated [`ApiVersion`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use elsinore_federation_api::{ApiVersion, FederatedService};
use tokio::time::Instant;

/// What the owner decided for this stream before the first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerSettings {
    /// The wire version of the stream (decides the resource URL and whether
    /// the context is echoed).
    pub version: ApiVersion,
    /// Messages allowed in flight: 1 with a foreign peer (as the spec asks),
    /// or what two Elsinore gateways negotiated. 0 is treated as 1.
    pub window: u32,
    /// How long a message may stay unacknowledged before the stream is ended.
    pub ack_timeout: Duration,
}

/// The operation of one outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Full state of the service. `created` is true when the consumer does
    /// not have the name from this stream (never sent, or last sent as a
    /// DELETE): v1alpha1 encodes that as CREATE, otherwise as UPDATE.
    Upsert { created: bool },
    /// The service is gone.
    Delete,
}

/// One message for the caller to encode and send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Unique per stream; the consumer echoes it in its ACK/NACK.
    pub nonce: String,
    /// The service name (`resource_id` in v1alpha2).
    pub name: String,
    /// Upsert or delete.
    pub op: Op,
    /// The full object: `Some` for [`Op::Upsert`], `None` for [`Op::Delete`].
    pub service: Option<Arc<FederatedService>>,
    /// The context the consumer gave on its first request (v1alpha2); empty
    /// for v1alpha1, which has no such field.
    pub context: String,
}

/// The `status` of a consumer request (a `google.rpc.Status`, details dropped).
pub use elsinore_federation_api::message::Status;

/// What a consumer request meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// The message carrying `name` was accepted.
    Acked { name: String },
    /// The message carrying `name` was rejected; it is not resent until the
    /// service changes again.
    Nacked {
        name: String,
        code: i32,
        message: String,
    },
    /// The nonce matches nothing in flight (stale, duplicate or made up);
    /// counted and otherwise ignored.
    UnknownNonce { nonce: String },
}

/// Why the session refuses an event or ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The first request asked for another resource type (→ InvalidArgument).
    #[error("bad resource url {got:?}, expected {expected:?}")]
    BadResourceUrl { expected: &'static str, got: String },
    /// A message stayed unacknowledged too long (→ the stream is ended).
    #[error("no ack for nonce {nonce:?} (service {name:?}) after {waited:?}")]
    AckTimeout {
        nonce: String,
        name: String,
        waited: Duration,
    },
    /// An ACK/NACK arrived before the first request (→ InvalidArgument).
    #[error("request with a response nonce before the first request")]
    NotStarted,
    /// A second "first request" on the same stream (→ InvalidArgument).
    #[error("stream already started")]
    AlreadyStarted,
}

/// Counters and gauges of one session, for metrics and the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerStats {
    /// Messages handed out by `poll_send`.
    pub sent: u64,
    /// ACKs of in-flight nonces.
    pub acks: u64,
    /// NACKs of in-flight nonces.
    pub nacks: u64,
    /// Requests whose nonce matched nothing in flight.
    pub unknown_nonces: u64,
    /// Messages currently awaiting an ACK/NACK.
    pub in_flight: usize,
    /// Names with a state not yet sent.
    pub pending: usize,
    /// The last NACK: (service name, consumer's message).
    pub last_nack: Option<(String, String)>,
}

/// The latest not-yet-sent state of one name.
#[derive(Debug, Clone)]
enum PendingOp {
    Upsert(Arc<FederatedService>),
    Delete,
}

#[derive(Debug, Clone)]
struct Pending {
    op: PendingOp,
    /// Place in line, fixed when the name first became pending so that a
    /// service changing on every round trip cannot starve the others.
    order: u64,
}

#[derive(Debug, Clone)]
struct InFlight {
    nonce: String,
    name: String,
    sent_at: Instant,
}

/// The owner side of one consumer stream. See the module docs.
#[derive(Debug)]
pub struct OwnerSession {
    settings: OwnerSettings,
    /// `Some(context)` once the first request was accepted.
    context: Option<String>,
    /// Random per session, so nonces of two streams never collide and a
    /// nonce from an older stream is recognised as unknown.
    nonce_prefix: String,
    /// Sequence of the next nonce; also orders `in_flight` by send time.
    next_seq: u64,
    /// The last catalog view given to us: what the consumer should end with.
    known: BTreeMap<String, Arc<FederatedService>>,
    /// What the consumer has been sent, in flight included: the last UPSERT
    /// per name; a name whose last message was a DELETE is absent.
    sent: BTreeMap<String, Arc<FederatedService>>,
    /// Latest unsent state per name, plus its place in line.
    pending: BTreeMap<String, Pending>,
    /// `order` → name, the send order of `pending`.
    queue: BTreeMap<u64, String>,
    next_order: u64,
    /// Snapshot names not sent yet; nothing else is sent while non-empty.
    snapshot_remaining: BTreeSet<String>,
    snapshot_size: usize,
    /// seq → message, so the first entry is the oldest.
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_names: BTreeSet<String>,
    stats: OwnerStats,
}

impl OwnerSession {
    /// A session waiting for the consumer's first request.
    pub fn new(settings: OwnerSettings) -> Self {
        let settings = OwnerSettings {
            window: settings.window.max(1),
            ..settings
        };
        Self {
            settings,
            context: None,
            nonce_prefix: format!("{:016x}", rand::random::<u64>()),
            next_seq: 0,
            known: BTreeMap::new(),
            sent: BTreeMap::new(),
            pending: BTreeMap::new(),
            queue: BTreeMap::new(),
            next_order: 0,
            snapshot_remaining: BTreeSet::new(),
            snapshot_size: 0,
            in_flight: BTreeMap::new(),
            in_flight_names: BTreeSet::new(),
            stats: OwnerStats::default(),
        }
    }

    /// The settings in force (window already clamped to at least 1).
    pub fn settings(&self) -> &OwnerSettings {
        &self.settings
    }

    /// The consumer's first request: checks `resource_url` against the
    /// session's version, remembers `context` (v1alpha2 only; v1alpha1 has
    /// none) and makes every name of `snapshot` pending. On error the session
    /// stays unstarted.
    pub fn start(
        &mut self,
        resource_url: &str,
        context: String,
        snapshot: BTreeMap<String, Arc<FederatedService>>,
    ) -> Result<(), SessionError> {
        if self.context.is_some() {
            return Err(SessionError::AlreadyStarted);
        }
        let expected = elsinore_federation_api::type_url(self.settings.version);
        if resource_url != expected {
            return Err(SessionError::BadResourceUrl {
                expected,
                got: resource_url.to_owned(),
            });
        }
        self.context = Some(match self.settings.version {
            ApiVersion::V1alpha2 => context,
            ApiVersion::V1alpha1 => String::new(),
        });
        self.snapshot_size = snapshot.len();
        self.snapshot_remaining = snapshot.keys().cloned().collect();
        for (name, service) in &snapshot {
            self.set_pending(name, PendingOp::Upsert(Arc::clone(service)));
        }
        self.known = snapshot;
        Ok(())
    }

    /// How many messages form the initial snapshot: the first that many
    /// messages from `poll_send` are exactly the snapshot's names, once each.
    /// (The caller announces the catalog's size itself; tests read this.)
    #[cfg(test)]
    pub fn snapshot_size(&self) -> usize {
        self.snapshot_size
    }

    /// True once every snapshot message has been handed out (not
    /// necessarily acknowledged).
    pub fn snapshot_sent(&self) -> bool {
        self.context.is_some() && self.snapshot_remaining.is_empty()
    }

    /// A later consumer request: an ACK (`status` absent or code 0) or a NACK
    /// of `nonce`. A NACK frees the slot and is recorded but not resent: the
    /// consumer keeps its old entry and the next change of the service is
    /// sent as usual. `now` is unused today; it is part of the event so that
    /// round-trip timing can be added without changing callers.
    pub fn on_request(
        &mut self,
        nonce: &str,
        status: Option<Status>,
        _now: Instant,
    ) -> Result<AckOutcome, SessionError> {
        if self.context.is_none() {
            return Err(SessionError::NotStarted);
        }
        let Some(message) = self.take_in_flight(nonce) else {
            self.stats.unknown_nonces += 1;
            return Ok(AckOutcome::UnknownNonce {
                nonce: nonce.to_owned(),
            });
        };
        self.in_flight_names.remove(&message.name);
        match status {
            Some(Status { code, message: why }) if code != 0 => {
                self.stats.nacks += 1;
                self.stats.last_nack = Some((message.name.clone(), why.clone()));
                Ok(AckOutcome::Nacked {
                    name: message.name,
                    code,
                    message: why,
                })
            }
            _ => {
                self.stats.acks += 1;
                Ok(AckOutcome::Acked { name: message.name })
            }
        }
    }

    /// The catalog visible to this peer changed; `view` is the new full view.
    /// Names new or changed (compared by value) become pending upserts,
    /// vanished names pending deletes. Ignored before `start`, which carries
    /// the view the stream begins with.
    pub fn on_catalog(&mut self, view: &BTreeMap<String, Arc<FederatedService>>) {
        if self.context.is_none() {
            return;
        }
        let mut changes = Vec::new();
        for (name, service) in view {
            if self.known.get(name).is_none_or(|old| !same(old, service)) {
                changes.push((name.clone(), Some(Arc::clone(service))));
            }
        }
        for name in self.known.keys() {
            if !view.contains_key(name) {
                changes.push((name.clone(), None));
            }
        }
        for (name, desired) in changes {
            self.desire(&name, desired);
        }
        self.known = view.clone();
    }

    /// The next message to send, if a window slot is free and something is
    /// pending; call until `None`. While the snapshot is not fully sent, only
    /// snapshot names are sent.
    pub fn poll_send(&mut self, now: Instant) -> Option<Outgoing> {
        let context = self.context.clone()?;
        if self.in_flight.len() >= self.settings.window as usize {
            return None;
        }
        let name = if let Some(name) = self.snapshot_remaining.pop_first() {
            // A snapshot name was never sent, so it cannot be in flight, and
            // `desire` keeps a pending entry for it until it is sent.
            name
        } else {
            self.queue
                .values()
                .find(|name| !self.in_flight_names.contains(*name))?
                .clone()
        };
        let pending = self.pending.remove(&name)?;
        self.queue.remove(&pending.order);
        let (op, service) = match pending.op {
            PendingOp::Upsert(service) => {
                let previous = self.sent.insert(name.clone(), Arc::clone(&service));
                (
                    Op::Upsert {
                        created: previous.is_none(),
                    },
                    Some(service),
                )
            }
            PendingOp::Delete => {
                self.sent.remove(&name);
                (Op::Delete, None)
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let nonce = format!("{}-{seq}", self.nonce_prefix);
        self.in_flight.insert(
            seq,
            InFlight {
                nonce: nonce.clone(),
                name: name.clone(),
                sent_at: now,
            },
        );
        self.in_flight_names.insert(name.clone());
        self.stats.sent += 1;
        Some(Outgoing {
            nonce,
            name,
            op,
            service,
            context,
        })
    }

    /// Ends the stream with [`SessionError::AckTimeout`] once the oldest
    /// message in flight has waited `ack_timeout` (at or after
    /// [`Self::next_deadline`], so a caller sleeping until the deadline is
    /// not woken for nothing).
    pub fn on_tick(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(oldest) = self.in_flight.values().next() else {
            return Ok(());
        };
        let waited = now.saturating_duration_since(oldest.sent_at);
        if waited >= self.settings.ack_timeout {
            return Err(SessionError::AckTimeout {
                nonce: oldest.nonce.clone(),
                name: oldest.name.clone(),
                waited,
            });
        }
        Ok(())
    }

    /// When `on_tick` will fail if nothing is acknowledged meanwhile; `None`
    /// when nothing is in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .next()
            .map(|oldest| oldest.sent_at + self.settings.ack_timeout)
    }

    /// Counters and gauges of this session.
    #[cfg(test)]
    pub fn stats(&self) -> OwnerStats {
        OwnerStats {
            in_flight: self.in_flight.len(),
            pending: self.pending.len(),
            ..self.stats.clone()
        }
    }

    /// Records that the consumer should end up with `desired` for `name`
    /// (`None` = absent) and updates the pending entry accordingly.
    fn desire(&mut self, name: &str, desired: Option<Arc<FederatedService>>) {
        if self.snapshot_remaining.contains(name) {
            // The snapshot slot is sent whatever happens, so the consumer's
            // count of snapshot messages stays right: latest state, or a
            // DELETE if the name vanished before its turn.
            let op = desired.map_or(PendingOp::Delete, PendingOp::Upsert);
            self.set_pending(name, op);
            return;
        }
        let already = match (&desired, self.sent.get(name)) {
            (Some(want), Some(have)) => same(want, have),
            (None, None) => true,
            _ => false,
        };
        if already {
            // The consumer has (or is being sent) exactly this: nothing to
            // send, and a delete of a name it never got is dropped.
            self.clear_pending(name);
        } else {
            let op = desired.map_or(PendingOp::Delete, PendingOp::Upsert);
            self.set_pending(name, op);
        }
    }

    fn set_pending(&mut self, name: &str, op: PendingOp) {
        if let Some(entry) = self.pending.get_mut(name) {
            entry.op = op;
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.pending.insert(name.to_owned(), Pending { op, order });
        self.queue.insert(order, name.to_owned());
    }

    fn clear_pending(&mut self, name: &str) {
        if let Some(entry) = self.pending.remove(name) {
            self.queue.remove(&entry.order);
        }
    }

    fn take_in_flight(&mut self, nonce: &str) -> Option<InFlight> {
        let seq = nonce
            .strip_prefix(self.nonce_prefix.as_str())?
            .strip_prefix('-')?
            .parse::<u64>()
            .ok()?;
        // The parse accepts forms like "+1"; the stored nonce is the truth.
        if self.in_flight.get(&seq)?.nonce != nonce {
            return None;
        }
        self.in_flight.remove(&seq)
    }
}

fn same(a: &Arc<FederatedService>, b: &Arc<FederatedService>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
