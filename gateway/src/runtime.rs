//! A running gateway: binds (or adopts) its listeners, loads its identity
//! and the peers' bundles, and owns every task — the federation server, one
//! consumer per dialed peer, the imports merger, the admin API and the
//! config reloader. One cancellation token starts the drain of them all
//! (see [`Gateway::drain`] for what SIGTERM does); a second one cuts what
//! is still open when `drain.timeout` is up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use elsinore_certs::{Identity, TrustBundle};
use elsinore_federation_api::FederatedService;
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::catalog::ExportCatalog;
use crate::config::{Config, DialMode, Drain};
use crate::credentials::Credentials;
use crate::federation::consumer::session::ConsumerSettings;
use crate::federation::consumer::{ConsumerTask, Source};
use crate::federation::owner::dial::OwnerDialer;
use crate::federation::owner::{OwnerOptions, OwnerService, OwnerServiceV1alpha1};
use crate::proxy::ProxyContext;
use crate::proxy::egress::EgressStats;
use crate::proxy::ingress::IngressStats;
use crate::state::{Shared, new_shared};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("identity: {0}")]
    Identity(elsinore_certs::CertError),
    #[error("identity {got} does not belong to this mesh's trust domain {expected}")]
    IdentityTrustDomain { expected: String, got: String },
    #[error("peer {peer}: trust bundle: {source}")]
    Bundle {
        peer: String,
        source: elsinore_certs::CertError,
    },
    #[error("TLS server config: {0}")]
    Tls(elsinore_certs::CertError),
    #[error("bind {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Listeners a caller may bind itself (tests bind `127.0.0.1:0` and pass them in).
#[derive(Default)]
pub struct Listeners {
    pub federation: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub ingress: Option<TcpListener>,
    pub egress: Option<TcpListener>,
    pub dns_udp: Option<UdpSocket>,
    pub dns_tcp: Option<TcpListener>,
}

/// Start-up options besides the config.
#[derive(Default)]
pub struct StartOptions {
    pub listeners: Listeners,
    /// The config file, watched for changes to `exports` (also reloaded on SIGHUP).
    pub config_path: Option<PathBuf>,
}

/// A running gateway.
pub struct Gateway {
    pub federation_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Data-plane listeners (`None` when not configured).
    pub ingress_addr: Option<SocketAddr>,
    pub egress_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    pub ingress_stats: Arc<IngressStats>,
    pub egress_stats: Arc<EgressStats>,
    pub shared: Arc<Shared>,
    /// The TLS material in use (rotated when its files change).
    pub credentials: Arc<Credentials>,
    drain: Drain,
    shutdown: CancellationToken,
    abort: CancellationToken,
    tasks: JoinSet<()>,
    admin_task: AdminTask,
}

/// The admin server's task, aborted if the gateway is dropped unstopped.
struct AdminTask(tokio::task::JoinHandle<()>);

impl AdminTask {
    async fn join(&mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for AdminTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Gateway {
    /// Starts every room. Returns once the listeners are bound.
    ///
    /// Long on purpose: this is the one place where the rooms are wired to
    /// each other, in start-up order (identity and bundles, listeners,
    /// shared state, owner, consumers, merger, data plane, admin, reload),
    /// and reading it top to bottom is reading how a gateway comes up.
    pub async fn start(config: Config, mut options: StartOptions) -> Result<Gateway, StartError> {
        let identity = Identity::load(&config.identity.certificate, &config.identity.private_key)
            .map_err(StartError::Identity)?;
        if identity.spiffe_id().trust_domain() != &config.mesh.trust_domain {
            return Err(StartError::IdentityTrustDomain {
                expected: config.mesh.trust_domain.to_string(),
                got: identity.spiffe_id().to_string(),
            });
        }
        let mut bundles = std::collections::HashMap::with_capacity(config.peers.len());
        for peer in &config.peers {
            let bundle = TrustBundle::load(peer.trust_domain.clone(), &peer.trust_bundle).map_err(
                |source| StartError::Bundle {
                    peer: peer.name.clone(),
                    source,
                },
            )?;
            bundles.insert(peer.name.clone(), bundle);
        }

        let federation = match options.listeners.federation.take() {
            Some(l) => l,
            None => bind("federation", config.listeners.federation).await?,
        };
        let admin = match options.listeners.admin.take() {
            Some(l) => l,
            None => bind("admin", config.listeners.admin).await?,
        };
        let federation_addr = federation.local_addr().map_err(|source| StartError::Bind {
            listener: "federation",
            addr: config.listeners.federation,
            source,
        })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            listener: "admin",
            addr: config.listeners.admin,
            source,
        })?;

        let given = &mut options.listeners;
        let ingress = bind_opt("ingress", given.ingress.take(), config.listeners.ingress).await?;
        let egress = bind_opt("egress", given.egress.take(), config.listeners.egress).await?;
        let dns = match (
            given.dns_udp.take(),
            given.dns_tcp.take(),
            config.listeners.dns,
        ) {
            (Some(udp), Some(tcp), _) => Some((udp, tcp)),
            (_, _, Some(addr)) => Some(bind_dns(addr).await?),
            _ => None,
        };
        let ingress_addr = ingress.as_ref().and_then(|l| l.local_addr().ok());
        let egress_addr = egress.as_ref().and_then(|l| l.local_addr().ok());
        let dns_addr = dns.as_ref().and_then(|(u, _)| u.local_addr().ok());

        let exports = ExportCatalog::from_config(&config, identity.spiffe_id());
        let shared = new_shared(config.mesh.name.clone(), exports, &config.peers);
        let credentials = Arc::new(
            Credentials::new(
                &config,
                identity.clone(),
                bundles,
                Arc::clone(&shared.tls_status),
            )
            .map_err(StartError::Tls)?,
        );
        let shutdown = CancellationToken::new();
        let abort = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::credentials::watch(
            Arc::clone(&credentials),
            shutdown.clone(),
        ));

        // Owner side: one gRPC server for both API versions. Peers whose
        // owner dials us push through it too: their streams go to their
        // consumer task over these channels.
        let mut pushes = std::collections::HashMap::new();
        let mut push_receivers = std::collections::HashMap::new();
        for peer in shared
            .peers
            .iter()
            .filter(|p| p.config.dial == DialMode::Owner)
        {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            pushes.insert(peer.config.name.clone(), tx);
            push_receivers.insert(peer.config.name.clone(), rx);
        }
        let owner_options = OwnerOptions {
            max_window: config.federation.window,
            ack_timeout: config.federation.ack_timeout,
        };
        let owner = OwnerService::new(shared.clone(), owner_options.clone(), shutdown.clone())
            .accepting(pushes)
            .publishing(Arc::clone(&credentials));
        let (incoming, accept_task) = crate::federation::transport::accept_mtls(
            federation,
            Arc::clone(&credentials),
            // `maxConnections` is per listener; the federation listener's
            // connections are peers' gRPC streams and handshakes in flight.
            config.proxy.max_connections,
            shutdown.clone(),
        );
        tasks.spawn(async move {
            let _ = accept_task.await;
        });
        // Requests of the consumers we serve are small; the pushes of
        // owners that dial us are catalogs: one decoder limit serves all
        // streams of the server, so it is the largest `limits.messageBytes`
        // among the peers that push.
        let push_limit = shared
            .peers
            .iter()
            .filter(|p| p.config.dial == DialMode::Owner)
            .map(|p| p.config.limits.message_bytes)
            .max()
            .unwrap_or(crate::config::defaults::LIMIT_MESSAGE_BYTES);
        let server_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
                .add_service(
                    rd2::discovery_service_server::DiscoveryServiceServer::new(owner.clone())
                        .max_decoding_message_size(push_limit),
                )
                .add_service(
                    rd1::discovery_service_server::DiscoveryServiceServer::new(
                        OwnerServiceV1alpha1(owner),
                    )
                    .max_decoding_message_size(crate::config::defaults::LIMIT_MESSAGE_BYTES),
                )
                .serve_with_incoming_shutdown(
                    ReceiverStream::new(incoming),
                    server_shutdown.cancelled_owned(),
                )
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "federation server failed");
            }
        });

        // Consumer side: one task per peer we import from, dialing it
        // (`dial: consumer`) or taking the streams it opens (`dial: owner`).
        // Owner side, `dial: owner`: one task per peer that dials it.
        let settings = ConsumerSettings {
            stale_after: config.imports.stale_after,
            snapshot_quiet_period: config.federation.snapshot_quiet_period,
            backoff_initial: config.federation.backoff_initial,
            backoff_max: config.federation.backoff_max,
        };
        for peer in &shared.peers {
            let source = match (peer.config.dial, peer.config.federation.clone()) {
                (DialMode::Consumer, Some(address)) => Some(Source::Dial(address)),
                (DialMode::Consumer, None) => None,
                (DialMode::Owner, address) => {
                    if let Some(address) = address {
                        tasks.spawn(
                            OwnerDialer {
                                shared: shared.clone(),
                                peer: peer.clone(),
                                address,
                                credentials: Arc::clone(&credentials),
                                options: owner_options.clone(),
                                backoff: settings.clone(),
                                shutdown: shutdown.clone(),
                            }
                            .run(),
                        );
                    }
                    push_receivers.remove(&peer.config.name).map(Source::Accept)
                }
            };
            let Some(source) = source else { continue };
            let task = ConsumerTask {
                shared: shared.clone(),
                peer: peer.clone(),
                credentials: Arc::clone(&credentials),
                settings: settings.clone(),
                window: config.federation.window,
                cache_dir: config.imports.cache_dir.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(task.run(source));
        }

        tasks.spawn(run_merger(
            shared.clone(),
            crate::catalog::routes::TablePlan::from_config(&config),
            shutdown.clone(),
        ));

        // Data plane.
        let proxy = ProxyContext {
            shared: shared.clone(),
            credentials: Arc::clone(&credentials),
            tuning: config.proxy.clone(),
            shutdown: shutdown.clone(),
            abort: abort.clone(),
            drain_timeout: config.drain.timeout,
        };
        let ingress_stats = Arc::new(IngressStats::default());
        let egress_stats = Arc::new(EgressStats::default());
        let (config_status, config_status_rx) =
            tokio::sync::watch::channel(Arc::new(crate::reload::ConfigStatus::new(config.clone())));
        // The admin API answers through the whole drain (`/ready` 503,
        // `/metrics`), so it stops with `abort`, outside `tasks`.
        let admin_task = AdminTask(tokio::spawn(crate::admin::serve(
            admin,
            crate::admin::AdminState {
                shared: shared.clone(),
                ingress: ingress_stats.clone(),
                egress: egress_stats.clone(),
                config: config_status_rx,
            },
            abort.clone(),
        )));
        if let Some(listener) = ingress {
            let (ctx, stats) = (proxy.clone(), ingress_stats.clone());
            tasks.spawn(async move {
                if let Err(error) = crate::proxy::ingress::serve(listener, ctx, stats).await {
                    tracing::error!(%error, "ingress listener failed");
                }
            });
        }
        // `listeners.egress: off` switches the whole egress off, VIPs included.
        if config.listeners.egress.is_some() {
            tasks.spawn(crate::proxy::egress::run(
                proxy.clone(),
                egress,
                egress_stats.clone(),
            ));
        }
        if let Some((udp, tcp)) = dns {
            tasks.spawn(crate::dns::responder::serve(
                udp,
                tcp,
                shared.vips.subscribe(),
                shutdown.clone(),
            ));
        }
        if let Some(path) = options.config_path.take() {
            tasks.spawn(crate::reload::run(
                path,
                config.clone(),
                identity.spiffe_id().clone(),
                shared.clone(),
                config_status,
                shutdown.clone(),
            ));
        }
        shared.listeners_bound.store(true, Ordering::Release);
        tracing::info!(mesh = %config.mesh.name, federation = %federation_addr, admin = %admin_addr, "gateway started");
        Ok(Gateway {
            federation_addr,
            admin_addr,
            ingress_addr,
            egress_addr,
            dns_addr,
            ingress_stats,
            egress_stats,
            shared,
            credentials,
            drain: config.drain,
            shutdown,
            abort,
            tasks,
            admin_task,
        })
    }

    /// Stops at once: listeners close and connections still open are cut
    /// (tests, the demo). SIGTERM does [`Gateway::drain`] instead.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.abort.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.admin_task.join().await;
    }

    /// Runs until the shutdown token is cancelled, then drains without
    /// the `drain.delay` (the token's owner decided when to stop).
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        self.drain = Drain {
            delay: std::time::Duration::ZERO,
            ..self.drain
        };
        self.drain().await;
    }

    /// What SIGTERM does. `/ready` fails at once; every listener keeps
    /// serving for `drain.delay`, so load balancers and endpoint
    /// controllers take us out before we stop answering. Then listeners
    /// stop accepting, HTTP/2 connections get a GOAWAY, idle HTTP/1.1
    /// keep-alive connections are closed, federation streams end cleanly
    /// (peers keep our imports as stale), and requests and TCP streams in
    /// flight get up to `drain.timeout` to finish. What is left then is
    /// cut. Returns when every task has ended.
    pub async fn drain(mut self) {
        self.shared.draining.store(true, Ordering::Release);
        tracing::info!(
            delay = ?self.drain.delay,
            "draining: /ready fails; listeners keep serving for drain.delay"
        );
        tokio::time::sleep(self.drain.delay).await;
        tracing::info!(
            timeout = ?self.drain.timeout,
            "draining: listeners stop accepting; in-flight requests and streams get drain.timeout"
        );
        self.shutdown.cancel();
        let finished = tokio::time::timeout(self.drain.timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "drain.timeout passed; cutting what is still open"
            );
        }
        self.abort.cancel();
        // Every room returns promptly once cut; do not hang the exit on one
        // that does not.
        let cut = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if cut.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        self.admin_task.join().await;
        tracing::info!("drained");
    }
}

/// The imports merger: rebuilds the merged imports view and the VIP table
/// made from it whenever a consumer reports a change or the local exports
/// change, and publishes both whole (`imports` first).
async fn run_merger(
    shared: Arc<Shared>,
    plan: crate::catalog::routes::TablePlan,
    shutdown: CancellationToken,
) {
    let mut exports = shared.exports.subscribe();
    let mut vips = crate::catalog::routes::VipAllocator::with_plan(plan);
    loop {
        let view = merge(&shared);
        let table = vips.update(&view);
        shared.imports.send_replace(Arc::new(view));
        shared.vips.send_replace(Arc::new(table));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.imports_changed.notified() => {}
            changed = exports.changed() => if changed.is_err() { return },
        }
        // Coalesce bursts: a snapshot of thousands of entries rebuilds a few times, not thousands.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One merge of what the shared handles hold now (see [`catalog::imports::merge`]).
///
/// [`catalog::imports::merge`]: crate::catalog::imports::merge
fn merge(shared: &Shared) -> crate::catalog::ImportsView {
    let peers: Vec<(String, Vec<Arc<FederatedService>>)> = shared
        .peers
        .iter()
        .map(|p| (p.config.name.clone(), p.consumer.borrow().services.clone()))
        .collect();
    // Arcs cloned out, so no `watch` borrow is held while the merge runs.
    let exports = shared.exports.borrow().clone();
    let previous = shared.imports.borrow().clone();
    crate::catalog::imports::merge(&exports, &peers, &previous)
}

/// Binds the DNS responder's UDP socket and a TCP listener on the same
/// port. With port 0 the kernel picks the UDP port, which may be taken over
/// TCP: try again with another.
async fn bind_dns(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), StartError> {
    let mut attempts = 0;
    loop {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                listener: "dns (udp)",
                addr,
                source,
            })?;
        let tcp_addr = udp.local_addr().unwrap_or(addr);
        match TcpListener::bind(tcp_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if addr.port() == 0 && attempts < 16 => attempts += 1,
            Err(source) => {
                return Err(StartError::Bind {
                    listener: "dns (tcp)",
                    addr: tcp_addr,
                    source,
                });
            }
        }
    }
}

async fn bind_opt(
    listener: &'static str,
    given: Option<TcpListener>,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, StartError> {
    match (given, addr) {
        (Some(l), _) => Ok(Some(l)),
        (None, Some(addr)) => Ok(Some(bind(listener, addr).await?)),
        (None, None) => Ok(None),
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            listener,
            addr,
            source,
        })
}
