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
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
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
        let next = match Config::load(&path) {
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
        {
            tracing::warn!("config changes outside `exports`/`advertise` need a restart to apply");
        }
        let exports = ExportCatalog::from_config(&next, &gateway_id);
        tracing::info!(exports = exports.len(), "exports reloaded");
        shared.exports.send_replace(Arc::new(exports));
        current = next;
    }
}
