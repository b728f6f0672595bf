//! End-to-end test harness: real Elsinore gateways started in-process on
//! loopback, with certificates minted per test, configs written as YAML files
//! and loaded through `Config::load` (the same path `elsinore run` takes), and
//! the admin API queried over real HTTP. It owns no assertions about
//! federation itself; the test files under `tests/` do.
//!
//! # Shape of a test
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn example() {
//!     run_test(async {
//!         // 1. One fixture per mesh: tempdir, CA, gateway cert, and the
//!         //    federation and admin listeners pre-bound on 127.0.0.1:0, so
//!         //    every config can name every peer's address before any starts.
//!         let a = MeshFixture::new("mesh-a").await;
//!         let b = MeshFixture::new("mesh-b").await;
//!         // 2. Owners first (a consumer that dials too early just backs off).
//!         let ga = a
//!             .start(&ConfigSpec::new().export(ExportSpec::new("x", &["mesh-b"])).peer(b.peer()))
//!             .await;
//!         let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
//!         // 3. Wait on conditions, never on fixed sleeps.
//!         wait_for("B imports x", WAIT, || async {
//!             gb.imported_names("mesh-a").await == names(&["x"])
//!         })
//!         .await;
//!         gb.stop().await;
//!         ga.stop().await;
//!     })
//!     .await;
//! }
//! ```
//!
//! # Stability
//!
//! This API is shared by several test files; add to it rather than change
//! what exists. Everything panics with a message naming the step that
//! failed: in a test, a failed setup step is a failed test.

// This crate exists only to run tests: a setup step that fails must panic
// the test that called it, with a message saying which step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Backends, app-side clients and DNS queries for data-plane tests.
pub mod dataplane;
pub use dataplane::*;
/// A real Envoy process for the interoperability tests.
pub mod envoy;
/// A scripted foreign Hamlet peer built only from the generated stubs.
pub mod foreign;
/// A scripted foreign owner advertising endpoints the test runs.
pub mod scripted;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Display, Write as _};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use elsinore_certs::{Ca, Identity, Issued, SpiffeId, TrustBundle, TrustDomain};
use elsinore_federation_api::proto::federation::resourcediscovery::v1alpha2 as rd2;
use elsinore_federation_api::{ApiVersion, FederatedService, type_url};
use elsinore_gateway::config::Config;
use elsinore_gateway::proxy::egress::EgressStatsSnapshot;
use elsinore_gateway::proxy::ingress::IngressStats;
use elsinore_gateway::runtime::{Gateway, Listeners, StartOptions};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Every test body runs under this timeout (see [`run_test`]).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A sensible bound for [`wait_for`] on things that should happen "soon"
/// (a snapshot, a reload, a reconnect with the harness's 1 s backoff).
pub const WAIT: Duration = Duration::from_secs(15);

/// How often [`wait_for`] re-checks its condition.
const POLL: Duration = Duration::from_millis(50);

/// How long a gateway may take to drain on [`GatewayHandle::stop`]; longer
/// is a shutdown bug, reported as such.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound on one admin HTTP request, a TLS handshake, a gRPC dial.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs the process-wide rustls provider (aws-lc-rs; tonic and hyper
/// may look for one) and a tracing subscriber writing to the test writer,
/// filtered by `RUST_LOG` (default: warnings, plus the gateway's info
/// lines, which nextest shows only for failing tests). Idempotent; called
/// by [`run_test`] and [`MeshFixture::new`].
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,elsinore_gateway=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Runs a test body under [`TEST_TIMEOUT`], panicking if it takes longer.
/// Use it inside `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`.
pub async fn run_test<F: Future>(body: F) -> F::Output {
    init();
    match tokio::time::timeout(TEST_TIMEOUT, body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// What a [`wait_for`] condition may return: `bool`, `Option<T>` (done when
/// `Some`, yields `T`) or `Result<T, E>` (done when `Ok`; the last `Err` is
/// shown in the timeout panic, so return one that says what was seen).
pub trait Condition {
    type Output;
    fn into_result(self) -> Result<Self::Output, String>;
}

impl Condition for bool {
    type Output = ();
    fn into_result(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("condition was false".to_owned())
        }
    }
}

impl<T> Condition for Option<T> {
    type Output = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "condition was None".to_owned())
    }
}

impl<T, E: Display> Condition for Result<T, E> {
    type Output = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Re-checks `check` every 50 ms until it holds, for at most `timeout`, and
/// returns its output. Panics with `desc` and the last observation when it
/// never holds. This is the only way tests synchronize with gateways.
pub async fn wait_for<C, F, Fut>(desc: &str, timeout: Duration, mut check: F) -> C::Output
where
    C: Condition,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining.max(POLL), check()).await {
            Ok(outcome) => match outcome.into_result() {
                Ok(out) => return out,
                Err(last) => last,
            },
            Err(_) => "the check itself did not complete in time".to_owned(),
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {desc}; last observation: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A set of owned names, for comparing with [`GatewayHandle::imported_names`].
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// One mesh of a test: a temporary directory, a development CA for trust
/// domain `<name>.test`, a gateway certificate (`spiffe://<name>.test/ns/
/// elsinore/sa/gateway`, with DNS SAN `localhost` and IP SAN `127.0.0.1` so
/// ordinary TLS clients verify it too), and the gateway's federation and
/// admin listeners, bound on `127.0.0.1:0` at creation so that every
/// config can name every peer's address before any gateway starts.
///
/// Layout of `dir`: `certs/` (`ca.pem`, `gateway.pem`, `gateway.key`,
/// extra identities), `config/elsinore.yaml` (alone in its directory, which
/// the gateway watches), `cache/` (a ready import cache directory).
pub struct MeshFixture {
    pub name: String,
    pub trust_domain: TrustDomain,
    pub ca: Ca,
    pub dir: PathBuf,
    /// This mesh's CA certificate: the trust bundle peers configure for it.
    pub ca_pem: PathBuf,
    /// The gateway certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The config file [`MeshFixture::start`] writes and the gateway watches.
    pub config_path: PathBuf,
    /// A directory for `imports.cacheDir` (see [`MeshFixture::cache_dir`]).
    pub cache: PathBuf,
    /// Fixed for the fixture's life: restarts bind the same addresses.
    pub federation_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The data-plane ingress listener (mTLS from peers), pre-bound like
    /// the federation listener so exports can advertise its real port.
    pub ingress_addr: SocketAddr,
    /// This mesh's egress VIP range, `127.R1.R2.0/24` with R1 in 100..=250
    /// and R2 random: gateways of parallel test processes never try to
    /// bind the same VIP and port.
    pub vip_range: String,
    /// The port exports advertise: 15443 (nothing listens there) for
    /// [`MeshFixture::new`], the real ingress port for
    /// [`MeshFixture::data_plane`].
    pub advertise_port: u16,
    /// The pre-bound listeners (federation, admin, ingress), taken by the
    /// first start.
    listeners: Mutex<Option<PreBound>>,
    _tempdir: tempfile::TempDir,
}

/// Listeners bound at fixture creation: federation, admin, ingress.
type PreBound = (TcpListener, TcpListener, TcpListener);

/// The port the exports of a catalog-only fixture advertise.
const CATALOG_ONLY_ADVERTISE_PORT: u16 = 15443;

impl MeshFixture {
    /// Creates the fixture for mesh `name` (a DNS label). Its exports
    /// advertise `127.0.0.1:15443`, where nothing listens: for tests of the
    /// catalog exchange only (see [`MeshFixture::data_plane`]).
    pub async fn new(name: &str) -> MeshFixture {
        Self::create(name, false).await
    }

    /// Like [`MeshFixture::new`], but the exports advertise the gateway's
    /// real ingress listener (`127.0.0.1:<pre-bound port>`), so peers'
    /// egress can carry traffic to it.
    pub async fn data_plane(name: &str) -> MeshFixture {
        Self::create(name, true).await
    }

    async fn create(name: &str, advertise_ingress: bool) -> MeshFixture {
        init();
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("elsinore-{name}-"))
            .tempdir()
            .expect("create the mesh's temporary directory");
        let dir = tempdir.path().to_path_buf();
        let trust_domain: TrustDomain = format!("{name}.test")
            .parse()
            .unwrap_or_else(|e| panic!("trust domain for mesh {name:?}: {e}"));
        let ca = Ca::new(&trust_domain).expect("mint the mesh CA");
        for sub in ["certs", "config", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create fixture directories");
        }
        let ca_pem = dir.join("certs/ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).expect("write ca.pem");
        let federation = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind a federation listener on 127.0.0.1:0");
        let admin = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind an admin listener on 127.0.0.1:0");
        let ingress = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind an ingress listener on 127.0.0.1:0");
        let federation_addr = federation
            .local_addr()
            .expect("federation listener address");
        let admin_addr = admin.local_addr().expect("admin listener address");
        let ingress_addr = ingress.local_addr().expect("ingress listener address");
        let advertise_port = if advertise_ingress {
            ingress_addr.port()
        } else {
            CATALOG_ONLY_ADVERTISE_PORT
        };
        let mut fixture = MeshFixture {
            name: name.to_owned(),
            trust_domain,
            ca,
            config_path: dir.join("config/elsinore.yaml"),
            cache: dir.join("cache"),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca_pem,
            dir,
            federation_addr,
            admin_addr,
            ingress_addr,
            vip_range: random_vip_range(),
            advertise_port,
            listeners: Mutex::new(Some((federation, admin, ingress))),
            _tempdir: tempdir,
        };
        let issued = fixture.issue(&fixture.gateway_id());
        let (cert, key) = fixture.write_identity("gateway", &issued);
        fixture.cert = cert;
        fixture.key = key;
        fixture
    }

    /// The gateway's SPIFFE ID, `spiffe://<name>.test/ns/elsinore/sa/gateway`.
    pub fn gateway_id(&self) -> SpiffeId {
        SpiffeId::gateway(self.trust_domain.clone())
    }

    /// A SPIFFE ID in any trust domain (`path` like `/ns/x/sa/y`).
    pub fn spiffe_id(trust_domain: &str, path: &str) -> SpiffeId {
        let td: TrustDomain = trust_domain
            .parse()
            .unwrap_or_else(|e| panic!("trust domain {trust_domain:?}: {e}"));
        SpiffeId::new(td, path).unwrap_or_else(|e| panic!("SPIFFE ID path {path:?}: {e}"))
    }

    /// A certificate for `id` (any trust domain: this CA signs whatever it
    /// is asked, which is how tests forge identities), with SANs
    /// `localhost` and `127.0.0.1` besides the URI SAN.
    pub fn issue(&self, id: &SpiffeId) -> Issued {
        self.ca
            .issue(
                id,
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            )
            .unwrap_or_else(|e| panic!("mesh {}: issue a certificate for {id}: {e}", self.name))
    }

    /// Writes `issued` to `certs/<stem>.pem` and `certs/<stem>.key` and
    /// returns the two paths (for `ConfigSpec::identity` or a foreign peer).
    pub fn write_identity(&self, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("certs/{stem}.pem"));
        let key = self.dir.join(format!("certs/{stem}.key"));
        std::fs::write(&cert, &issued.cert_pem).expect("write certificate");
        std::fs::write(&key, &issued.key_pem).expect("write private key");
        (cert, key)
    }

    /// This mesh's trust bundle (its CA), as peers of it configure it.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(self.trust_domain.clone(), self.ca.cert_pem().as_bytes())
            .expect("parse the mesh CA as a trust bundle")
    }

    /// The gateway's own identity (certificate and key), e.g. to act as
    /// this mesh's gateway from a hand-written client.
    pub fn gateway_identity(&self) -> Identity {
        Identity::load(&self.cert, &self.key).expect("load the gateway identity")
    }

    /// A `peers` entry describing this mesh for another gateway that only
    /// serves it (no `federation` address: the other side does not dial).
    pub fn peer(&self) -> PeerSpec {
        PeerSpec::new(&self.name, self.trust_domain.as_str(), &self.ca_pem)
    }

    /// A `peers` entry for another gateway that dials this mesh's
    /// federation listener (API version: the gateway's default).
    pub fn dial(&self) -> PeerSpec {
        self.peer().federation(self.federation_addr)
    }

    /// `imports.cacheDir` pointing at this fixture's `cache/` directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.clone()
    }

    /// Renders `spec` into [`MeshFixture::config_path`] (atomically: write
    /// then rename, so a watching gateway never reads half a file) and
    /// returns the path.
    pub fn write_config(&self, spec: &ConfigSpec) -> PathBuf {
        write_atomically(&self.config_path, &self.render_ctx().render(spec));
        self.config_path.clone()
    }

    /// Writes the config for `spec`, loads it with `Config::load`, and
    /// starts a gateway on this fixture's listeners with the config file
    /// watched for export changes. The first start uses the pre-bound
    /// listeners; later starts (after [`GatewayHandle::stop`]) bind the same
    /// addresses again, so peers find a restarted gateway where it was.
    pub async fn start(&self, spec: &ConfigSpec) -> GatewayHandle {
        let path = self.write_config(spec);
        let config = Config::load(&path).unwrap_or_else(|e| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            panic!(
                "mesh {}: config rejected:\n{e}\n--- {}:\n{text}",
                self.name,
                path.display()
            )
        });
        let (federation, admin, ingress) = self.take_listeners().await;
        let gateway = Gateway::start(
            config,
            StartOptions {
                listeners: Listeners {
                    federation: Some(federation),
                    admin: Some(admin),
                    ingress: Some(ingress),
                    ..Default::default()
                },
                config_path: Some(path.clone()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("mesh {}: gateway failed to start: {e}", self.name));
        GatewayHandle {
            mesh: self.name.clone(),
            federation_addr: gateway.federation_addr,
            admin_addr: gateway.admin_addr,
            gateway,
            config_path: path,
            spec: spec.clone(),
            ctx: self.render_ctx(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn take_listeners(&self) -> PreBound {
        let prebound = self.listeners.lock().expect("listener lock").take();
        match prebound {
            Some(listeners) => listeners,
            None => (
                rebind(self.federation_addr).await,
                rebind(self.admin_addr).await,
                rebind(self.ingress_addr).await,
            ),
        }
    }

    fn render_ctx(&self) -> RenderCtx {
        RenderCtx {
            name: self.name.clone(),
            trust_domain: self.trust_domain.to_string(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            federation: self.federation_addr,
            admin: self.admin_addr,
            ingress: self.ingress_addr,
            advertise_port: self.advertise_port,
            vip_range: self.vip_range.clone(),
        }
    }
}

/// A random `127.R1.R2.0/24` with R1 in 100..=250 (clear of the default
/// 127.77.0.0/16 and of 127.0.0.1).
fn random_vip_range() -> String {
    let r1: u8 = rand::random_range(100..=250);
    let r2: u8 = rand::random();
    format!("127.{r1}.{r2}.0/24")
}

/// Binds `addr` again after a gateway released it. The port was ours a
/// moment ago, so a short bounded retry covers the kernel still holding it.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if Instant::now() >= deadline => panic!("bind {addr} again: {e}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// One entry of the config's `exports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    /// `None` = the gateway's default, `<name>.<mesh>.global`.
    pub fqdn: Option<String>,
    pub protocol: String,
    /// `None` = the first backend's port.
    pub port: Option<u16>,
    pub backends: Vec<String>,
    pub peers: Vec<String>,
}

impl ExportSpec {
    /// `name` exported to `peers`: protocol HTTP, backend `127.0.0.1:9080`,
    /// default fqdn and port.
    pub fn new(name: &str, peers: &[&str]) -> ExportSpec {
        ExportSpec {
            name: name.to_owned(),
            fqdn: None,
            protocol: "HTTP".to_owned(),
            port: None,
            backends: vec!["127.0.0.1:9080".to_owned()],
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    pub fn fqdn(mut self, fqdn: &str) -> Self {
        self.fqdn = Some(fqdn.to_owned());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = protocol.to_owned();
        self
    }

    /// Replaces the backends with this one.
    pub fn backend(mut self, host_port: &str) -> Self {
        self.backends = vec![host_port.to_owned()];
        self
    }
}

/// One entry of the config's `peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub trust_domain: String,
    pub trust_bundle: PathBuf,
    /// `host:port` to dial; `None` = only serve this peer.
    pub federation: Option<String>,
    /// `None` = the gateway's default (v1alpha2).
    pub api_version: Option<String>,
    /// `identities`: who may speak for the peer; empty = the key left out
    /// (the peer's Elsinore gateway ID).
    pub identities: Vec<String>,
    /// `followTrustBundle`.
    pub follow_trust_bundle: bool,
    /// `peers[].dial`: `consumer` or `owner`; `None` = the default.
    pub dial: Option<String>,
    /// Further keys of this peer, as (key, YAML flow value), in order.
    pub extra: Vec<(String, String)>,
}

impl PeerSpec {
    /// A peer that is only served (see [`MeshFixture::peer`] for meshes of
    /// the test; use this directly for a foreign peer).
    pub fn new(name: &str, trust_domain: &str, trust_bundle: &Path) -> PeerSpec {
        PeerSpec {
            name: name.to_owned(),
            trust_domain: trust_domain.to_owned(),
            trust_bundle: trust_bundle.to_path_buf(),
            federation: None,
            api_version: None,
            identities: Vec::new(),
            follow_trust_bundle: false,
            dial: None,
            extra: Vec::new(),
        }
    }

    /// Dial this peer's federation API at `address` (`ip:port` or `host:port`).
    pub fn federation(mut self, address: impl Display) -> Self {
        self.federation = Some(address.to_string());
        self
    }

    /// `v1alpha1` or `v1alpha2` (anything else tests validation).
    pub fn api_version(mut self, version: &str) -> Self {
        self.api_version = Some(version.to_owned());
        self
    }

    /// Allow `id` to speak for this peer (`identities`; the first call
    /// replaces the default, the peer's gateway ID). `spiffe://<td>/*`
    /// allows any identity of its trust domain.
    pub fn identity(mut self, id: impl Display) -> Self {
        self.identities.push(id.to_string());
        self
    }

    /// Allow any identity of the peer's trust domain (`spiffe://<td>/*`):
    /// for peers whose gateway is not an Elsinore (Envoy, scripted peers).
    pub fn any_identity(self) -> Self {
        let any = format!("spiffe://{}/*", self.trust_domain);
        self.identity(any)
    }

    /// `followTrustBundle: true` (needs `imports.cacheDir`).
    pub fn follow_trust_bundle(mut self) -> Self {
        self.follow_trust_bundle = true;
        self
    }

    /// `peers[].dial`: `owner` makes every stream with this peer go the
    /// owner-dials way (anything else tests validation).
    pub fn dial_by(mut self, side: &str) -> Self {
        self.dial = Some(side.to_owned());
        self
    }

    /// Any other key of this peer, its value written as given (YAML flow
    /// syntax), e.g. `.key("allowedNames", "[mesh-c.global]")`.
    pub fn key(mut self, key: &str, yaml: &str) -> Self {
        self.extra.push((key.to_owned(), yaml.to_owned()));
        self
    }
}

/// What goes into a gateway's YAML config besides what the fixture fixes
/// (mesh name and trust domain, identity files, listener addresses — the
/// pre-bound ingress, egress and DNS on `127.0.0.1:0` —, `advertise:
/// 127.0.0.1:<MeshFixture::advertise_port>`, `proxy.vipRange`).
///
/// [`ConfigSpec::new`] sets a fast reconnect backoff (1 s, at most 2 s) so
/// that restart tests converge in seconds; [`ConfigSpec::default`] leaves
/// every optional key out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSpec {
    pub exports: Vec<ExportSpec>,
    pub peers: Vec<PeerSpec>,
    /// `imports.staleAfter`, a humantime duration like `"3s"`.
    pub stale_after: Option<String>,
    /// `imports.cacheDir`.
    pub cache_dir: Option<PathBuf>,
    /// `federation.window`.
    pub window: Option<u32>,
    /// `federation.ackTimeout`.
    pub ack_timeout: Option<String>,
    /// `federation.snapshotQuietPeriod`.
    pub snapshot_quiet_period: Option<String>,
    /// `federation.backoff.{initial,max}`.
    pub backoff: Option<(String, String)>,
    /// Replaces the fixture's gateway certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Replaces the advertised ingress (`address`, `port`); `None` = the
    /// fixture's (see [`MeshFixture::advertise_port`]).
    pub advertise: Option<(String, u16)>,
    /// Extra `proxy:` keys (camelCase key, value), e.g.
    /// `("connectTimeout", "2s")`; `vipRange` is always the fixture's.
    pub proxy: Vec<(String, String)>,
    /// `drain.{delay,timeout}`, humantime durations.
    pub drain: Option<(String, String)>,
    /// `identity.trustBundle`: our own CAs, published to followers.
    pub own_bundle: Option<PathBuf>,
}

impl ConfigSpec {
    pub fn new() -> ConfigSpec {
        ConfigSpec {
            backoff: Some(("1s".to_owned(), "2s".to_owned())),
            ..ConfigSpec::default()
        }
    }

    pub fn export(mut self, export: ExportSpec) -> Self {
        self.exports.push(export);
        self
    }

    /// Replaces all exports.
    pub fn with_exports(mut self, exports: Vec<ExportSpec>) -> Self {
        self.exports = exports;
        self
    }

    pub fn peer(mut self, peer: PeerSpec) -> Self {
        self.peers.push(peer);
        self
    }

    pub fn stale_after(mut self, duration: &str) -> Self {
        self.stale_after = Some(duration.to_owned());
        self
    }

    pub fn cache_dir(mut self, dir: &Path) -> Self {
        self.cache_dir = Some(dir.to_path_buf());
        self
    }

    pub fn window(mut self, window: u32) -> Self {
        self.window = Some(window);
        self
    }

    pub fn ack_timeout(mut self, duration: &str) -> Self {
        self.ack_timeout = Some(duration.to_owned());
        self
    }

    pub fn snapshot_quiet_period(mut self, duration: &str) -> Self {
        self.snapshot_quiet_period = Some(duration.to_owned());
        self
    }

    pub fn backoff(mut self, initial: &str, max: &str) -> Self {
        self.backoff = Some((initial.to_owned(), max.to_owned()));
        self
    }

    pub fn identity(mut self, cert: &Path, key: &Path) -> Self {
        self.identity = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Advertise `address:port` as the ingress endpoint of every export.
    pub fn advertise(mut self, address: &str, port: u16) -> Self {
        self.advertise = Some((address.to_owned(), port));
        self
    }

    /// Sets one `proxy:` key (e.g. `requestTimeout`, `"5s"`).
    pub fn proxy(mut self, key: &str, value: &str) -> Self {
        self.proxy.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `drain.delay` and `drain.timeout`.
    pub fn drain(mut self, delay: &str, timeout: &str) -> Self {
        self.drain = Some((delay.to_owned(), timeout.to_owned()));
        self
    }

    /// Sets `identity.trustBundle` (the CAs this gateway publishes).
    pub fn own_bundle(mut self, path: &Path) -> Self {
        self.own_bundle = Some(path.to_path_buf());
        self
    }
}

/// The fixed parts of one mesh's config.
#[derive(Debug, Clone)]
struct RenderCtx {
    name: String,
    trust_domain: String,
    cert: PathBuf,
    key: PathBuf,
    federation: SocketAddr,
    admin: SocketAddr,
    ingress: SocketAddr,
    advertise_port: u16,
    vip_range: String,
}

/// A YAML double-quoted scalar: JSON string syntax is a subset of it.
fn q(s: impl Display) -> String {
    serde_json::to_string(&s.to_string()).expect("a string serializes")
}

fn qp(p: &Path) -> String {
    q(p.display())
}

impl RenderCtx {
    fn render(&self, spec: &ConfigSpec) -> String {
        let (cert, key) = spec
            .identity
            .clone()
            .unwrap_or_else(|| (self.cert.clone(), self.key.clone()));
        let mut y = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            y,
            "mesh:\n  name: {}\n  trustDomain: {}",
            q(&self.name),
            q(&self.trust_domain)
        );
        let _ = writeln!(
            y,
            "identity:\n  certificate: {}\n  privateKey: {}",
            qp(&cert),
            qp(&key)
        );
        if let Some(own) = &spec.own_bundle {
            let _ = writeln!(y, "  trustBundle: {}", qp(own));
        }
        let _ = writeln!(
            y,
            "listeners:\n  federation: {}\n  admin: {}\n  ingress: {}\n  egress: \"127.0.0.1:0\"\n  dns: \"127.0.0.1:0\"",
            q(self.federation),
            q(self.admin),
            q(self.ingress)
        );
        let (advertise_address, advertise_port) = spec
            .advertise
            .clone()
            .unwrap_or_else(|| ("127.0.0.1".to_owned(), self.advertise_port));
        let _ = writeln!(
            y,
            "advertise:\n  address: {}\n  port: {advertise_port}",
            q(advertise_address)
        );
        let _ = writeln!(y, "proxy:\n  vipRange: {}", q(&self.vip_range));
        for (key, value) in &spec.proxy {
            // Counts are YAML integers, switches booleans, durations strings.
            if value.parse::<i64>().is_ok() || value.parse::<bool>().is_ok() {
                let _ = writeln!(y, "  {key}: {value}");
            } else {
                let _ = writeln!(y, "  {key}: {}", q(value));
            }
        }
        if spec.exports.is_empty() {
            y.push_str("exports: []\n");
        } else {
            y.push_str("exports:\n");
        }
        for e in &spec.exports {
            let _ = writeln!(
                y,
                "  - name: {}\n    protocol: {}",
                q(&e.name),
                q(&e.protocol)
            );
            if let Some(fqdn) = &e.fqdn {
                let _ = writeln!(y, "    fqdn: {}", q(fqdn));
            }
            if let Some(port) = e.port {
                let _ = writeln!(y, "    port: {port}");
            }
            let backends: Vec<String> = e.backends.iter().map(q).collect();
            let peers: Vec<String> = e.peers.iter().map(q).collect();
            let _ = writeln!(y, "    backends: [{}]", backends.join(", "));
            let _ = writeln!(y, "    peers: [{}]", peers.join(", "));
        }
        if spec.peers.is_empty() {
            y.push_str("peers: []\n");
        } else {
            y.push_str("peers:\n");
        }
        for p in &spec.peers {
            let _ = writeln!(
                y,
                "  - name: {}\n    trustDomain: {}\n    trustBundle: {}",
                q(&p.name),
                q(&p.trust_domain),
                qp(&p.trust_bundle)
            );
            if let Some(f) = &p.federation {
                let _ = writeln!(y, "    federation: {}", q(f));
            }
            if let Some(v) = &p.api_version {
                let _ = writeln!(y, "    apiVersion: {}", q(v));
            }
            if !p.identities.is_empty() {
                let ids: Vec<String> = p.identities.iter().map(q).collect();
                let _ = writeln!(y, "    identities: [{}]", ids.join(", "));
            }
            if p.follow_trust_bundle {
                y.push_str("    followTrustBundle: true\n");
            }
            if let Some(d) = &p.dial {
                let _ = writeln!(y, "    dial: {}", q(d));
            }
            for (key, value) in &p.extra {
                let _ = writeln!(y, "    {key}: {value}");
            }
        }
        if spec.stale_after.is_some() || spec.cache_dir.is_some() {
            y.push_str("imports:\n");
            if let Some(s) = &spec.stale_after {
                let _ = writeln!(y, "  staleAfter: {}", q(s));
            }
            if let Some(d) = &spec.cache_dir {
                let _ = writeln!(y, "  cacheDir: {}", qp(d));
            }
        }
        if spec.window.is_some()
            || spec.ack_timeout.is_some()
            || spec.snapshot_quiet_period.is_some()
            || spec.backoff.is_some()
        {
            y.push_str("federation:\n");
            if let Some(w) = spec.window {
                let _ = writeln!(y, "  window: {w}");
            }
            if let Some(t) = &spec.ack_timeout {
                let _ = writeln!(y, "  ackTimeout: {}", q(t));
            }
            if let Some(t) = &spec.snapshot_quiet_period {
                let _ = writeln!(y, "  snapshotQuietPeriod: {}", q(t));
            }
            if let Some((initial, max)) = &spec.backoff {
                let _ = writeln!(
                    y,
                    "  backoff:\n    initial: {}\n    max: {}",
                    q(initial),
                    q(max)
                );
            }
        }
        if let Some((delay, timeout)) = &spec.drain {
            let _ = writeln!(
                y,
                "drain:\n  delay: {}\n  timeout: {}",
                q(delay),
                q(timeout)
            );
        }
        y
    }
}

/// A running gateway of one [`MeshFixture`], with readers for its admin API.
pub struct GatewayHandle {
    pub mesh: String,
    pub federation_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The gateway itself, for reading its shared state directly.
    pub gateway: Gateway,
    pub config_path: PathBuf,
    spec: ConfigSpec,
    ctx: RenderCtx,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl GatewayHandle {
    /// The spec the config file was last written from.
    pub fn spec(&self) -> &ConfigSpec {
        &self.spec
    }

    /// Rewrites the config file from `spec`; the running gateway picks up
    /// the change through its file watch (only `exports` apply live).
    pub fn rewrite_config(&mut self, spec: ConfigSpec) {
        write_atomically(&self.config_path, &self.ctx.render(&spec));
        self.spec = spec;
    }

    /// Rewrites the config file with the same spec but these exports.
    pub fn rewrite_exports(&mut self, exports: Vec<ExportSpec>) {
        let spec = self.spec.clone().with_exports(exports);
        self.rewrite_config(spec);
    }

    /// GET `path` on the admin listener over HTTP/1.1; `Err` says what went
    /// wrong (connection, status, body).
    pub async fn try_get_json(&self, path: &str) -> Result<Value, String> {
        let uri: http::Uri = format!("http://{}{path}", self.admin_addr)
            .parse()
            .map_err(|e| format!("admin URI for {path}: {e}"))?;
        let response = tokio::time::timeout(IO_TIMEOUT, self.http.get(uri))
            .await
            .map_err(|_| format!("GET {path}: no response within {IO_TIMEOUT:?}"))?
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {path}: body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
    }

    /// Like [`GatewayHandle::try_get_json`], panicking on failure.
    pub async fn get_json(&self, path: &str) -> Value {
        self.try_get_json(path)
            .await
            .unwrap_or_else(|e| panic!("mesh {}: {e}", self.mesh))
    }

    /// `GET /catalog`.
    pub async fn catalog(&self) -> Value {
        self.get_json("/catalog").await
    }

    /// `GET /peers`.
    pub async fn peers(&self) -> Value {
        self.get_json("/peers").await
    }

    /// `/catalog` `imports.<peer>`: `{state, snapshotComplete, services}`.
    /// Panics if `peer` is not a configured peer.
    pub async fn import(&self, peer: &str) -> Value {
        let catalog = self.catalog().await;
        match catalog.pointer(&format!("/imports/{peer}")) {
            Some(v) => v.clone(),
            None => panic!(
                "mesh {}: /catalog has no imports.{peer}: {catalog:#}",
                self.mesh
            ),
        }
    }

    /// The names of the services imported from `peer`, as /catalog lists them.
    pub async fn imported_names(&self, peer: &str) -> BTreeSet<String> {
        self.imported(peer).await.into_keys().collect()
    }

    /// Service name → registered fqdn of the imports from `peer`.
    pub async fn imported_fqdns(&self, peer: &str) -> BTreeMap<String, String> {
        self.imported(peer)
            .await
            .into_iter()
            .map(|(name, v)| (name, v["fqdn"].as_str().unwrap_or_default().to_owned()))
            .collect()
    }

    /// Service name → its /catalog entry (`name, fqdn, originalFqdn, aliased`).
    pub async fn imported(&self, peer: &str) -> BTreeMap<String, Value> {
        let import = self.import(peer).await;
        import["services"]
            .as_array()
            .unwrap_or_else(|| {
                panic!(
                    "mesh {}: imports.{peer}.services is not a list: {import}",
                    self.mesh
                )
            })
            .iter()
            .map(|s| (s["name"].as_str().unwrap_or_default().to_owned(), s.clone()))
            .collect()
    }

    /// `imports.<peer>.state` from /catalog (`connecting`, `syncing`,
    /// `synced`, `disconnected`, `failed`, `idle`).
    pub async fn import_state(&self, peer: &str) -> String {
        self.import(peer).await["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits (up to [`WAIT`]) until the imports from `peer` are exactly
    /// `expected` (by service name) and the snapshot is complete.
    pub async fn wait_imported(&self, peer: &str, expected: &[&str]) {
        let expected = names(expected);
        let desc = format!(
            "mesh {} to import exactly {expected:?} from {peer}",
            self.mesh
        );
        wait_for(&desc, WAIT, || async {
            let import = self.import(peer).await;
            let got: BTreeSet<String> = import["services"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|s| s["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if got == expected && import["snapshotComplete"] == true {
                Ok(())
            } else {
                Err(format!("imports.{peer} = {import}"))
            }
        })
        .await;
    }

    /// Waits until this gateway published TLS material of `generation` or
    /// later (a rotation it has taken).
    pub async fn wait_generation(&self, generation: u64, what: &str) {
        wait_for(what, WAIT, || async {
            let now = self.gateway.credentials.generation();
            if now >= generation {
                Ok(())
            } else {
                Err(format!("{} is at generation {now}", self.mesh))
            }
        })
        .await;
    }

    /// Waits (up to `timeout`) until `imports.<peer>.state` is `state`.
    pub async fn wait_state(&self, peer: &str, state: &str, timeout: Duration) {
        let desc = format!("mesh {}: imports.{peer}.state to be {state:?}", self.mesh);
        wait_for(&desc, timeout, || async {
            let import = self.import(peer).await;
            if import["state"] == state {
                Ok(())
            } else {
                Err(format!("imports.{peer} = {import}"))
            }
        })
        .await;
    }

    /// `/peers` entry of `peer` (`{name, consumer, owner, ...}`).
    pub async fn peer_entry(&self, peer: &str) -> Value {
        let peers = self.peers().await;
        peers["peers"]
            .as_array()
            .and_then(|list| list.iter().find(|p| p["name"] == peer))
            .cloned()
            .unwrap_or_else(|| panic!("mesh {}: /peers has no peer {peer}: {peers:#}", self.mesh))
    }

    /// `/peers` consumer-side counters of `peer` (`state, connected,
    /// messages, acks, nacks, reconnects, lastAck, lastNack, imported`).
    pub async fn consumer(&self, peer: &str) -> Value {
        self.peer_entry(peer).await["consumer"].clone()
    }

    /// `/peers` owner-side counters of `peer`.
    pub async fn owner(&self, peer: &str) -> Value {
        self.peer_entry(peer).await["owner"].clone()
    }

    /// The full service imported from `peer` under `name`, read from the
    /// gateway's shared state (ports and endpoints are not on /catalog).
    pub fn imported_service(&self, peer: &str, name: &str) -> Option<Arc<FederatedService>> {
        let state = self
            .gateway
            .shared
            .peers
            .iter()
            .find(|p| p.config.name == peer)?;
        let view = state.consumer.borrow().clone();
        view.services.iter().find(|s| s.name == name).cloned()
    }

    /// The ingress listener (mTLS from peers).
    pub fn ingress_addr(&self) -> SocketAddr {
        self.gateway
            .ingress_addr
            .unwrap_or_else(|| panic!("mesh {}: no ingress listener", self.mesh))
    }

    /// The DNS responder (UDP and TCP on the same port).
    pub fn dns_addr(&self) -> SocketAddr {
        self.gateway
            .dns_addr
            .unwrap_or_else(|| panic!("mesh {}: no DNS listener", self.mesh))
    }

    /// The ingress counters (live).
    pub fn ingress_stats(&self) -> &IngressStats {
        &self.gateway.ingress_stats
    }

    /// The egress counters, copied now.
    pub fn egress_stats(&self) -> EgressStatsSnapshot {
        self.gateway.egress_stats.snapshot()
    }

    /// The VIP and port egress serves `fqdn` (an imported registered name)
    /// on, from the current VIP table.
    pub fn vip(&self, fqdn: &str) -> Option<SocketAddr> {
        let table = self.gateway.shared.vips.borrow().clone();
        table
            .lookup_name(fqdn)
            .map(|e| SocketAddr::from((e.vip, e.port)))
    }

    /// Waits (up to [`WAIT`]) until `fqdn` has a VIP and egress accepts TCP
    /// connections on it, and returns it. The probe connection is closed
    /// at once without sending anything (an HTTP import dials nothing
    /// upstream for it; a TCP import does open one upstream connection).
    pub async fn wait_vip(&self, fqdn: &str) -> SocketAddr {
        let desc = format!("mesh {}: egress to listen on the VIP of {fqdn}", self.mesh);
        wait_for(&desc, WAIT, || async {
            let Some(vip) = self.vip(fqdn) else {
                return Err(format!("{fqdn} has no VIP yet"));
            };
            match TcpStream::connect(vip).await {
                Ok(_) => Ok(vip),
                Err(e) => Err(format!("connect {vip}: {e}")),
            }
        })
        .await
    }

    /// Drains the gateway and waits for every task; panics if that takes
    /// longer than 15 s (a shutdown bug). Its listeners are closed after.
    pub async fn stop(self) {
        let mesh = self.mesh;
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.gateway.shutdown())
            .await
            .is_err()
        {
            panic!("mesh {mesh}: gateway did not shut down within {SHUTDOWN_TIMEOUT:?}");
        }
    }
}

/// A client config presenting `issued` and verifying the server as a
/// gateway of `server` (by its trust bundle and trust domain), ALPN `h2`.
pub fn mtls_client_config(issued: &Issued, server: &MeshFixture) -> Arc<rustls::ClientConfig> {
    let identity = Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
        .expect("parse the client identity");
    elsinore_certs::client_config(&identity, &server.bundle(), None, &[b"h2"])
        .expect("build the mTLS client config")
}

/// A client config with no client certificate, verifying the server by
/// ordinary WebPKI rules against `server`'s CA (IP SAN 127.0.0.1), ALPN `h2`.
pub fn anonymous_client_config(server: &MeshFixture) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca =
        CertificateDer::from_pem_slice(server.ca.cert_pem().as_bytes()).expect("parse the CA PEM");
    roots.add(ca).expect("add the CA to the root store");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// TCP connect plus TLS handshake to `addr` (server name: its IP).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let dial = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(ServerName::from(addr.ip()), tcp)
            .await
    };
    tokio::time::timeout(IO_TIMEOUT, dial)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS dial timed out"))?
}

/// The HTTP/2 client preface plus an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether `addr` accepts a TLS connection made with `config`: `Ok` when
/// the handshake completes and the server answers an HTTP/2 preface,
/// `Err(reason)` when it refuses (a TLS 1.3 server rejects a client
/// certificate only after the client considers the handshake done, so the
/// refusal shows as an alert on the first read).
pub async fn probe_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut tls = tls_connect(addr, config)
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    tls.write_all(H2_PREFACE)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    tls.flush()
        .await
        .map_err(|e| format!("flush failed: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(IO_TIMEOUT, tls.read(&mut buf)).await {
        Err(_) => Err(format!("no answer within {IO_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
        Ok(Ok(0)) => Err("closed without answering".to_owned()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// A tonic channel to `addr` over TLS with `config` (each connection tonic
/// makes is a fresh [`tls_connect`]).
pub async fn grpc_channel(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move { tls_connect(addr, config).await.map(TokioIo::new) }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("an ip:port makes a valid URI")
        .connect_timeout(IO_TIMEOUT)
        .connect_with_connector(connector)
        .await
}

/// An open v1alpha2 stream: send ACKs/NACKs on `tx`, read owner responses
/// from `rx`; `headers` are the owner's response metadata.
pub struct V1alpha2Stream {
    pub tx: mpsc::Sender<rd2::BidirectionalStream>,
    pub rx: tonic::Streaming<rd2::BidirectionalStream>,
    pub headers: tonic::metadata::MetadataMap,
}

/// Opens `EstablishStream` (v1alpha2) on `channel` with the initial request
/// (`resource_url` of v1alpha2 FederatedService, the given `context`) and
/// the given request metadata (e.g. Elsinore's window extension header).
pub async fn establish_v1alpha2(
    channel: Channel,
    context: &str,
    metadata: &[(&'static str, &str)],
) -> Result<V1alpha2Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(rd2::BidirectionalStream {
        request: Some(rd2::StreamRequest {
            resource_url: type_url(ApiVersion::V1alpha2).to_owned(),
            response_nonce: String::new(),
            status: None,
            context: context.to_owned(),
        }),
        response: None,
    })
    .await
    .expect("the request channel is open");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    for (key, value) in metadata {
        let value = value
            .parse()
            .unwrap_or_else(|e| panic!("metadata {key}: {value:?}: {e}"));
        request.metadata_mut().insert(*key, value);
    }
    let mut client = rd2::discovery_service_client::DiscoveryServiceClient::new(channel);
    let response = client.establish_stream(request).await?;
    let headers = response.metadata().clone();
    Ok(V1alpha2Stream {
        tx,
        rx: response.into_inner(),
        headers,
    })
}
