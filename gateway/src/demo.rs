//! `elsinore demo`: two meshes federating on loopback in one process, with
//! freshly minted certificates, demo backends and demo exports, the data
//! plane and DNS running. Built from the same parts as `elsinore run` (typed
//! config, [`Gateway::start`]), so what it shows is what a real deployment
//! does; [`Demo::curl_command`] is the one command that sends a request
//! from mesh-b to `reviews` in mesh-a.

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

fn export(
    name: &str,
    mesh: &str,
    protocol: Protocol,
    port: u16,
    backend: SocketAddr,
    peer: &str,
) -> Export {
    Export {
        name: name.to_owned(),
        fqdn: format!("{name}.{mesh}.global"),
        protocol,
        port,
        backends: vec![HostPort {
            host: backend.ip().to_string(),
            port: backend.port(),
        }],
        peers: vec![peer.to_owned()],
    }
}

/// A demo HTTP backend: answers every request with a line naming the
/// service, its mesh and the peer identity the ingress vouched for.
async fn http_backend(service: &'static str, mesh: &'static str) -> anyhow::Result<SocketAddr> {
    use hyper::body::Bytes;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let caller = req
                            .headers()
                            .get(crate::proxy::PEER_IDENTITY_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("unknown")
                            .to_owned();
                        let body = format!("hello from {service} in {mesh} (called by {caller})\n");
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from(body)),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A demo TCP backend: echoes what it receives.
async fn echo_backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

struct Ports {
    ingress: u16,
    vip_range: &'static str,
}

fn config(
    me: &MeshFiles,
    other: &MeshFiles,
    other_federation: SocketAddr,
    exports: Vec<Export>,
    cache_dir: PathBuf,
    ports: Ports,
) -> anyhow::Result<Config> {
    let vip_range = ports
        .vip_range
        .parse()
        .map_err(|e: String| anyhow::anyhow!("demo VIP range: {e}"))?;
    Ok(Config {
        mesh: Mesh {
            name: me.name.to_owned(),
            trust_domain: me.td.clone(),
        },
        identity: IdentityFiles {
            certificate: me.cert.clone(),
            private_key: me.key.clone(),
            trust_bundle: None,
        },
        listeners: Listeners {
            federation: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ingress: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            egress: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            dns: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        },
        advertise: Advertise {
            address: "127.0.0.1".to_owned(),
            port: ports.ingress,
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
            identities: crate::config::PeerIdentities::gateway_of(&other.td),
            follow_trust_bundle: false,
            dial: crate::config::DialMode::Consumer,
            allowed_names: vec!["global".to_owned()],
            limits: crate::config::PeerLimits::default(),
        }],
        imports: Imports {
            stale_after: defaults::STALE_AFTER,
            cache_dir: Some(cache_dir),
            ..Imports::default()
        },
        federation: FederationTuning {
            window: defaults::WINDOW,
            ack_timeout: defaults::ACK_TIMEOUT,
            snapshot_quiet_period: defaults::SNAPSHOT_QUIET_PERIOD,
            backoff_initial: defaults::BACKOFF_INITIAL,
            backoff_max: defaults::BACKOFF_MAX,
        },
        proxy: crate::config::ProxyTuning {
            vip_range,
            ..Default::default()
        },
        drain: crate::config::Drain::default(),
    })
}

impl Demo {
    /// Mints certificates under `dir` and starts both meshes on loopback.
    pub async fn start(dir: &Path) -> anyhow::Result<Demo> {
        let a_files = mint(dir, "mesh-a")?;
        let b_files = mint(dir, "mesh-b")?;
        let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0));
        let (a_fed, a_admin, a_ingress) = (bind().await?, bind().await?, bind().await?);
        let (b_fed, b_admin, b_ingress) = (bind().await?, bind().await?, bind().await?);
        let reviews = http_backend("reviews", "mesh-a").await?;
        let ratings = echo_backend().await?;
        let details = http_backend("details", "mesh-b").await?;
        let a_cfg = config(
            &a_files,
            &b_files,
            b_fed.local_addr()?,
            vec![
                export("reviews", "mesh-a", Protocol::Http, 9080, reviews, "mesh-b"),
                export("ratings", "mesh-a", Protocol::Tcp, 9081, ratings, "mesh-b"),
            ],
            dir.join("mesh-a/cache"),
            Ports {
                ingress: a_ingress.local_addr()?.port(),
                vip_range: "127.77.0.0/16",
            },
        )?;
        let b_cfg = config(
            &b_files,
            &a_files,
            a_fed.local_addr()?,
            vec![export(
                "details",
                "mesh-b",
                Protocol::Http,
                9082,
                details,
                "mesh-a",
            )],
            dir.join("mesh-b/cache"),
            Ports {
                ingress: b_ingress.local_addr()?.port(),
                vip_range: "127.78.0.0/16",
            },
        )?;
        let start = |cfg, fed, admin, ingress| {
            Gateway::start(
                cfg,
                StartOptions {
                    listeners: crate::runtime::Listeners {
                        federation: Some(fed),
                        admin: Some(admin),
                        ingress: Some(ingress),
                        ..Default::default()
                    },
                    config_path: None,
                },
            )
        };
        let a = start(a_cfg, a_fed, a_admin, a_ingress)
            .await
            .context("start mesh-a")?;
        let b = start(b_cfg, b_fed, b_admin, b_ingress)
            .await
            .context("start mesh-b")?;
        Ok(Demo { a, b })
    }

    /// Waits until each gateway has imported the other's whole catalog.
    ///
    /// Admin readiness is not enough here: it turns true once the first
    /// sync was attempted (it may have failed while the peer was still
    /// starting), and before the merged import view is published.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        fn imported_all(shared: &crate::state::Shared) -> bool {
            let mut expected = 0;
            for peer in &shared.peers {
                let consumer = peer.consumer.borrow();
                if !consumer.snapshot_complete {
                    return false;
                }
                expected += consumer.services.len();
            }
            shared.imports.borrow().by_fqdn.len() >= expected
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if imported_all(&self.a.shared) && imported_all(&self.b.shared) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("demo meshes did not sync within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The command that sends a request from mesh-b to `reviews` in mesh-a:
    /// resolve the imported name through mesh-b's DNS responder (with this
    /// very binary's `resolve`: a fresh machine has curl but not dig), then
    /// curl it, which goes through mesh-b's egress and mesh-a's ingress.
    pub fn curl_command(&self) -> String {
        let dns = self
            .b
            .dns_addr
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let exe = std::env::current_exe()
            .map(|p| shell_quote(&p.to_string_lossy()))
            .unwrap_or_else(|_| "elsinore".to_owned());
        format!(
            "curl -s --resolve reviews.mesh-a.global:9080:$({exe} resolve reviews.mesh-a.global --dns {dns}) http://reviews.mesh-a.global:9080/"
        )
    }

    /// Waits until mesh-b's VIP for `reviews` is published (the egress
    /// binds it right after).
    pub async fn wait_routable(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let vip = self
                .b
                .shared
                .vips
                .borrow()
                .lookup_name("reviews.mesh-a.global")
                .map(|e| (e.vip, e.port));
            if let Some(addr) = vip
                && tokio::net::TcpStream::connect(addr).await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "mesh-b's egress did not open reviews.mesh-a.global within {timeout:?}"
                );
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
            let vips = gw.shared.vips.borrow().clone();
            for (fqdn, r) in view.by_fqdn.iter() {
                let at = vips
                    .lookup_name(fqdn)
                    .map(|e| format!(" at {}:{}", e.vip, e.port))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "  imported {fqdn} (service {} from {}){at}\n",
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

/// `word` as one POSIX shell word: as it is when it holds only safe
/// characters, else in single quotes.
fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_quote_keeps_safe_words_and_quotes_the_rest() {
        assert_eq!(super::shell_quote("/usr/bin/elsinore"), "/usr/bin/elsinore");
        assert_eq!(super::shell_quote("/a b/it's"), "'/a b/it'\\''s'");
        assert_eq!(super::shell_quote(""), "''");
    }
}
