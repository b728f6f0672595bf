//! `elsinore demo`: two meshes federating on loopback in one process, with
//! freshly minted certificates and demo exports. Built from the same parts
//! as `elsinore run` (typed config, [`Gateway::start`]), so what it shows is
//! what a real deployment does. Later rooms (data plane, DNS) hang their
//! demo pieces off [`Demo`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use elsinore_certs::mint::Ca;
use elsinore_certs::{SpiffeId, TrustDomain};
use elsinore_federation_api::{ApiVersion, Protocol};
use tokio::net::TcpListener;

use crate::config::{
    Advertise, Config, Export, FederationTuning, HostPort, IdentityFiles, Imports, Listeners, Mesh,
    Peer, defaults,
};
use crate::runtime::{Gateway, StartOptions};

/// The two demo gateways.
pub struct Demo {
    pub a: Gateway,
    pub b: Gateway,
    pub dir: PathBuf,
}

struct MeshFiles {
    name: &'static str,
    td: TrustDomain,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn mint(dir: &Path, name: &'static str) -> anyhow::Result<MeshFiles> {
    let td: TrustDomain = format!("{name}.demo").parse()?;
    let out = dir.join(name);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let ca = Ca::new(&td)?;
    let leaf = ca.issue(
        &SpiffeId::gateway(td.clone()),
        &["localhost".to_owned()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?;
    let files = MeshFiles {
        name,
        td,
        cert: out.join("gateway.pem"),
        key: out.join("gateway.key"),
        ca: out.join("ca.pem"),
    };
    std::fs::write(&files.cert, &leaf.cert_pem)?;
    std::fs::write(&files.key, &leaf.key_pem)?;
    std::fs::write(&files.ca, ca.cert_pem())?;
    Ok(files)
}

fn export(name: &str, mesh: &str, protocol: Protocol, port: u16, peer: &str) -> Export {
    Export {
        name: name.to_owned(),
        fqdn: format!("{name}.{mesh}.global"),
        protocol,
        port,
        backends: vec![HostPort {
            host: "127.0.0.1".to_owned(),
            port,
        }],
        peers: vec![peer.to_owned()],
    }
}

fn config(
    me: &MeshFiles,
    other: &MeshFiles,
    other_federation: SocketAddr,
    exports: Vec<Export>,
    cache_dir: PathBuf,
) -> Config {
    Config {
        mesh: Mesh {
            name: me.name.to_owned(),
            trust_domain: me.td.clone(),
        },
        identity: IdentityFiles {
            certificate: me.cert.clone(),
            private_key: me.key.clone(),
        },
        listeners: Listeners {
            federation: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ingress: None,
            egress: None,
            dns: None,
        },
        advertise: Advertise {
            address: "127.0.0.1".to_owned(),
            port: defaults::INGRESS_LISTENER.port(),
        },
        exports,
        peers: vec![Peer {
            name: other.name.to_owned(),
            trust_domain: other.td.clone(),
            trust_bundle: other.ca.clone(),
            federation: Some(HostPort {
                host: other_federation.ip().to_string(),
                port: other_federation.port(),
            }),
            api_version: ApiVersion::V1alpha2,
        }],
        imports: Imports {
            stale_after: defaults::STALE_AFTER,
            cache_dir: Some(cache_dir),
        },
        federation: FederationTuning {
            window: defaults::WINDOW,
            ack_timeout: defaults::ACK_TIMEOUT,
            snapshot_quiet_period: defaults::SNAPSHOT_QUIET_PERIOD,
            backoff_initial: defaults::BACKOFF_INITIAL,
            backoff_max: defaults::BACKOFF_MAX,
        },
        proxy: crate::config::ProxyTuning::default(),
    }
}

impl Demo {
    /// Mints certificates under `dir` and starts both meshes on loopback.
    pub async fn start(dir: &Path) -> anyhow::Result<Demo> {
        let a_files = mint(dir, "mesh-a")?;
        let b_files = mint(dir, "mesh-b")?;
        let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0));
        let (a_fed, a_admin, b_fed, b_admin) =
            (bind().await?, bind().await?, bind().await?, bind().await?);
        let a_cfg = config(
            &a_files,
            &b_files,
            b_fed.local_addr()?,
            vec![
                export("reviews", "mesh-a", Protocol::Http, 9080, "mesh-b"),
                export("ratings", "mesh-a", Protocol::Tcp, 9081, "mesh-b"),
            ],
            dir.join("mesh-a/cache"),
        );
        let b_cfg = config(
            &b_files,
            &a_files,
            a_fed.local_addr()?,
            vec![export("details", "mesh-b", Protocol::Http, 9082, "mesh-a")],
            dir.join("mesh-b/cache"),
        );
        let start = |cfg, fed, admin| {
            Gateway::start(
                cfg,
                StartOptions {
                    listeners: crate::runtime::Listeners {
                        federation: Some(fed),
                        admin: Some(admin),
                        ..Default::default()
                    },
                    config_path: None,
                },
            )
        };
        let a = start(a_cfg, a_fed, a_admin).await.context("start mesh-a")?;
        let b = start(b_cfg, b_fed, b_admin).await.context("start mesh-b")?;
        Ok(Demo {
            a,
            b,
            dir: dir.to_owned(),
        })
    }

    /// Waits until both gateways are ready (each synced with the other).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (a, _) = crate::admin::readiness(&self.a.shared);
            let (b, _) = crate::admin::readiness(&self.b.shared);
            if a && b {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("demo meshes did not sync within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A human summary of what each mesh imported.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (gw, name) in [(&self.a, "mesh-a"), (&self.b, "mesh-b")] {
            let view = gw.shared.imports.borrow().clone();
            out.push_str(&format!(
                "{name}: federation {} admin http://{}\n",
                gw.federation_addr, gw.admin_addr
            ));
            for (fqdn, r) in view.by_fqdn.iter() {
                out.push_str(&format!(
                    "  imported {fqdn} (service {} from {})\n",
                    r.name, r.peer
                ));
            }
        }
        out
    }

    pub async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}
