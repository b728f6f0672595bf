//! Live reload of the exports: the config file's directory is watched
//! (Kubernetes swaps a `..data` link, so watching the file alone misses
//! updates) and SIGHUP forces a reload. A config that fails validation is
//! logged and ignored: the gateway keeps serving the last good catalog.
//! `exports` and `advertise` apply live; a change to any other key is
//! logged as a warning naming each such key ("needs a restart"), on every
//! reload until the file and the running config agree again, and listed
//! under `pendingRestart` by the admin `/config` endpoint.

mod trigger;

use std::path::PathBuf;
use std::sync::Arc;

use elsinore_certs::SpiffeId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalog::ExportCatalog;
use crate::config::Config;
use crate::state::Shared;
pub(crate) use trigger::{Cause, Trigger, is_change};

/// What runs and what the file asks for that needs a restart: the admin
/// `/config` document.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigStatus {
    /// The effective config: the start-up config with the live-applied
    /// sections (`exports`, `advertise`) of the last good file.
    pub running: Config,
    /// Keys (YAML paths) whose value in the last good file differs from
    /// the running one and needs a restart to apply.
    pub pending_restart: Vec<String>,
}

impl ConfigStatus {
    pub fn new(running: Config) -> Self {
        ConfigStatus {
            running,
            pending_restart: Vec::new(),
        }
    }

    /// The status after the file now says `next`: live sections applied,
    /// every other difference listed as pending a restart.
    pub fn apply(&self, next: &Config) -> ConfigStatus {
        let running = Config {
            exports: next.exports.clone(),
            advertise: next.advertise.clone(),
            ..self.running.clone()
        };
        let pending_restart = crate::config::effective::changed_keys(&running, next);
        ConfigStatus {
            running,
            pending_restart,
        }
    }
}

/// Watches `path` and publishes new exports until `shutdown`; `status`
/// carries the effective config and the keys waiting for a restart.
pub async fn run(
    path: PathBuf,
    mut current: Config,
    gateway_id: SpiffeId,
    shared: Arc<Shared>,
    status: watch::Sender<Arc<ConfigStatus>>,
    shutdown: CancellationToken,
) {
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
    let file_name = path.file_name().map(|n| n.to_os_string());
    let mut trigger = Trigger::new([dir], "config", move |event| {
        is_config_change(event, file_name.as_deref())
    });
    // The first pass reads the file at once: a change written between the
    // start-up read and the watch would otherwise wait for the next event
    // (an unchanged file is no reload).
    let mut last_text: Option<Vec<u8>> = None;
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            match trigger.next(&shutdown).await {
                None => return,
                Some(Cause::Sighup) => tracing::info!("SIGHUP: reloading the config"),
                Some(Cause::Files) => {}
            }
        }
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
        let next_status = status.borrow().apply(&next);
        if !next_status.pending_restart.is_empty() {
            tracing::warn!(
                config = %path.display(),
                keys = %next_status.pending_restart.join(", "),
                "config reload: these keys changed and need a restart to apply; the running values stay in use"
            );
        }
        let exports = ExportCatalog::from_config(&next_status.running, &gateway_id);
        tracing::info!(exports = exports.len(), "exports reloaded");
        shared.exports.send_replace(Arc::new(exports));
        status.send_replace(Arc::new(next_status));
        current = next;
    }
}

/// Whether a file event can have changed the config: a create, write,
/// rename or removal of the config file itself or of Kubernetes' `..data`
/// link (which swaps every file of a ConfigMap at once). Reads (our own,
/// included) and other files in the directory are ignored.
fn is_config_change(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    if !trigger::is_change(event) {
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

    /// A config with `exports` (names only), exported to mesh-b.
    fn config_text(exports: &[&str]) -> String {
        let mut s = String::from(
            "mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: gw.pem, privateKey: gw.key }
advertise: { address: gw.mesh-a.example }
peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }
exports:
",
        );
        for e in exports {
            s.push_str(&format!(
                "  - {{ name: {e}, protocol: HTTP, backends: [\"a:1\"], peers: [mesh-b] }}\n"
            ));
        }
        s
    }

    #[tokio::test]
    async fn a_change_written_before_the_watch_began_is_applied() {
        let _limit = crate::test_support::limit();
        let dir = tempfile::tempdir().unwrap();
        for file in ["gw.pem", "gw.key", "b.pem"] {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        let path = dir.path().join("mesh-a.yaml");
        std::fs::write(&path, config_text(&["reviews"])).unwrap();
        let started = Config::load(&path).unwrap();
        // Written after start-up read the file and before the watch exists:
        // no file event will ever announce it.
        std::fs::write(&path, config_text(&["reviews", "ratings"])).unwrap();

        let gateway_id: SpiffeId = "spiffe://mesh-a.example/elsinore".parse().unwrap();
        let catalog = ExportCatalog::from_config(&started, &gateway_id);
        assert_eq!(catalog.len(), 1);
        let shared = crate::state::new_shared("mesh-a".into(), catalog, &started.peers);
        let (status, _) = watch::channel(Arc::new(ConfigStatus::new(started.clone())));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            path,
            started,
            gateway_id,
            Arc::clone(&shared),
            status,
            shutdown.clone(),
        ));
        crate::test_support::wait_until(
            "the change to be applied",
            crate::test_support::WAIT,
            || {
                let held = shared.exports.borrow().len();
                async move {
                    if held == 2 {
                        Ok(())
                    } else {
                        Err(format!("{held} exports"))
                    }
                }
            },
        )
        .await;
        shutdown.cancel();
        task.await.unwrap();
    }
}
