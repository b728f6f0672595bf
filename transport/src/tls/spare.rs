//! Buffers between uses. A connection gives its buffer back as soon as it
//! is drained, and request/response traffic drains it on every message:
//! taking a fresh 16-64 KiB block from malloc each time cost more than the
//! record layer itself (glibc consolidates its free lists for every block
//! that large). A few are kept per thread instead, so the memory stays with
//! the thread, not with the thousands of connections it serves.

use std::cell::RefCell;

use bytes::BytesMut;

/// Enough for the connections one thread moves data on at once.
pub(super) const KEEP: usize = 8;
/// A buffer that grew past this (a burst) is not kept.
pub(super) const KEEP_CAPACITY: usize = 2 * super::READ_BIG;
/// At most this much kept per thread: two bulk transfers' buffers, or
/// all eight of request/response traffic. A bulk buffer given back to
/// malloc each time costs page faults when it is taken again (glibc
/// trims the heap top under it).
pub(super) const KEEP_BYTES: usize = 2 * KEEP_CAPACITY;

thread_local! {
    static SPARE: RefCell<(Vec<BytesMut>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

#[cfg(test)]
pub(super) fn kept() -> (usize, usize) {
    SPARE.with(|s| {
        let s = s.borrow();
        (s.0.len(), s.1)
    })
}

pub(super) fn take() -> BytesMut {
    SPARE.with(|s| {
        let (list, bytes) = &mut *s.borrow_mut();
        let buf = list.pop().unwrap_or_default();
        *bytes -= buf.capacity();
        buf
    })
}

pub(super) fn give(mut buf: BytesMut) {
    // A drained buffer has been advanced to its end, which leaves it no
    // capacity until the space before it is reclaimed (no copy: it is
    // empty). One too small for a record is not worth keeping.
    buf.clear();
    if buf.capacity() > KEEP_CAPACITY || !buf.try_reclaim(super::READ_SMALL) {
        return;
    }
    SPARE.with(|s| {
        let (list, bytes) = &mut *s.borrow_mut();
        if list.len() < KEEP && *bytes + buf.capacity() <= KEEP_BYTES {
            *bytes += buf.capacity();
            list.push(buf);
        }
    });
}
