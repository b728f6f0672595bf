//! The consumer side of the Hamlet federation stream, one session per peer, as
//! a sans-I/O state machine: events in (stream opened, a response, stream
//! closed, a tick), decisions out (ACK or NACK, what changed in the imports,
//! names to remove, when to reconnect). It owns the services imported from
//! that one peer, the snapshot in progress, the staleness clock and the
//! reconnect backoff. It must not do I/O, spawn tasks, read the clock or draw
//! random numbers: time and jitter are passed in so every edge case is a
//! deterministic unit test. Decoding and validation of the wire message
//! happen in the federation-api codec (`on_message` takes its result); the
//! caller also applies the returned changes to the catalog and the on-disk
//! cache. What the peer may claim (names, limits) is `catalog::claims`'s
//! rule; the session applies it to every upsert and NACKs a refusal.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use elsinore_federation_api::FederatedService;
use elsinore_federation_api::message::{self as wire, Rejected, Response, ResponseError};
use tokio::time::Instant;

use crate::catalog::claims::{Claims, Rule};

/// The spec asks for a reconnect backoff of at least one second.
const MIN_BACKOFF: Duration = Duration::from_secs(1);

/// Refused entries remembered per peer, for `/catalog?peer=`.
pub const REFUSALS_KEPT: usize = 64;
/// Bytes of a refusal's message kept (a NACK may quote a value as long as
/// a whole message).
const REFUSAL_MESSAGE_KEPT: usize = 512;

/// One entry refused lately: its name (empty if unknown), the FQDN it
/// claimed (empty if it was not decoded), the claim rule (`None`: invalid
/// on the wire), and the NACK's message, cut to 512 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRecord {
    pub name: String,
    pub fqdn: String,
    pub rule: Option<Rule>,
    pub message: String,
}

/// Timing knobs of one consumer session (already validated config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// How long imports keep being served after the stream is lost (or since
    /// the on-disk cache was written) without a completed resync.
    pub stale_after: Duration,
    /// Without a snapshot-size announcement (a foreign owner), the snapshot
    /// counts as complete after this long without a response.
    pub snapshot_quiet_period: Duration,
    /// First reconnect delay; raised to 1 s if lower.
    pub backoff_initial: Duration,
    /// Upper bound of the reconnect delay; raised to 1 s if lower.
    pub backoff_max: Duration,
}

/// One imported service and when the owner last sent it to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The full object as the owner last sent it (never a diff).
    pub service: Arc<FederatedService>,
    /// When the owner last sent this object (for a cache entry: when the
    /// cache says it was received).
    pub confirmed_at: Instant,
}

/// What a response asks us to do. v1alpha1 `CREATE` and `UPDATE` both map to
/// [`Operation::Upsert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Create or replace the named service.
    Upsert,
    /// Remove the named service.
    Delete,
    /// `UNKNOWN` (0) or a value this build does not know; always NACKed.
    Unknown(i32),
}

/// What to send back to the owner for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Status OK with the response's nonce.
    Ack { nonce: String },
    /// A non-OK status (the caller picks `InvalidArgument`) with a message
    /// naming the resource and the problem.
    Nack { nonce: String, message: String },
}

/// How one response changed the imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This service name was added or replaced.
    Upserted(String),
    /// This service name was removed.
    Deleted(String),
    /// Nothing changed (a NACK, or a delete of a name we did not have).
    Unchanged,
}

/// The result of [`ConsumerSession::on_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// Send this back on the stream.
    pub reply: Reply,
    /// What this response itself changed.
    pub change: Change,
    /// Names removed because this response completed the snapshot and they
    /// were not in it (reconciliation); usually empty.
    pub reconciled: Vec<String>,
    /// The claim rule that refused this response, if one did (the reply is
    /// then a NACK naming it).
    pub refused: Option<Rule>,
}

/// Why a stream (or a dial attempt) ended, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// gRPC `Unauthenticated`: we are not federated with this owner.
    Unauthenticated(String),
    /// gRPC `InvalidArgument`: the owner found our request malformed.
    InvalidArgument(String),
    /// Anything else (`Unavailable`, a reset, a dial failure, end of stream).
    Other(String),
}

/// What the caller should do after a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterClose {
    /// Dial again at this time.
    ReconnectAt(Instant),
    /// Do not dial again; the reason is also in [`SyncState::Failed`].
    GiveUp { reason: String },
}

/// Where the session stands, for `/peers` and readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// No stream has been opened yet and nothing was restored.
    Connecting,
    /// A stream is open; its snapshot is not complete yet.
    Syncing,
    /// The stream's snapshot is complete; imports mirror the owner.
    Synced,
    /// No stream; imports are served until `since + stale_after`.
    Disconnected { since: Instant },
    /// The owner refused us in a way that forbids retrying.
    Failed { reason: String },
    /// We left on purpose ([`ConsumerSession::shutdown_on_purpose`]).
    Stopped,
}

/// Counters and flags of one session, for metrics and `/peers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Responses received, on all streams.
    pub messages: u64,
    /// Responses ACKed.
    pub acks: u64,
    /// Responses NACKed.
    pub nacks: u64,
    /// When the last ACK was decided.
    pub last_ack_at: Option<Instant>,
    /// The last NACK: resource name (empty if unknown) and message.
    pub last_nack: Option<(String, String)>,
    /// Reconnects scheduled.
    pub reconnects: u64,
    /// Whether the open stream's snapshot is complete.
    pub snapshot_complete: bool,
    /// Whether a stream is open.
    pub connected: bool,
    /// Entries refused by a claim rule, by rule (`catalog::claims`).
    pub refused: BTreeMap<Rule, u64>,
}

/// The stream currently open, and its snapshot in progress.
#[derive(Debug)]
struct Stream {
    /// Snapshot size from the owner's metadata (our extension), if any.
    announced: Option<usize>,
    /// Responses received on this stream.
    responses: usize,
    /// Stream open, or the last response; the quiet period counts from here.
    last_activity: Instant,
    /// Names the owner showed us in this snapshot (upserted or NACKed):
    /// reconciliation keeps these.
    seen: BTreeSet<String>,
    /// Names upserted successfully on this stream: fresh data that survives
    /// the staleness cut-off of older entries.
    fresh: BTreeSet<String>,
    complete: bool,
}

/// What applying one response did, before the snapshot bookkeeping.
enum Outcome {
    Upserted(String),
    Deleted {
        name: String,
        existed: bool,
    },
    Rejected {
        name: Option<String>,
        message: String,
        /// Set when a claim rule refused it.
        rule: Option<Rule>,
        /// The FQDN the entry claimed, when it was decoded; else empty.
        fqdn: String,
    },
}

/// The consumer state machine for one peer. See the module docs.
#[derive(Debug)]
pub struct ConsumerSession {
    settings: ConsumerSettings,
    imports: BTreeMap<String, Imported>,
    state: SyncState,
    stream: Option<Stream>,
    /// Start of the staleness clock: the first disconnect (or the cache's
    /// time) since the last completed snapshot. `None` while synced and once
    /// the stale cut-off has fired.
    stale_since: Option<Instant>,
    /// Consecutive failed streams or dials since the last completed snapshot.
    failures: u32,
    stats: ConsumerStats,
    claims: Claims,
    /// The last [`REFUSALS_KEPT`] entries refused, one per name, oldest
    /// first: what `/catalog?peer=` shows as refused.
    refusals: VecDeque<RefusalRecord>,
}

impl ConsumerSession {
    /// A session with no imports, in [`SyncState::Connecting`]. Backoff
    /// figures below one second are raised to one second.
    pub fn new(mut settings: ConsumerSettings) -> Self {
        settings.backoff_initial = settings.backoff_initial.max(MIN_BACKOFF);
        settings.backoff_max = settings.backoff_max.max(MIN_BACKOFF);
        Self {
            settings,
            imports: BTreeMap::new(),
            state: SyncState::Connecting,
            stream: None,
            stale_since: None,
            failures: 0,
            stats: ConsumerStats::default(),
            claims: Claims::default(),
            refusals: VecDeque::new(),
        }
    }

    /// The entries of this peer refused lately (NACKed, by a claim rule or
    /// as invalid), oldest first, at most [`REFUSALS_KEPT`], one per name;
    /// a name later imported or deleted leaves the list.
    pub fn refusals(&self) -> &VecDeque<RefusalRecord> {
        &self.refusals
    }

    /// Keeps `record` as the latest refusal of its name, dropping the
    /// oldest one beyond the bound (a hostile owner may send millions).
    fn record_refusal(&mut self, record: RefusalRecord) {
        self.refusals.retain(|r| r.name != record.name);
        if self.refusals.len() >= REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        self.refusals.push_back(record);
    }

    /// The claim rules for this peer; until set, the product defaults
    /// (names under `global`, default limits, no local exports known).
    pub fn set_claims(&mut self, claims: Claims) {
        self.claims = claims;
    }

    /// The claim rules in force, e.g. to update this mesh's export names.
    pub fn claims_mut(&mut self) -> &mut Claims {
        &mut self.claims
    }

    /// The gRPC decoder refused a message over `limits.messageBytes`; the
    /// stream ends (the caller reports it through
    /// [`Self::on_stream_closed`]). Counted as a refusal by that rule.
    pub fn on_message_too_large(&mut self) {
        *self.stats.refused.entry(Rule::MessageBytes).or_default() += 1;
    }

    /// Restores entries from the on-disk cache at start-up, before the first
    /// stream opens; `age` is how old each entry is. Entries at least
    /// `stale_after` old are dropped; a name already imported is not
    /// overwritten. The restored entries then behave like imports from a
    /// lost stream: the state becomes `Disconnected { since: now - youngest
    /// age }`, so staleness keeps counting from the cache's time, and the
    /// next completed snapshot reconciles them. Entries the claim rules in
    /// force refuse are dropped too (set them first: [`Self::set_claims`]).
    pub fn restore(&mut self, entries: Vec<(FederatedService, Duration)>, now: Instant) {
        let mut youngest: Option<Duration> = None;
        for (service, age) in entries {
            if age >= self.settings.stale_after || self.imports.contains_key(&service.name) {
                continue;
            }
            // The cache was written under the config of its day: an entry
            // the peer may no longer claim (allowedNames narrowed, a new
            // export of ours, lower limits) is not brought back.
            if self
                .claims
                .check(&service, self.imports.len(), false)
                .is_err()
            {
                continue;
            }
            youngest = Some(youngest.map_or(age, |y| y.min(age)));
            let confirmed_at = now.checked_sub(age).unwrap_or(now);
            self.imports.insert(
                service.name.clone(),
                Imported {
                    service: Arc::new(service),
                    confirmed_at,
                },
            );
        }
        let Some(age) = youngest else { return };
        let since = now.checked_sub(age).unwrap_or(now);
        let since = self.stale_since.map_or(since, |s| s.min(since));
        self.stale_since = Some(since);
        if self.stream.is_none() {
            self.state = SyncState::Disconnected { since };
        }
    }

    /// A new stream is open (the first request was sent). Resets the
    /// snapshot in progress. `announced_snapshot_size` is the owner's
    /// snapshot-size metadata, `None` for a foreign owner. With an announced
    /// size of 0 the snapshot is complete at once, and the names it
    /// reconciled away are returned. Opening while a stream is still open
    /// counts as losing the old one (without a backoff).
    pub fn on_stream_open(
        &mut self,
        now: Instant,
        announced_snapshot_size: Option<usize>,
    ) -> Vec<String> {
        if self.stream.is_some() {
            self.stale_since.get_or_insert(now);
        }
        self.stream = Some(Stream {
            announced: announced_snapshot_size,
            responses: 0,
            last_activity: now,
            seen: BTreeSet::new(),
            fresh: BTreeSet::new(),
            complete: false,
        });
        self.state = SyncState::Syncing;
        if announced_snapshot_size == Some(0) {
            self.complete_snapshot()
        } else {
            Vec::new()
        }
    }

    /// One response from the owner. `resource_id` is the name the owner put
    /// in `resource_id` (empty on v1alpha1, which has no such field);
    /// `service` is the decoded and validated resource, or the decoding or
    /// validation message.
    ///
    /// Upsert: a decoding error, or a service whose name differs from a
    /// non-empty `resource_id`, is NACKed and the old entry of that name is
    /// left in place; otherwise the service is stored and ACKed. Delete:
    /// removes `resource_id` (or, when empty, the decoded service's name);
    /// an unknown name is ACKed without change. Every response counts
    /// towards the snapshot in progress; a NACKed name counts as seen (the
    /// owner still has it). A response with no stream open is NACKed.
    pub fn on_response(
        &mut self,
        now: Instant,
        nonce: &str,
        resource_id: &str,
        op: Operation,
        service: Result<FederatedService, String>,
    ) -> Handled {
        self.stats.messages += 1;
        let mut refused = None;
        let outcome = if self.stream.is_some() {
            self.apply(now, resource_id, op, service)
        } else {
            // Only a caller bug gets here; applying it would import data no
            // stream vouches for.
            Outcome::Rejected {
                name: non_empty(resource_id),
                message: "response received with no stream open".to_owned(),
                rule: None,
                fqdn: String::new(),
            }
        };

        let (reply, change) = match outcome {
            Outcome::Upserted(name) => {
                self.refusals.retain(|r| r.name != name);
                if let Some(stream) = self.stream.as_mut() {
                    stream.seen.insert(name.clone());
                    stream.fresh.insert(name.clone());
                }
                (self.ack(now, nonce), Change::Upserted(name))
            }
            Outcome::Deleted { name, existed } => {
                self.refusals.retain(|r| r.name != name);
                if let Some(stream) = self.stream.as_mut() {
                    stream.fresh.remove(&name);
                }
                let change = if existed {
                    Change::Deleted(name)
                } else {
                    Change::Unchanged
                };
                (self.ack(now, nonce), change)
            }
            Outcome::Rejected {
                name,
                message,
                rule,
                fqdn,
            } => {
                self.record_refusal(RefusalRecord {
                    name: name.clone().unwrap_or_default(),
                    fqdn,
                    rule,
                    message: truncated(&message),
                });
                // Only a held name needs keeping through reconciliation; not
                // recording the others bounds `seen` by what is held, however
                // many names a hostile owner has refused.
                if let (Some(stream), Some(name)) = (self.stream.as_mut(), &name)
                    && self.imports.contains_key(name)
                {
                    stream.seen.insert(name.clone());
                }
                if let Some(rule) = rule {
                    *self.stats.refused.entry(rule).or_default() += 1;
                }
                refused = rule;
                self.stats.nacks += 1;
                self.stats.last_nack = Some((name.unwrap_or_default(), message.clone()));
                let reply = Reply::Nack {
                    nonce: nonce.to_owned(),
                    message,
                };
                (reply, Change::Unchanged)
            }
        };

        let mut reconciled = Vec::new();
        if let Some(stream) = self.stream.as_mut() {
            stream.responses += 1;
            stream.last_activity = now;
            let reached = stream.announced.is_some_and(|n| stream.responses >= n);
            if reached && !stream.complete {
                reconciled = self.complete_snapshot();
            }
        }
        Handled {
            reply,
            change,
            reconciled,
            refused,
        }
    }

    /// A response as the codec read it (`elsinore_federation_api::message`),
    /// handed to [`ConsumerSession::on_response`]: a message the codec
    /// rejected is NACKed with the codec's reason, an unknown operation by
    /// its code.
    pub fn on_message(&mut self, now: Instant, received: Result<Response, Rejected>) -> Handled {
        let (nonce, resource_id, op, service) = match received {
            Ok(Response {
                nonce,
                resource_id,
                operation,
                context: _,
            }) => match operation {
                wire::Operation::Upsert { service, .. } => (
                    nonce,
                    resource_id,
                    Operation::Upsert,
                    Ok(Arc::unwrap_or_clone(service)),
                ),
                // Only read when `resource_id` is empty: the NACK then says
                // "delete names no service: delete", as it always has.
                wire::Operation::Delete => (
                    nonce,
                    resource_id,
                    Operation::Delete,
                    Err("delete".to_owned()),
                ),
            },
            Err(Rejected {
                nonce,
                resource_id,
                error,
            }) => {
                let op = match error {
                    ResponseError::UnknownOperation { code, .. } => Operation::Unknown(code),
                    _ => Operation::Upsert,
                };
                (nonce, resource_id, op, Err(error.to_string()))
            }
        };
        self.on_response(now, &nonce, &resource_id, op, service)
    }

    /// Time passes. Completes a quiet-period snapshot (returning the names
    /// reconciled away), or, once `stale_after` has passed since the
    /// disconnect without a completed resync, drops every import not freshly
    /// upserted on the open stream (returning those names).
    pub fn on_tick(&mut self, now: Instant) -> Vec<String> {
        if self.quiet_deadline().is_some_and(|d| now >= d) {
            return self.complete_snapshot();
        }
        if self.stale_deadline().is_some_and(|d| now >= d) {
            self.stale_since = None;
            let empty = BTreeSet::new();
            let fresh = self.stream.as_ref().map_or(&empty, |s| &s.fresh);
            return drop_all_but(&mut self.imports, fresh);
        }
        Vec::new()
    }

    /// The stream ended, or a dial attempt failed. Imports are kept and the
    /// staleness clock starts (unless it already runs from an earlier
    /// disconnect not followed by a completed snapshot). `Unauthenticated`
    /// and `InvalidArgument` give up for good; anything else schedules a
    /// reconnect with exponential backoff: `backoff_initial` doubled per
    /// consecutive failure, capped at `backoff_max`, scaled by
    /// `0.5 + jitter / 2` (`jitter` in `[0, 1)`), never below one second.
    pub fn on_stream_closed(
        &mut self,
        now: Instant,
        reason: CloseReason,
        jitter: f64,
    ) -> AfterClose {
        self.stream = None;
        let since = *self.stale_since.get_or_insert(now);
        let give_up = match reason {
            CloseReason::Unauthenticated(message) => format!("unauthenticated: {message}"),
            CloseReason::InvalidArgument(message) => format!("invalid argument: {message}"),
            CloseReason::Other(_) => {
                self.state = SyncState::Disconnected { since };
                self.failures = self.failures.saturating_add(1);
                self.stats.reconnects += 1;
                let delay = self.backoff_delay(jitter);
                let at = now
                    .checked_add(delay)
                    .or_else(|| now.checked_add(MIN_BACKOFF))
                    .unwrap_or(now);
                return AfterClose::ReconnectAt(at);
            }
        };
        self.state = SyncState::Failed {
            reason: give_up.clone(),
        };
        AfterClose::GiveUp { reason: give_up }
    }

    /// The earliest time at which [`Self::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.quiet_deadline(), self.stale_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The services imported from this peer, by name.
    pub fn imports(&self) -> &BTreeMap<String, Imported> {
        &self.imports
    }

    /// Where the session stands.
    pub fn state(&self) -> &SyncState {
        &self.state
    }

    /// Counters and flags for metrics and `/peers`.
    pub fn stats(&self) -> ConsumerStats {
        let mut stats = self.stats.clone();
        stats.connected = self.stream.is_some();
        stats.snapshot_complete = self.stream.as_ref().is_some_and(|s| s.complete);
        stats
    }

    /// We leave on purpose (the peer was removed from config): everything
    /// imported from this owner is deleted and its names returned. The
    /// session is finished afterwards.
    pub fn shutdown_on_purpose(&mut self) -> Vec<String> {
        self.stream = None;
        self.stale_since = None;
        self.state = SyncState::Stopped;
        std::mem::take(&mut self.imports).into_keys().collect()
    }

    fn apply(
        &mut self,
        now: Instant,
        resource_id: &str,
        op: Operation,
        service: Result<FederatedService, String>,
    ) -> Outcome {
        match op {
            Operation::Upsert => match service {
                Err(problem) => Outcome::Rejected {
                    name: non_empty(resource_id),
                    message: rejection(resource_id, &problem),
                    rule: None,
                    fqdn: String::new(),
                },
                Ok(service) if !resource_id.is_empty() && service.name != resource_id => {
                    Outcome::Rejected {
                        name: non_empty(resource_id),
                        message: rejection(
                            resource_id,
                            &format!("resource_id does not match service name {:?}", service.name),
                        ),
                        rule: None,
                        fqdn: String::new(),
                    }
                }
                Ok(service) => {
                    // Whether it replaces a held entry only matters at the
                    // services limit: spare the second lookup below it.
                    let held = self.imports.len();
                    let replaces = held >= self.claims.limits().services
                        && self.imports.contains_key(&service.name);
                    if let Err(refusal) = self.claims.check(&service, held, replaces) {
                        // The old entry of that name, if any, stays.
                        return Outcome::Rejected {
                            message: rejection(&service.name, &refusal.message),
                            name: Some(service.name),
                            rule: Some(refusal.rule),
                            fqdn: service.fqdn,
                        };
                    }
                    let name = service.name.clone();
                    self.imports.insert(
                        name.clone(),
                        Imported {
                            service: Arc::new(service),
                            confirmed_at: now,
                        },
                    );
                    Outcome::Upserted(name)
                }
            },
            Operation::Delete => {
                // v1alpha1 has no resource_id: the delete carries the object.
                let name = match (non_empty(resource_id), service) {
                    (Some(name), _) => name,
                    (None, Ok(service)) => service.name,
                    (None, Err(problem)) => {
                        return Outcome::Rejected {
                            name: None,
                            message: rejection("", &format!("delete names no service: {problem}")),
                            rule: None,
                            fqdn: String::new(),
                        };
                    }
                };
                let existed = self.imports.remove(&name).is_some();
                Outcome::Deleted { name, existed }
            }
            Operation::Unknown(code) => Outcome::Rejected {
                name: non_empty(resource_id),
                message: rejection(resource_id, &format!("unknown operation {code}")),
                rule: None,
                fqdn: String::new(),
            },
        }
    }

    fn ack(&mut self, now: Instant, nonce: &str) -> Reply {
        self.stats.acks += 1;
        self.stats.last_ack_at = Some(now);
        Reply::Ack {
            nonce: nonce.to_owned(),
        }
    }

    /// Removes every import the open stream's snapshot did not show us.
    fn complete_snapshot(&mut self) -> Vec<String> {
        let Some(stream) = self.stream.as_mut() else {
            return Vec::new();
        };
        if stream.complete {
            return Vec::new();
        }
        stream.complete = true;
        stream.fresh.clear();
        let seen = std::mem::take(&mut stream.seen);
        let removed = drop_all_but(&mut self.imports, &seen);
        self.stale_since = None;
        self.failures = 0;
        self.state = SyncState::Synced;
        removed
    }

    /// When a snapshot without a size announcement counts as complete.
    fn quiet_deadline(&self) -> Option<Instant> {
        let stream = self.stream.as_ref()?;
        if stream.complete || stream.announced.is_some() {
            return None;
        }
        stream
            .last_activity
            .checked_add(self.settings.snapshot_quiet_period)
    }

    /// When imports not confirmed by the open stream become stale.
    fn stale_deadline(&self) -> Option<Instant> {
        self.stale_since?.checked_add(self.settings.stale_after)
    }

    /// The reconnect delay for the current count of consecutive failures.
    fn backoff_delay(&self, jitter: f64) -> Duration {
        backoff_delay(&self.settings, self.failures, jitter)
    }
}

/// The reconnect delay after `failures` consecutive failures (at least 1):
/// `backoff_initial` doubled per failure, capped at `backoff_max`, scaled by
/// `0.5 + jitter / 2`, never below one second. Also what an owner that dials
/// (`dial: owner`) waits between attempts.
pub fn backoff_delay(settings: &ConsumerSettings, failures: u32, jitter: f64) -> Duration {
    // Raised here too, so a caller with raw settings cannot go below the spec.
    let max = settings.backoff_max.max(MIN_BACKOFF);
    let exponent = failures.saturating_sub(1).min(31);
    let base = settings
        .backoff_initial
        .max(MIN_BACKOFF)
        .saturating_mul(1u32 << exponent)
        .min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base.mul_f64(0.5 + jitter / 2.0).clamp(MIN_BACKOFF, max)
}

/// Removes every import whose name is not in `keep`; returns the names
/// removed, in name order.
fn drop_all_but(imports: &mut BTreeMap<String, Imported>, keep: &BTreeSet<String>) -> Vec<String> {
    let mut removed = Vec::new();
    imports.retain(|name, _| {
        let kept = keep.contains(name);
        if !kept {
            removed.push(name.clone());
        }
        kept
    });
    removed
}

fn non_empty(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_owned())
}

/// `message` cut to [`REFUSAL_MESSAGE_KEPT`] bytes, at a character boundary.
fn truncated(message: &str) -> String {
    if message.len() <= REFUSAL_MESSAGE_KEPT {
        return message.to_owned();
    }
    let mut end = REFUSAL_MESSAGE_KEPT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// A NACK message naming the resource and the problem.
fn rejection(resource_id: &str, problem: &str) -> String {
    if resource_id.is_empty() {
        format!("rejected resource: {problem}")
    } else {
        format!("rejected service {resource_id:?}: {problem}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
