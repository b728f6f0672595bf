//! The one accept loop every listener runs: it admits a connection only
//! while a slot is free under the listener's connection cap (one over the
//! cap is closed at once and counted), backs off after a failed accept
//! instead of spinning (EMFILE leaves the listener readable, so a loop that
//! retries at once burns a core until a descriptor frees up), and stops
//! accepting when told, leaving open connections their slots so the caller
//! can wait for them to finish (drain) before cutting what is left.
//!
//! It knows nothing of config files or metrics: the caller passes
//! [`Settings`], a [`Connections`] tracker, a stop token, [`Hooks`] to count
//! with and a handler that gets each admitted connection with its
//! [`Permit`], which holds the connection's slot until dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long the loop pauses after a failed accept. Long enough that a
/// listener out of descriptors costs nothing measurable, short enough that
/// it picks up again soon after one is freed.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// What one listener's loop is told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Names the listener in the loop's own logs ("egress", "ingress", ...).
    pub name: &'static str,
    /// The pause after a failed accept.
    pub backoff: Duration,
}

impl Settings {
    /// A listener called `name` with the default [`BACKOFF`].
    pub fn new(name: &'static str) -> Settings {
        Settings {
            name,
            backoff: BACKOFF,
        }
    }
}

/// The connection slots of one listener (or of several that share a cap):
/// at most `cap` [`Permit`]s are out at a time. Cloning shares the slots.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Slots>);

#[derive(Debug)]
struct Slots {
    cap: usize,
    open: AtomicUsize,
    /// Woken when the last open connection returns its slot.
    idle: Notify,
}

impl Connections {
    /// Slots for at most `cap` connections at once (at least one: a cap of
    /// zero would make a listener that only refuses).
    pub fn new(cap: usize) -> Connections {
        Connections(Arc::new(Slots {
            cap: cap.max(1),
            open: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    /// The most connections admitted at once.
    pub fn cap(&self) -> usize {
        self.0.cap
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// A slot if one is free.
    pub fn try_admit(&self) -> Option<Permit> {
        let cap = self.0.cap;
        self.0
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < cap).then_some(open + 1)
            })
            .ok()?;
        Some(Permit(Arc::clone(&self.0)))
    }

    /// Resolves once no connection holds a slot.
    pub async fn idle(&self) {
        loop {
            // Registered before the check, so a release in between wakes us.
            let notified = self.0.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits until every slot is returned (true) or `deadline` passes
    /// with connections still open (false): the drain of a listener that
    /// stopped accepting.
    pub async fn drained(&self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline, self.idle()).await.is_ok()
    }
}

/// One admitted connection's slot, returned when dropped (however the
/// connection's task ends).
#[derive(Debug)]
pub struct Permit(Arc<Slots>);

impl Drop for Permit {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

type OnPeer = Box<dyn Fn(SocketAddr) + Send + Sync>;
type OnError = Box<dyn Fn(&io::Error) + Send + Sync>;

/// What the caller counts (and logs, in its own words) as the loop runs.
/// Each defaults to nothing.
pub struct Hooks {
    accepted: OnPeer,
    refused: OnPeer,
    failed: OnError,
}

impl Default for Hooks {
    fn default() -> Hooks {
        Hooks {
            accepted: Box::new(|_| {}),
            refused: Box::new(|_| {}),
            failed: Box::new(|_| {}),
        }
    }
}

impl Hooks {
    /// Called for every accepted TCP connection, before the cap.
    pub fn on_accepted(mut self, f: impl Fn(SocketAddr) + Send + Sync + 'static) -> Hooks {
        self.accepted = Box::new(f);
        self
    }

    /// Called for a connection closed because every slot was taken.
    pub fn on_refused(mut self, f: impl Fn(SocketAddr) + Send + Sync + 'static) -> Hooks {
        self.refused = Box::new(f);
        self
    }

    /// Called for a failed accept, before the back-off (the loop logs it).
    pub fn on_failed(mut self, f: impl Fn(&io::Error) + Send + Sync + 'static) -> Hooks {
        self.failed = Box::new(f);
        self
    }
}

/// Accepts on `listener` until `stop` is cancelled, then closes it and
/// returns; connections already admitted keep their [`Permit`]s (wait for
/// them with [`Connections::drained`]). Each connection that gets a slot
/// goes to `handler`, which must not block (spawn the connection's task);
/// one that does not is closed at once.
pub async fn serve<H>(
    listener: TcpListener,
    settings: Settings,
    connections: Connections,
    stop: CancellationToken,
    hooks: Hooks,
    mut handler: H,
) where
    H: FnMut(TcpStream, SocketAddr, Permit),
{
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                (hooks.accepted)(peer);
                match connections.try_admit() {
                    Some(permit) => handler(tcp, peer, permit),
                    None => {
                        (hooks.refused)(peer);
                        drop(tcp);
                    }
                }
            }
            Err(error) => {
                (hooks.failed)(&error);
                tracing::warn!(%error, "{} accept failed", settings.name);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(settings.backoff) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
