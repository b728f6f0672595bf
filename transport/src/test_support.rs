//! Test-only helpers shared by the unit tests of every module: a time limit
//! inside each socket-level test ([`limit`]), a bounded wait on a
//! condition ([`wait_until`]: tests wait on what they need, never on a
//! fixed sleep), and a stream that records how much work was done before
//! each write ([`recording`]). Compiled only for tests.

mod recording;

pub use recording::recording;

use std::future::Future;
use std::time::Duration;

/// The limit on one socket-level unit test. Generous: these tests take
/// milliseconds alone, but run beside hundreds of others on two cores.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`wait_until`] waits by default.
pub const WAIT: Duration = Duration::from_secs(15);

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(10);

/// A time limit on the running test, from now until the guard is dropped
/// (hold it for the whole test: `let _limit = limit();`). If the test is
/// still running after [`TEST_TIMEOUT`] of real time, a watchdog thread
/// prints the test's name and aborts the process: a hang becomes a failure
/// that says which test hung (nextest runs each test in its own process).
/// A thread, not a tokio timer, so it also bounds tests on paused time
/// (where a far timer is what auto-advance would jump to) and does not
/// need the test body wrapped.
#[must_use = "the limit ends when the guard is dropped"]
pub fn limit() -> Limit {
    // libtest names each test's thread after the test.
    let name = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(TEST_TIMEOUT)
        {
            eprintln!("test {name} did not finish within {TEST_TIMEOUT:?}: aborting");
            std::process::abort();
        }
    });
    Limit { _done: done }
}

/// Ends the limit of [`limit`] when dropped (the watchdog sees its channel
/// close).
pub struct Limit {
    _done: std::sync::mpsc::Sender<()>,
}

/// Polls `check` until it returns `Ok`, for at most `timeout` (real time
/// unless the runtime's clock is paused), then panics naming `what` and the
/// last `Err` it returned (which should say what was seen). Returns what `check` found.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}
