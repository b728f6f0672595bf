//! What wakes a reload, shared by the config file and the TLS material:
//! a relevant file event in a watched directory, or SIGHUP. A burst of
//! events (an editor's save, a Secret's `..data` swap, a rotation writing
//! several files) wakes the reader once. Without a working file watcher
//! the reload still happens on SIGHUP, and the log says so.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a burst of file events may take to settle before the reload.
const SETTLE: Duration = Duration::from_millis(100);

/// Why a reload was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Files,
    Sighup,
}

/// File events in some directories plus SIGHUP, as one stream of wake-ups.
pub(crate) struct Trigger {
    rx: mpsc::Receiver<()>,
    // Dropping the watcher stops the events: it lives as long as the trigger.
    _watcher: Option<RecommendedWatcher>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Trigger {
    /// Watches `dirs` (not recursively) for events `relevant` accepts;
    /// `what` names the files in the warnings ("config", "certificate").
    pub(crate) fn new(
        dirs: impl IntoIterator<Item = PathBuf>,
        what: &'static str,
        relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    ) -> Trigger {
        let (tx, rx) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && relevant(&event)
            {
                // Full means a wake-up is already pending: that one covers this event.
                let _ = tx.try_send(());
            }
        });
        let watcher = match watcher {
            Ok(mut w) => {
                for dir in dirs {
                    if let Err(error) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(%error, dir = %dir.display(), "cannot watch the {what} directory; its files reload on SIGHUP only");
                    }
                }
                Some(w)
            }
            Err(error) => {
                tracing::warn!(%error, "no file watcher; {what} files reload on SIGHUP only");
                None
            }
        };
        Trigger {
            rx,
            _watcher: watcher,
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// The next wake-up, once its burst has settled; `None` at `shutdown`.
    pub(crate) async fn next(&mut self, shutdown: &CancellationToken) -> Option<Cause> {
        #[cfg(unix)]
        let sighup = async {
            match self.hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        let cause = tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = self.rx.recv() => Cause::Files,
            _ = sighup => Cause::Sighup,
        };
        tokio::time::sleep(SETTLE).await;
        while self.rx.try_recv().is_ok() {}
        Some(cause)
    }
}

/// Whether a file event can have changed a file's content: a create,
/// write, rename or removal. Reads (our own included) never are.
pub(crate) fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    )
}
