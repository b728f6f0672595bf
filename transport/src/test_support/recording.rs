//! Test support: a stream that records, for every write that moved bytes,
//! the value a counter had at that moment, so a test can tell how much
//! work was done before bytes went out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::InspectWriter;

/// Wraps `inner`; each write records `counter`'s value in the returned
/// list.
pub fn recording<T: AsyncRead + AsyncWrite + Unpin>(
    inner: T,
    counter: &Arc<AtomicUsize>,
) -> (
    impl AsyncRead + AsyncWrite + Unpin + use<T>,
    Arc<Mutex<Vec<usize>>>,
) {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&writes);
    let counter = Arc::clone(counter);
    let io = InspectWriter::new(inner, move |_: &[u8]| {
        let seen = counter.load(Ordering::SeqCst);
        if let Ok(mut writes) = record.lock() {
            writes.push(seen);
        }
    });
    (io, writes)
}
