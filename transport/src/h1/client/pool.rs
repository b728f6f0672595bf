//! The idle backend connections of one export: kept most recently used
//! last, checked for a close the backend sent while they were idle, and
//! dropped once idle longer than the idle timeout.

use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Idle keep-alive connections, most recently used last. The lock is held
/// for a push or a pop, never across an `.await`.
pub(super) struct Pool {
    pub(super) idle: Mutex<Vec<Idle>>,
    pub(super) idle_timeout: Duration,
    pub(super) cap: usize,
    /// One permit per open connection, idle or busy.
    pub(super) slots: Arc<Semaphore>,
    /// A connection went back to `idle`: for requests waiting for a slot.
    pub(super) returned: Notify,
}

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: Instant,
}

/// One backend connection, the address it was made to (for messages) and
/// its place under the export's connection cap.
pub(super) struct Conn {
    pub(super) io: TcpStream,
    pub(super) addr: String,
    pub(super) _slot: OwnedSemaphorePermit,
}

impl Pool {
    /// The most recently pooled connection that is still usable. Entries
    /// are in the order they went idle, so once the newest has been idle
    /// too long every other one has too.
    pub(super) fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() > self.idle_timeout {
                // Closed after the lock is released.
                let expired = std::mem::take(&mut *idle);
                drop(idle);
                drop((entry, expired));
                return None;
            }
            if still_open(&entry.conn.io) {
                return Some(entry.conn);
            }
        }
        None
    }

    pub(super) fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest sit at the front; drop those past their time so a busy
        // export does not keep stale sockets at the bottom of the stack.
        let expired = idle
            .iter()
            .take_while(|e| e.since.elapsed() > self.idle_timeout)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        if idle.len() < self.cap {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            drop(idle);
            self.returned.notify_one();
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// Whether an idle connection is still open: the reactor has seen nothing
/// readable on it (the common case, no syscall), or a peek finds neither
/// EOF nor stray bytes.
pub(super) fn still_open(io: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match io.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}
