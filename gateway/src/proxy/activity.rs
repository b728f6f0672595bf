//! Idle detection for proxied connections: [`watched`] records when
//! bytes last moved through a stream and [`Activity::idle`] resolves once
//! nothing moved for a while. Shared by ingress and egress; costs one
//! relaxed atomic store per read or write, no timer reset per chunk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::{InspectReader, InspectWriter};
use tokio_util::sync::CancellationToken;

/// When bytes last moved on a connection (milliseconds since `epoch`; an
/// atomic store per read or write, no timer reset per chunk).
pub(crate) struct Activity {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            epoch: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    pub(crate) async fn idle(&self, idle: Duration) {
        loop {
            let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last + idle <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

impl Activity {
    /// Resolves once `shutdown` is cancelled or nothing moved for `idle`,
    /// naming which: when an HTTP connection is told to stop.
    pub(crate) async fn idle_or_shutdown(
        &self,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> &'static str {
        tokio::select! {
            () = shutdown.cancelled() => "shutting down",
            () = self.idle(idle) => "idle",
        }
    }
}

/// `io`, recording on `activity` every read and write that moved bytes
/// (tokio-util's inspectors: one call per read and per buffer written).
pub(crate) fn watched<T>(
    io: T,
    activity: &Arc<Activity>,
) -> impl AsyncRead + AsyncWrite + Unpin + Send + use<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let on_write = Arc::clone(activity);
    let on_read = Arc::clone(activity);
    InspectReader::new(
        InspectWriter::new(io, move |_: &[u8]| on_write.touch()),
        move |read: &[u8]| {
            // Also called at end of stream, with nothing read.
            if !read.is_empty() {
                on_read.touch();
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::{Instant, advance};

    /// Writes and reads that move bytes push the idle deadline back; the
    /// end of the stream (a read of nothing) does not.
    #[tokio::test(start_paused = true)]
    async fn moving_bytes_is_activity_and_the_end_of_the_stream_is_not() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let activity = Arc::new(Activity::new());
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = watched(ours, &activity);

        advance(ms(100)).await;
        io.write_all(b"x").await.unwrap();
        activity.idle(ms(250)).await;
        assert_eq!(start.elapsed(), ms(350));

        theirs.write_all(b"y").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        drop(theirs);
        advance(ms(100)).await;
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        activity.idle(ms(250)).await;
        assert_eq!(start.elapsed(), ms(600));
    }
}
