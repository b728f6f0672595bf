//! Live reload of the exports: the config file's directory is watched
//! (Kubernetes swaps a `..data` link, so watching the file alone misses
//! updates) and SIGHUP forces a reload. A config that fails validation is
//! logged and ignored: the gateway keeps serving the last good catalog.
//! Only `exports` apply live; other changes are reported as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use elsinore_certs::SpiffeId;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::ExportCatalog;
use crate::config::Config;
use crate::state::Shared;

/// Watches `path` and publishes new exports until `shutdown`.
pub async fn run(
    path: PathBuf,
    mut current: Config,
    gateway_id: SpiffeId,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let watch_tx = tx.clone();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if is_config_change(&event, file_name.as_deref()) {
            let _ = watch_tx.try_send(());
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch the config directory; reload on SIGHUP only");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "no file watcher; reload on SIGHUP only");
            None
        }
    };
    let mut last_text = std::fs::read(&path).ok();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rx.recv() => {}
            _ = sighup => tracing::info!("SIGHUP: reloading the config"),
        }
        // Editors write in several steps; let the burst settle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        // Our own read of the file and unrelated writes in the directory must
        // not cost a parse: only a change of content does.
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(config = %path.display(), %error, "config reload: cannot read the file; keeping the running config");
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_slice()) {
            continue;
        }
        let parsed = match std::str::from_utf8(&text) {
            Ok(yaml) => Config::from_file_text(&path, yaml),
            Err(e) => Err(crate::config::ConfigError::new("", format!("not UTF-8: {e}")).into()),
        };
        last_text = Some(text);
        let next = match parsed {
            Ok(next) => next,
            Err(errors) => {
                tracing::error!(config = %path.display(), %errors, "config reload rejected; keeping the running config");
                continue;
            }
        };
        if next == current {
            continue;
        }
        if next.mesh != current.mesh
            || next.identity != current.identity
            || next.listeners != current.listeners
            || next.peers != current.peers
            || next.imports != current.imports
            || next.federation != current.federation
            || next.drain != current.drain
        {
            tracing::warn!("config changes outside `exports`/`advertise` need a restart to apply");
        }
        let exports = ExportCatalog::from_config(&next, &gateway_id);
        tracing::info!(exports = exports.len(), "exports reloaded");
        shared.exports.send_replace(Arc::new(exports));
        current = next;
    }
}

/// Whether a file event can have changed the config: a create, write,
/// rename or removal of the config file itself or of Kubernetes' `..data`
/// link (which swaps every file of a ConfigMap at once). Reads (our own,
/// included) and other files in the directory are ignored.
fn is_config_change(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    use notify::EventKind;
    if !matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    ) {
        return false;
    }
    event.paths.iter().any(|p| {
        let name = p.file_name();
        name == file_name || name == Some(std::ffi::OsStr::new("..data"))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, DataChange, ModifyKind};
    use notify::{Event, EventKind};

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_changes_to_the_config_file_or_data_link_count() {
        let name = Some(std::ffi::OsStr::new("mesh-a.yaml"));
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(is_config_change(&event(write, "/etc/e/mesh-a.yaml"), name));
        assert!(is_config_change(
            &event(EventKind::Create(CreateKind::File), "/etc/e/..data"),
            name
        ));
        assert!(!is_config_change(&event(write, "/etc/e/other.log"), name));
        assert!(!is_config_change(
            &event(EventKind::Access(AccessKind::Read), "/etc/e/mesh-a.yaml"),
            name
        ));
    }
}
