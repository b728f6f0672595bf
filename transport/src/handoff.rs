//! Giving the core to a client this gateway has just answered.
//!
//! Writing a response wakes the client that reads it (an app behind the
//! egress). When that client shares the gateway's core, the kernel does not
//! always preempt the gateway for it: the gateway then keeps the core until
//! it has nothing left to do, having written every response of the batch it
//! was working on, and the client works on all of them at once (and sends
//! its next requests at once) while the gateway at the other end of the
//! chain waits. Every [`EVERY_WHEN_ON`]th response the gateway yields the
//! core (`sched_yield`), so the client starts on what it was given while
//! the rest are written.
//!
//! Only responses to HTTP/1.1 clients count: yielding after requests
//! written to backends as well gave the same gain where it helps and cost
//! CPU under HTTP/2 load (BENCHMARKS.md, "Ninth session").
//!
//! A yield costs one syscall when nothing else wants the core. When
//! something does that is not a woken peer (a busy neighbour), the yield
//! gives it a whole time slice; [`LONG_YIELDS`] yields in a row that each
//! took longer than [`BUDGET`] turn yielding off for [`PAUSE`], so such a
//! neighbour gets at most that many extra slices per pause.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Hand-offs between yields when yielding is on.
pub const EVERY_WHEN_ON: u32 = 16;

/// Hand-offs between yields for a listener whose config says `on`
/// (`proxy.yieldToClients`): [`EVERY_WHEN_ON`], or 0 (never yield). The
/// HTTP/1.1 server loop takes it as a setting.
pub fn every(on: bool) -> u32 {
    if on { EVERY_WHEN_ON } else { 0 }
}

/// How many times this thread has yielded.
#[cfg(test)]
pub(crate) fn yields_on_this_thread() -> u64 {
    HANDOFFS.with(|h| h.try_borrow().map_or(0, |h| h.yields))
}

/// A yield that kept the thread off the core longer than this means the
/// core went to something other than a client reading a few responses.
const BUDGET: Duration = Duration::from_micros(500);
/// How many such yields in a row turn yielding off: one alone may be a
/// kernel thread or a timer that happened to run.
const LONG_YIELDS: u32 = 2;
/// How long yielding stays off then.
const PAUSE: Duration = Duration::from_secs(1);

/// One thread's count of hand-offs since it last yielded.
#[derive(Debug, Default)]
struct Handoffs {
    count: u32,
    /// Yields in a row that took longer than the budget.
    long: u32,
    yields: u64,
    paused_until: Option<Instant>,
}

impl Handoffs {
    /// Counts a hand-off; every `every`th one calls `yield_now` (unless
    /// paused) and returns whether it did.
    fn handed_off(
        &mut self,
        every: u32,
        now: impl Fn() -> Instant,
        yield_now: impl FnOnce(),
    ) -> bool {
        if every == 0 {
            return false;
        }
        self.count += 1;
        if self.count < every {
            return false;
        }
        self.count = 0;
        let before = now();
        if let Some(until) = self.paused_until {
            if before < until {
                return false;
            }
            self.paused_until = None;
        }
        yield_now();
        self.yields += 1;
        let after = now();
        if after.saturating_duration_since(before) <= BUDGET {
            self.long = 0;
        } else {
            self.long += 1;
            if self.long >= LONG_YIELDS {
                self.long = 0;
                self.paused_until = Some(after + PAUSE);
            }
        }
        true
    }
}

thread_local! {
    static HANDOFFS: RefCell<Handoffs> = RefCell::default();
}

/// Called after a response was written whole to an HTTP/1.1 client;
/// `every` is the connection's setting (0: off).
pub(crate) fn handed_off(every: u32) {
    // Off (the default): no thread-local touched.
    if every == 0 {
        return;
    }
    HANDOFFS.with(|h| {
        if let Ok(mut h) = h.try_borrow_mut() {
            h.handed_off(every, Instant::now, std::thread::yield_now);
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Runs `n` hand-offs on a fake clock where each yield takes `took`;
    /// returns how many yielded.
    fn run(h: &mut Handoffs, every: u32, clock: &Cell<Instant>, n: usize, took: Duration) -> usize {
        (0..n)
            .filter(|_| h.handed_off(every, || clock.get(), || clock.set(clock.get() + took)))
            .count()
    }

    #[test]
    fn every_nth_hand_off_yields() {
        let clock = Cell::new(Instant::now());
        let mut h = Handoffs::default();
        let quick = Duration::from_micros(100);
        assert_eq!(run(&mut h, 16, &clock, 15, quick), 0);
        assert_eq!(run(&mut h, 16, &clock, 1, quick), 1);
        assert_eq!(run(&mut h, 16, &clock, 64, quick), 4);
        assert_eq!(run(&mut h, 1, &clock, 5, quick), 5);
    }

    #[test]
    fn zero_never_yields() {
        let clock = Cell::new(Instant::now());
        let mut h = Handoffs::default();
        assert_eq!(run(&mut h, 0, &clock, 1000, Duration::ZERO), 0);
    }

    #[test]
    fn a_long_yield_pauses_yielding() {
        let clock = Cell::new(Instant::now());
        let mut h = Handoffs::default();
        let p = 4;
        // One long yield alone (a kernel thread ran) changes nothing.
        assert_eq!(run(&mut h, p, &clock, 4, Duration::from_millis(3)), 1);
        assert_eq!(run(&mut h, p, &clock, 8, Duration::from_micros(100)), 2);
        // A neighbour took the core for 3 ms on two yields in a row.
        assert_eq!(run(&mut h, p, &clock, 8, Duration::from_millis(3)), 2);
        // No yield for the next second, however many hand-offs.
        assert_eq!(run(&mut h, p, &clock, 4000, Duration::from_millis(3)), 0);
        clock.set(clock.get() + Duration::from_millis(999));
        assert_eq!(run(&mut h, p, &clock, 4, Duration::ZERO), 0);
        // After the pause it tries again, and quick yields keep it on.
        clock.set(clock.get() + Duration::from_millis(2));
        assert_eq!(run(&mut h, p, &clock, 40, Duration::from_micros(100)), 10);
    }
}
