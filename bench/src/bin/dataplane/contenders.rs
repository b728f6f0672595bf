//! The contenders and how each is deployed: the shared backends (nginx for
//! HTTP, `connrate echo`, `iperf3 -s`, all pinned to core 1), and for every
//! gateway product an egress (mesh A, pinned to core 0 with the load
//! generator) and an ingress (mesh B, core 1) rendered from the templates in
//! `bench/templates/`, started, waited for, and checked end to end before
//! any load is sent. "direct" deploys nothing: the client talks to the
//! backends themselves.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::procs::{Proc, local, wait_port};
use elsinore_bench::{free_port, http_get, tail};

/// Where the load generator and the egress gateway run.
pub const CLIENT_CPU: &str = "0";
/// Where the ingress gateway and the backends run.
pub const SERVER_CPU: &str = "1";
/// The Host / SNI name of the HTTP service, as every ingress expects it.
pub const WEB_HOST: &str = "web.mesh-b.global";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Contender {
    Direct,
    /// Elsinore with every setting at its product default: the headline.
    Elsinore,
    /// Elsinore with `proxy.yieldToClients: true` in both gateways, a
    /// setting tuned for this benchmark's placement (the egress shares a
    /// core with the load generator); its own column, never the headline.
    ElsinoreYield,
    Nginx,
    Haproxy,
    Envoy,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::Elsinore,
        Contender::ElsinoreYield,
        Contender::Nginx,
        Contender::Haproxy,
        Contender::Envoy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Elsinore => "elsinore",
            Contender::ElsinoreYield => "elsinore-yield",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::Envoy => "envoy",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Elsinore => "Elsinore",
            Contender::ElsinoreYield => "Elsinore, yieldToClients",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "HAProxy",
            Contender::Envoy => "Envoy",
        }
    }

    /// The other gateway products Elsinore is compared with.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Contender::Nginx | Contender::Haproxy | Contender::Envoy
        )
    }

    pub fn parse(s: &str) -> Result<Contender> {
        Contender::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                anyhow!(
                    "unknown contender {s:?} (direct, elsinore, elsinore-yield, nginx, haproxy, envoy)"
                )
            })
    }
}

/// Programs used, resolved once.
pub struct Programs {
    pub elsinore: PathBuf,
    pub connrate: PathBuf,
    pub catalog: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub envoy: PathBuf,
}

/// Ports of the shared backends.
#[derive(Clone, Copy)]
pub struct BackendPorts {
    pub http: u16,
    pub h2c: u16,
    pub echo: u16,
    pub bulk: u16,
}

/// Everything fixed for the whole run.
pub struct Env {
    pub dir: PathBuf,
    pub certs_a: PathBuf,
    pub certs_b: PathBuf,
    pub programs: Programs,
    pub backend: BackendPorts,
    pub timeout: Duration,
    pub elsinore_log: String,
}

/// Where the client sends each kind of traffic.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub http1: SocketAddr,
    pub h2c: SocketAddr,
    pub echo: SocketAddr,
    pub bulk: SocketAddr,
}

/// One contender's running gateways (none for direct).
pub struct Deployment {
    pub egress: Option<Proc>,
    pub ingress: Option<Proc>,
    pub targets: Targets,
}

impl Deployment {
    /// (role, pid) of each gateway process.
    pub fn gateways(&self) -> Vec<(&'static str, u32)> {
        let mut out = Vec::new();
        if let Some(p) = &self.egress {
            out.push(("egress", p.pid()));
        }
        if let Some(p) = &self.ingress {
            out.push(("ingress", p.pid()));
        }
        out
    }

    pub fn check_alive(&mut self) -> Result<()> {
        for p in [&mut self.egress, &mut self.ingress].into_iter().flatten() {
            p.check_alive()?;
        }
        Ok(())
    }
}

/// The shared backends, kept for the whole run.
pub struct Backends {
    /// Held only so that dropping `Backends` kills them.
    _procs: Vec<Proc>,
}

fn template(name: &str) -> Result<&'static str> {
    Ok(match name {
        "nginx-backend.conf" => include_str!("../../../templates/nginx-backend.conf"),
        "nginx-egress.conf" => include_str!("../../../templates/nginx-egress.conf"),
        "nginx-ingress.conf" => include_str!("../../../templates/nginx-ingress.conf"),
        "haproxy-egress.cfg" => include_str!("../../../templates/haproxy-egress.cfg"),
        "haproxy-ingress.cfg" => include_str!("../../../templates/haproxy-ingress.cfg"),
        "envoy-egress.yaml" => include_str!("../../../templates/envoy-egress.yaml"),
        "envoy-ingress.yaml" => include_str!("../../../templates/envoy-ingress.yaml"),
        "elsinore-egress.yaml" => include_str!("../../../templates/elsinore-egress.yaml"),
        "elsinore-ingress.yaml" => include_str!("../../../templates/elsinore-ingress.yaml"),
        other => bail!("no template {other}"),
    })
}

/// Fills `{{NAME}}` placeholders; a placeholder left unfilled is an error.
fn render(name: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut text = template(name)?.to_owned();
    for (key, value) in vars {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(at) = text.find("{{") {
        let rest = &text[at..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        bail!("template {name}: placeholder {} not filled", &rest[..end]);
    }
    Ok(text)
}

fn write_config(dir: &Path, file: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(file);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Starts nginx (HTTP backend), the echo server and `iperf3 -s`, pinned to
/// the server core, and waits for them.
pub fn start_backends(env: &Env) -> Result<Backends> {
    let dir = env.dir.join("backends");
    std::fs::create_dir_all(&dir)?;
    let b = env.backend;
    let log = dir.join("nginx.log");
    let conf = render(
        "nginx-backend.conf",
        &[
            ("RUN_DIR", path_str(&dir)),
            ("LOG", path_str(&log)),
            ("MAX_CONN", "16384".to_owned()),
            ("BACKEND_HTTP", b.http.to_string()),
            ("BACKEND_H2C", b.h2c.to_string()),
        ],
    )?;
    let conf = write_config(&dir, "nginx.conf", &conf)?;
    let mut nginx = Proc::spawn(
        "backend nginx",
        Some(SERVER_CPU),
        &env.programs.nginx,
        &nginx_args(&dir, &conf, &log),
        dir.join("nginx.out"),
    )?;
    let mut echo = Proc::spawn(
        "backend echo",
        Some(SERVER_CPU),
        &env.programs.connrate,
        &[
            "echo".to_owned(),
            "--listen".to_owned(),
            local(b.echo).to_string(),
        ],
        dir.join("echo.log"),
    )?;
    let mut iperf = Proc::spawn(
        "backend iperf3",
        Some(SERVER_CPU),
        Path::new("iperf3"),
        &[
            "-s".to_owned(),
            "-B".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            b.bulk.to_string(),
        ],
        dir.join("iperf3.log"),
    )?;
    for port in [b.http, b.h2c, b.echo, b.bulk] {
        wait_port(
            local(port),
            &mut [&mut nginx, &mut echo, &mut iperf],
            env.timeout,
        )?;
    }
    // iperf3 treats a connection that sends nothing as a failed test and
    // logs it; the readiness probe above is harmless.
    Ok(Backends {
        _procs: vec![nginx, echo, iperf],
    })
}

fn nginx_args(prefix: &Path, conf: &Path, log: &Path) -> Vec<String> {
    vec![
        "-p".to_owned(),
        format!("{}/", prefix.display()),
        "-e".to_owned(),
        path_str(log),
        "-c".to_owned(),
        path_str(conf),
    ]
}

/// Ports of a product gateway pair (nginx, HAProxy, Envoy): one listener per
/// service on either side.
struct PairPorts {
    eg_web_h1: u16,
    eg_web_h2: u16,
    eg_echo: u16,
    eg_bulk: u16,
    in_web: u16,
    in_echo: u16,
    in_bulk: u16,
}

impl PairPorts {
    fn pick() -> Result<PairPorts> {
        Ok(PairPorts {
            eg_web_h1: free_port()?,
            eg_web_h2: free_port()?,
            eg_echo: free_port()?,
            eg_bulk: free_port()?,
            in_web: free_port()?,
            in_echo: free_port()?,
            in_bulk: free_port()?,
        })
    }

    fn vars(&self, env: &Env, dir: &Path, log: &Path, max_sessions: usize) -> Vec<(&str, String)> {
        vec![
            ("RUN_DIR", path_str(dir)),
            ("LOG", path_str(log)),
            ("MAX_CONN", (2 * max_sessions).to_string()),
            ("MAX_SESSIONS", max_sessions.to_string()),
            ("CERTS_A", path_str(&env.certs_a)),
            ("CERTS_B", path_str(&env.certs_b)),
            ("EG_WEB_H1", self.eg_web_h1.to_string()),
            ("EG_WEB_H2", self.eg_web_h2.to_string()),
            ("EG_ECHO", self.eg_echo.to_string()),
            ("EG_BULK", self.eg_bulk.to_string()),
            ("IN_WEB", self.in_web.to_string()),
            ("IN_ECHO", self.in_echo.to_string()),
            ("IN_BULK", self.in_bulk.to_string()),
            ("BACKEND_HTTP", env.backend.http.to_string()),
            ("BACKEND_ECHO", env.backend.echo.to_string()),
            ("BACKEND_BULK", env.backend.bulk.to_string()),
        ]
    }
}

/// Starts `contender`'s gateways in a fresh directory `tag`, waits until
/// they serve, and checks the HTTP and TCP paths end to end once.
/// `max_sessions` sizes the products' connection limits (HAProxy `maxconn`,
/// nginx `worker_connections` = twice that, as it counts both sides).
/// `resume` lets the gateways (Elsinore included, `proxy.tlsResumption`)
/// resume TLS sessions between egress and ingress (off everywhere except the
/// connect-resume workload).
pub fn deploy(
    contender: Contender,
    env: &Env,
    tag: &str,
    max_sessions: usize,
    resume: bool,
) -> Result<Deployment> {
    let dir = env.dir.join(tag);
    let mut dep = match contender {
        Contender::Direct => Deployment {
            egress: None,
            ingress: None,
            targets: Targets {
                http1: local(env.backend.http),
                h2c: local(env.backend.h2c),
                echo: local(env.backend.echo),
                bulk: local(env.backend.bulk),
            },
        },
        Contender::Elsinore => deploy_elsinore(env, &dir, resume, false)?,
        Contender::ElsinoreYield => deploy_elsinore(env, &dir, resume, true)?,
        Contender::Nginx | Contender::Haproxy | Contender::Envoy => {
            deploy_product(contender, env, &dir, max_sessions, resume)?
        }
    };
    check_paths(&mut dep, env.timeout)
        .with_context(|| format!("{} path check", contender.title()))?;
    Ok(dep)
}

fn deploy_product(
    contender: Contender,
    env: &Env,
    dir: &Path,
    max_sessions: usize,
    resume: bool,
) -> Result<Deployment> {
    let ports = PairPorts::pick()?;
    let start = |role: &str, cpu: &str| -> Result<Proc> {
        let side = dir.join(role);
        std::fs::create_dir_all(&side)?;
        let log = side.join(format!("{role}.log"));
        let mut vars = ports.vars(env, &side, &log, max_sessions);
        vars.extend(resumption_vars(resume));
        let (program, args) = match contender {
            Contender::Nginx => {
                let conf = render(&format!("nginx-{role}.conf"), &vars)?;
                let conf = write_config(&side, "nginx.conf", &conf)?;
                (&env.programs.nginx, nginx_args(&side, &conf, &log))
            }
            Contender::Haproxy => {
                // HAProxy wants the certificate and its key in one file.
                for mesh in ["a", "b"] {
                    let certs = if mesh == "a" {
                        &env.certs_a
                    } else {
                        &env.certs_b
                    };
                    let mut pem = std::fs::read_to_string(certs.join("gateway.pem"))?;
                    pem.push_str(&std::fs::read_to_string(certs.join("gateway.key"))?);
                    write_config(&side, &format!("mesh-{mesh}-crt.pem"), &pem)?;
                }
                let conf = render(&format!("haproxy-{role}.cfg"), &vars)?;
                let conf = write_config(&side, "haproxy.cfg", &conf)?;
                (
                    &env.programs.haproxy,
                    vec!["-db".to_owned(), "-f".to_owned(), path_str(&conf)],
                )
            }
            Contender::Envoy => {
                let conf = render(&format!("envoy-{role}.yaml"), &vars)?;
                let conf = write_config(&side, "envoy.yaml", &conf)?;
                (
                    &env.programs.envoy,
                    vec![
                        "-c".to_owned(),
                        path_str(&conf),
                        "--concurrency".to_owned(),
                        "1".to_owned(),
                        "--log-level".to_owned(),
                        "warn".to_owned(),
                        // Two Envoys on one host would fight over the
                        // hot-restart shared memory otherwise.
                        "--disable-hot-restart".to_owned(),
                    ],
                )
            }
            _ => bail!("{} is not a product gateway", contender.title()),
        };
        Proc::spawn(
            format!("{} {role}", contender.title()),
            Some(cpu),
            program,
            &args,
            side.join(format!("{role}.out")),
        )
    };
    let mut ingress = start("ingress", crate::contenders::SERVER_CPU)?;
    let mut egress = start("egress", CLIENT_CPU)?;
    for port in [ports.in_web, ports.in_echo, ports.in_bulk] {
        wait_port(local(port), &mut [&mut ingress, &mut egress], env.timeout)?;
    }
    let h2 = if contender == Contender::Envoy {
        // Envoy's HTTP listener speaks both (codec AUTO).
        ports.eg_web_h1
    } else {
        ports.eg_web_h2
    };
    for port in [ports.eg_web_h1, h2, ports.eg_echo, ports.eg_bulk] {
        wait_port(local(port), &mut [&mut ingress, &mut egress], env.timeout)?;
    }
    Ok(Deployment {
        egress: Some(egress),
        ingress: Some(ingress),
        targets: Targets {
            http1: local(ports.eg_web_h1),
            h2c: local(h2),
            echo: local(ports.eg_echo),
            bulk: local(ports.eg_bulk),
        },
    })
}

/// Template values that switch TLS session resumption between the product
/// gateways on (`resume`) or off (full handshake per connection).
fn resumption_vars(resume: bool) -> Vec<(&'static str, String)> {
    let pick = |on: &str, off: &str| if resume { on } else { off }.to_owned();
    vec![
        ("NGINX_SESSION_REUSE", pick("on", "off")),
        ("NGINX_TICKETS", pick("on", "off")),
        ("HAPROXY_NO_TICKETS", pick("", "no-tls-tickets")),
        ("HAPROXY_NO_SSL_REUSE", pick("", "no-ssl-reuse")),
        ("ENVOY_SESSION_KEYS", pick("1", "0")),
        ("ENVOY_NO_TICKETS", pick("false", "true")),
    ]
}

/// Both Elsinore gateways, every setting at its default except
/// `tlsResumption` (off where the workload measures full handshakes, as
/// for every contender) and, for [`Contender::ElsinoreYield`],
/// `yieldToClients`.
fn deploy_elsinore(
    env: &Env,
    dir: &Path,
    resume: bool,
    yield_to_clients: bool,
) -> Result<Deployment> {
    let p = |_: ()| free_port();
    let (b_fed, b_admin, in_port, b_egress, b_dns) = (p(())?, p(())?, p(())?, p(())?, p(())?);
    let (a_fed, a_admin, a_ingress, a_egress, a_dns) = (p(())?, p(())?, p(())?, p(())?, p(())?);
    let vars = vec![
        ("ELSINORE_RESUMPTION", resume.to_string()),
        ("ELSINORE_YIELD", yield_to_clients.to_string()),
        ("CERTS_A", path_str(&env.certs_a)),
        ("CERTS_B", path_str(&env.certs_b)),
        ("B_FEDERATION", b_fed.to_string()),
        ("B_ADMIN", b_admin.to_string()),
        ("IN_WEB", in_port.to_string()),
        ("B_EGRESS", b_egress.to_string()),
        ("B_DNS", b_dns.to_string()),
        ("A_FEDERATION", a_fed.to_string()),
        ("A_ADMIN", a_admin.to_string()),
        ("A_INGRESS", a_ingress.to_string()),
        ("A_EGRESS", a_egress.to_string()),
        ("A_DNS", a_dns.to_string()),
        ("BACKEND_HTTP", env.backend.http.to_string()),
        ("BACKEND_ECHO", env.backend.echo.to_string()),
        ("BACKEND_BULK", env.backend.bulk.to_string()),
    ];
    // Each config alone in its own directory, logs elsewhere: the gateway
    // watches its config's directory for live reload.
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let start = |role: &str, cpu: &str| -> Result<Proc> {
        let conf = render(&format!("elsinore-{role}.yaml"), &vars)?;
        let conf = write_config(&dir.join(role), "config.yaml", &conf)?;
        Proc::spawn(
            format!("Elsinore {role}"),
            Some(cpu),
            &env.programs.elsinore,
            &[
                "--worker-threads".to_owned(),
                "1".to_owned(),
                "--log".to_owned(),
                env.elsinore_log.clone(),
                "run".to_owned(),
                "--config".to_owned(),
                path_str(&conf),
            ],
            logs.join(format!("{role}.log")),
        )
    };
    let mut ingress = start("ingress", SERVER_CPU)?;
    wait_ready(&mut ingress, local(b_admin), env.timeout)?;
    let mut egress = start("egress", CLIENT_CPU)?;
    wait_imports(&mut egress, local(a_admin), 3, env.timeout)?;
    let web = SocketAddr::new(
        resolve_vip(WEB_HOST, a_dns, &mut egress, env.timeout)?.into(),
        8080,
    );
    let echo = SocketAddr::new(
        resolve_vip("echo.mesh-b.global", a_dns, &mut egress, env.timeout)?.into(),
        9007,
    );
    let bulk = SocketAddr::new(
        resolve_vip("bulk.mesh-b.global", a_dns, &mut egress, env.timeout)?.into(),
        5201,
    );
    for addr in [web, echo, bulk] {
        wait_port(addr, &mut [&mut ingress, &mut egress], env.timeout)?;
    }
    Ok(Deployment {
        egress: Some(egress),
        ingress: Some(ingress),
        targets: Targets {
            http1: web,
            h2c: web,
            echo,
            bulk,
        },
    })
}

fn wait_ready(proc: &mut Proc, admin: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        let last = match http_get(admin, "admin", "/ready") {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("{status} {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} not ready on http://{admin}/ready within {timeout:?} (last: {last}); log:\n{}",
                proc.name,
                tail(&proc.log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the egress's `/peers` shows mesh-b's snapshot complete with
/// `count` imports.
fn wait_imports(proc: &mut Proc, admin: SocketAddr, count: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("admin not answering");
    loop {
        proc.check_alive()?;
        if let Ok((200, body)) = http_get(admin, "admin", "/peers") {
            let view = serde_json::from_str::<Value>(&body).ok().and_then(|doc| {
                doc.get("peers")?
                    .as_array()?
                    .iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some("mesh-b"))?
                    .get("consumer")
                    .cloned()
            });
            if let Some(view) = view {
                let complete = view.get("snapshotComplete").and_then(Value::as_bool) == Some(true);
                let imported = view.get("imported").and_then(Value::as_u64).unwrap_or(0);
                if complete && imported == count {
                    return Ok(());
                }
                last = format!("snapshotComplete={complete} imported={imported}");
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not import {count} services from mesh-b within {timeout:?} ({last}); log:\n{}",
                proc.name,
                tail(&proc.log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VIP of an imported name, from the egress gateway's DNS responder.
fn resolve_vip(name: &str, dns_port: u16, proc: &mut Proc, timeout: Duration) -> Result<Ipv4Addr> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        let out = Command::new("dig")
            .args(["+short", "+time=1", "+tries=1", "-p"])
            .arg(dns_port.to_string())
            .arg("@127.0.0.1")
            .args([name, "A"])
            .output()
            .context("run dig (apt-get install bind9-dnsutils)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(ip) = text.lines().find_map(|l| l.trim().parse::<Ipv4Addr>().ok()) {
            return Ok(ip);
        }
        if Instant::now() >= deadline {
            bail!("dig -p {dns_port} @127.0.0.1 {name} gave no address within {timeout:?}: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP request and one echoed byte through the deployment, so a
/// misconfigured contender fails here with a clear message instead of
/// producing a meaningless benchmark figure.
fn check_paths(dep: &mut Deployment, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        dep.check_alive()?;
        let http = http_get(dep.targets.http1, WEB_HOST, "/");
        let echo = crate::workloads::echo_once(dep.targets.echo);
        match (&http, &echo) {
            (Ok((200, body)), Ok(())) if body.contains("ok") => return Ok(()),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let logs: Vec<String> = [&dep.egress, &dep.ingress]
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        format!(
                            "--- {} ({}):\n{}",
                            p.name,
                            p.log.display(),
                            tail(&p.log, 15)
                        )
                    })
                    .collect();
                ensure!(
                    false,
                    "HTTP {:?} via {}, echo {:?} via {}\n{}",
                    http,
                    dep.targets.http1,
                    echo.map_err(|e| e.to_string()),
                    dep.targets.echo,
                    logs.join("\n")
                );
            }
        }
    }
}
