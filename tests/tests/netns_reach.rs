//! Imports reached from another host (issue 15, item 1): an app in its own
//! network namespace, joined to the gateways' namespace by a veth pair,
//! resolves imported names through a real DNS forwarder that models the
//! cluster DNS (dnsmasq with a stub zone `global` pointing at Elsinore's DNS
//! listener, as a CoreDNS stub domain would) and reaches HTTP, gRPC and TCP
//! imports across the veth: once with routable VIPs (an "AnyIP" local route
//! for the VIP range on the gateway host, listeners bound with
//! IP_FREEBIND), once with the shared address (one address in DNS, one
//! listener per port, HTTP routed by Host, TCP by port). In shared mode two
//! TCP imports on one port are reported and `imports.portOverrides` moves
//! one.
//!
//! These tests need root and iproute2 (`ip`), dnsmasq, curl and python3.
//! With `CI=true` a missing tool or privilege fails the test; elsewhere the
//! test says so loudly on stderr and returns. Namespaces, links and files
//! are named after the process id and removed on drop, even on failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use elsinore_gateway::config::Config;
use elsinore_gateway::runtime::{Gateway, StartOptions};
use elsinore_tests::dataplane::Backend;
use elsinore_tests::{ConfigSpec, ExportSpec, MeshFixture, WAIT, run_test, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the machine can run these tests; `Err` says what is missing.
fn prerequisites() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err("not running as root (network namespaces need it)".to_owned());
    }
    for tool in ["ip", "dnsmasq", "curl", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    Ok(())
}

/// `Some(())` when the test can run; panics under CI when it cannot.
fn can_run(test: &str) -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {why}; CI must provide it (see .ci/run)")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set CI=true to make this a failure)");
            false
        }
    }
}

fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn must(cmd: &[&str]) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The app's host: a namespace with one veth to the gateways' namespace.
/// Link 10.231.N.0/24 (gateway side .1, app .2); VIP range 10.232.N.0/24.
struct AppHost {
    ns: String,
    veth: String,
    n: u8,
    resolv_dir: PathBuf,
    dnsmasq: Option<Child>,
}

impl AppHost {
    fn new(tag: &str) -> AppHost {
        let pid = std::process::id();
        // Unique per process, so parallel test processes never meet.
        let n = u8::try_from(pid % 200).unwrap_or(0) + 20;
        let ns = format!("els-{tag}-{pid}");
        let veth = format!("elr{}{}", &tag[..1], pid % 1_000_000);
        let host = AppHost {
            resolv_dir: PathBuf::from(format!("/etc/netns/{ns}")),
            ns,
            veth,
            n,
            dnsmasq: None,
        };
        host.cleanup();
        let peer = format!("{}p", host.veth);
        must(&["ip", "netns", "add", &host.ns]);
        must(&[
            "ip", "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
        ]);
        must(&["ip", "link", "set", &peer, "netns", &host.ns]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", host.gateway_ip()),
            "dev",
            &host.veth,
        ]);
        must(&["ip", "link", "set", &host.veth, "up"]);
        let inside = |args: &[&str]| {
            let mut cmd = vec!["ip", "netns", "exec", host.ns.as_str()];
            cmd.extend_from_slice(args);
            must(&cmd);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", host.app_ip()),
            "dev",
            &peer,
        ]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &host.gateway_ip().to_string(),
        ]);
        // The app's /etc/resolv.conf (bind-mounted by `ip netns exec`):
        // the node-local forwarder below.
        std::fs::create_dir_all(&host.resolv_dir).expect("create /etc/netns/<ns>");
        std::fs::write(
            host.resolv_dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n",
        )
        .expect("write the namespace's resolv.conf");
        host
    }

    fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.n, 1)
    }

    fn app_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.n, 2)
    }

    fn vip_range(&self) -> String {
        format!("10.232.{}.0/24", self.n)
    }

    /// Routes the VIP range to the gateway host and delivers it locally
    /// there ("AnyIP"): the route is on the veth, so it goes with it.
    fn route_vips(&self) {
        let range = self.vip_range();
        let cmd = [
            "ip", "netns", "exec", &self.ns, "ip", "route", "add", &range, "via",
        ];
        let gw = self.gateway_ip().to_string();
        let mut cmd = cmd.to_vec();
        cmd.push(&gw);
        must(&cmd);
        must(&["ip", "route", "add", "local", &range, "dev", &self.veth]);
    }

    /// Starts dnsmasq in the namespace: the cluster DNS of this host, with
    /// the `global` zone forwarded to Elsinore's DNS listener and nothing
    /// else answered.
    fn start_forwarder(&mut self, elsinore_dns: SocketAddr) {
        let server = format!(
            "--server=/global/{}#{}",
            elsinore_dns.ip(),
            elsinore_dns.port()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
                "--user=root",
                "--cache-size=0",
                "--log-facility=-",
                "--log-queries",
                &server,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dnsmasq");
        self.dnsmasq = Some(child);
    }

    /// Runs `args` inside the namespace with a bounded time.
    fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["timeout", "20", "ip", "netns", "exec", self.ns.as_str()];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// `curl` from the app: HTTP/1.1 GET of `url`; the body or the error.
    fn curl(&self, url: &str) -> Result<String, String> {
        let out = self.exec(&["curl", "-sS", "--max-time", "10", "--fail-with-body", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url}: {} {}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    /// A gRPC unary call from the app (curl speaking h2c with prior
    /// knowledge): grpc.health.v1.Health/Check for service "". The raw
    /// response message, framed.
    fn grpc_health_check(&self, authority: &str) -> Result<Vec<u8>, String> {
        let body = self.resolv_dir.join("grpc-request.bin");
        std::fs::write(&body, [0u8, 0, 0, 0, 0]).expect("write the gRPC request");
        let url = format!("http://{authority}/grpc.health.v1.Health/Check");
        let data = format!("@{}", body.display());
        let out = self.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            &data,
            &url,
        ]);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "curl {url}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A TCP client in the app (python3): resolves `host`, connects to
    /// `port`, sends `payload`, half-closes and reads the answer.
    fn tcp_echo(&self, host: &str, port: u16, payload: &str) -> Result<String, String> {
        let script = format!(
            "import socket,sys\ns=socket.create_connection(({host:?},{port}),timeout=10)\ns.sendall({payload:?}.encode())\ns.shutdown(socket.SHUT_WR)\nb=b''\nwhile True:\n  d=s.recv(65536)\n  if not d: break\n  b+=d\nsys.stdout.write(b.decode())\n"
        );
        let out = self.exec(&["python3", "-c", &script]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "tcp {host}:{port}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ))
        }
    }

    /// The address the app's resolver gives for `name`.
    fn resolve(&self, name: &str) -> Result<String, String> {
        let script = format!("import socket\nprint(socket.gethostbyname({name:?}))");
        let out = self.exec(&["python3", "-c", &script]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_owned())
        }
    }

    fn cleanup(&self) {
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = run(&["ip", "link", "del", &self.veth]);
        let _ = std::fs::remove_dir_all(&self.resolv_dir);
    }
}

impl Drop for AppHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup();
    }
}

/// The owner (mesh A) exports: `web` (HTTP) and `api` (gRPC) on 8080,
/// `db` and `db2` (TCP echo) both on 9000.
struct Owner {
    a: MeshFixture,
    b: MeshFixture,
    _gateway: elsinore_tests::GatewayHandle,
    _backends: Vec<Backend>,
}

async fn owner() -> Owner {
    let a = MeshFixture::data_plane("mesh-a").await;
    let b = MeshFixture::new("mesh-b").await;
    let web = Backend::http1("web").await;
    let api = Backend::grpc_health("api", &[""]).await;
    let db = Backend::tcp_echo("db").await;
    let db2 = Backend::tcp_echo("db2").await;
    let spec = ConfigSpec::new()
        .peer(b.peer())
        .export(
            ExportSpec::new("web", &["mesh-b"])
                .port(8080)
                .backend(&web.host_port()),
        )
        .export(
            ExportSpec::new("api", &["mesh-b"])
                .protocol("GRPC")
                .port(8080)
                .backend(&api.host_port()),
        )
        .export(
            ExportSpec::new("db", &["mesh-b"])
                .protocol("TCP")
                .port(9000)
                .backend(&db.host_port()),
        )
        .export(
            ExportSpec::new("db2", &["mesh-b"])
                .protocol("TCP")
                .port(9000)
                .backend(&db2.host_port()),
        );
    let gateway = a.start(&spec).await;
    Owner {
        a,
        b,
        _gateway: gateway,
        _backends: vec![web, api, db, db2],
    }
}

/// Mesh B's gateway config: DNS facing the app's network, egress in the
/// given mode; everything else on loopback.
fn consumer_config(o: &Owner, host: &AppHost, dns_port: u16, proxy: &str, imports: &str) -> Config {
    let b = &o.b;
    let text = format!(
        "mesh: {{ name: mesh-b, trustDomain: {td} }}\n\
         identity: {{ certificate: {cert:?}, privateKey: {key:?} }}\n\
         listeners:\n  federation: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  ingress: \"off\"\n  egress: \"127.0.0.1:0\"\n  dns: \"{dns}:{dns_port}\"\n\
         peers:\n  - {{ name: mesh-a, trustDomain: {atd}, trustBundle: {abundle:?}, federation: {afed:?} }}\n\
         federation: {{ backoff: {{ initial: 1s, max: 2s }} }}\n\
         proxy:\n{proxy}\n{imports}",
        td = b.trust_domain,
        cert = b.cert.display().to_string(),
        key = b.key.display().to_string(),
        dns = host.gateway_ip(),
        atd = o.a.trust_domain,
        abundle = o.a.ca_pem.display().to_string(),
        afed = o.a.federation_addr.to_string(),
    );
    Config::from_yaml_str(&text, &b.dir).unwrap_or_else(|e| panic!("consumer config:\n{e}\n{text}"))
}

async fn admin_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if path == "/metrics" {
        return Ok(Value::String(body.to_owned()));
    }
    serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
}

/// Blocking work (child processes) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The app reaches `web` (HTTP), `api` (gRPC) and `db` (TCP) by name.
async fn app_reaches_every_protocol(host: &std::sync::Arc<AppHost>) {
    let h = host.clone();
    let body = wait_for("the app to reach web.mesh-a.global over HTTP", WAIT, || {
        let h = h.clone();
        blocking(move || h.curl("http://web.mesh-a.global:8080/hello"))
    })
    .await;
    let reply: Value = serde_json::from_str(&body).expect("backend JSON");
    assert_eq!(reply["backend"], "web");
    assert_eq!(reply["path"], "/hello");
    assert_eq!(
        reply["identity"],
        "spiffe://mesh-b.test/ns/elsinore/sa/gateway"
    );
    let h = host.clone();
    let grpc = blocking(move || h.grpc_health_check("api.mesh-a.global:8080")).await;
    // One message: HealthCheckResponse { status: SERVING (1) }.
    assert_eq!(grpc.expect("gRPC health check"), vec![0, 0, 0, 0, 2, 8, 1]);
    let h = host.clone();
    let echoed = blocking(move || h.tcp_echo("db.mesh-a.global", 9000, "across the veth")).await;
    assert_eq!(echoed.expect("TCP echo"), "across the veth");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_in_another_namespace_reaches_imports_on_routable_vips() {
    if !can_run("app_in_another_namespace_reaches_imports_on_routable_vips") {
        return;
    }
    run_test(async {
        let mut host = AppHost::new("v");
        let o = owner().await;
        let proxy = format!("  vipRange: {:?}", host.vip_range());
        let config = consumer_config(&o, &host, 0, &proxy, "");
        let gateway = Gateway::start(config, StartOptions::default())
            .await
            .expect("consumer gateway starts");
        let dns = gateway.dns_addr.expect("DNS listener");
        assert_eq!(dns.ip(), host.gateway_ip(), "DNS faces the app's network");
        // The VIPs bind before any route makes them local (IP_FREEBIND).
        let admin = gateway.admin_addr;
        wait_for(
            "every VIP listener bound before the route exists",
            WAIT,
            || async {
                let catalog = admin_json(admin, "/catalog").await?;
                let egress = &catalog["egress"];
                if egress["listeners"] == 4 && egress["unbound"] == serde_json::json!([]) {
                    Ok(())
                } else {
                    Err(format!("{egress}"))
                }
            },
        )
        .await;
        host.route_vips();
        host.start_forwarder(dns);
        let host = std::sync::Arc::new(host);
        app_reaches_every_protocol(&host).await;
        // Each name has its own VIP from the routed range, so the two TCP
        // imports on port 9000 both work.
        let h = host.clone();
        let vip = blocking(move || h.resolve("db2.mesh-a.global"))
            .await
            .expect("db2 resolves");
        let range: elsinore_gateway::config::VipRange = host.vip_range().parse().unwrap();
        assert!(range.contains(vip.parse().unwrap()), "{vip} in {range}");
        let h = host.clone();
        let echoed = blocking(move || h.tcp_echo("db2.mesh-a.global", 9000, "db2")).await;
        assert_eq!(echoed.expect("TCP echo of db2"), "db2");
        gateway.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_in_another_namespace_reaches_imports_on_the_shared_address() {
    if !can_run("app_in_another_namespace_reaches_imports_on_the_shared_address") {
        return;
    }
    run_test(async {
        let mut host = AppHost::new("s");
        let o = owner().await;
        let shared = host.gateway_ip();
        let proxy =
            format!("  mode: shared\n  shared: {{ answer: \"{shared}\", bind: \"{shared}\" }}");
        let gateway = Gateway::start(
            consumer_config(&o, &host, 0, &proxy, ""),
            StartOptions::default(),
        )
        .await
        .expect("consumer gateway starts");
        let dns = gateway.dns_addr.expect("DNS listener");
        host.start_forwarder(dns);
        let host = std::sync::Arc::new(host);
        app_reaches_every_protocol(&host).await;
        let h = host.clone();
        let addr = blocking(move || h.resolve("web.mesh-a.global"))
            .await
            .expect("resolves");
        assert_eq!(
            addr,
            shared.to_string(),
            "every name answers the shared address"
        );

        // db and db2 both want TCP port 9000: db (first by name) holds it,
        // db2 is reported and not answered, so nothing misroutes to db.
        let admin = gateway.admin_addr;
        let catalog = admin_json(admin, "/catalog").await.expect("/catalog");
        let collisions = &catalog["egress"]["portCollisions"];
        assert_eq!(collisions.as_array().map(Vec::len), Some(1), "{catalog:#}");
        assert_eq!(collisions[0]["fqdn"], "db2.mesh-a.global");
        assert_eq!(collisions[0]["port"], 9000);
        assert_eq!(collisions[0]["heldBy"], "TCP import db.mesh-a.global");
        assert_eq!(
            catalog["egress"]["listeners"], 2,
            "one listener per port: {catalog:#}"
        );
        let metrics = admin_json(admin, "/metrics").await.expect("/metrics");
        assert!(
            metrics
                .as_str()
                .unwrap()
                .contains("\nelsinore_egress_port_collisions 1\n"),
            "{metrics}"
        );
        let h = host.clone();
        let lost = blocking(move || h.tcp_echo("db2.mesh-a.global", 9000, "x")).await;
        assert!(lost.is_err(), "db2 must not reach db's backend: {lost:?}");
        gateway.shutdown().await;

        // Moved to 9001 by the config: both reachable, nothing reported.
        let imports = "imports:\n  portOverrides: { db2.mesh-a.global: 9001 }\n";
        // On the same DNS port, so the forwarder carries on.
        let config = consumer_config(&o, &host, dns.port(), &proxy, imports);
        let gateway = Gateway::start(config, StartOptions::default())
            .await
            .expect("consumer gateway restarts");
        let h = host.clone();
        let echoed = wait_for("db2 reachable on port 9001", WAIT, || {
            let h = h.clone();
            blocking(move || h.tcp_echo("db2.mesh-a.global", 9001, "moved"))
        })
        .await;
        assert_eq!(echoed, "moved");
        let h = host.clone();
        let echoed = blocking(move || h.tcp_echo("db.mesh-a.global", 9000, "stays")).await;
        assert_eq!(echoed.expect("db still on 9000"), "stays");
        let catalog = admin_json(gateway.admin_addr, "/catalog")
            .await
            .expect("/catalog");
        assert_eq!(catalog["egress"]["portCollisions"], serde_json::json!([]));
        gateway.shutdown().await;
    })
    .await;
}
