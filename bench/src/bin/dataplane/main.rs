//! Data-plane benchmark: Elsinore side by side with nginx, HAProxy and Envoy
//! (and "direct", no gateways: the ceiling) on the same topology —
//! client → egress gateway (plaintext) → mTLS with client certificate →
//! ingress gateway → backend — one worker thread per gateway process, the
//! client and egress pinned to core 0, ingress and backends to core 1.
//!
//! Elsinore runs with every setting at its product default (the headline
//! column); `elsinore-yield` is Elsinore with `proxy.yieldToClients: true`,
//! a setting tuned for this placement, in a column of its own and only in
//! the HTTP workloads, where it acts.
//!
//! Rounds interleave the contenders (direct, Elsinore, Elsinore with
//! yieldToClients, nginx, HAProxy, Envoy, repeat) for every workload, each run on freshly started gateways (so a
//! peak RSS belongs to one workload). Ratios are computed within a round and
//! their medians reported. `bench/run.sh` is the entry point: it installs
//! the tools, builds, raises the file limit and runs this.
//!
//! ```text
//! dataplane [--rounds 3] [--duration 10] [--warmup 2]
//!           [--workloads http1,http2,connect,connect-resume,bulk,bulk-down,idle-tcp,idle-http,catalog]
//!           [--contenders direct,elsinore,elsinore-yield,nginx,haproxy,envoy]
//!           [--connections 64] [--streams 10] [--parallel 32] [--idle 5000]
//!           [--catalog-services 10000,100000] [--catalog-rounds N]
//!           [--elsinore PATH] [--envoy PATH] [--nginx PATH] [--haproxy PATH]
//!           [--elsinore-log warn] [--timeout 60] [--markdown FILE] [--keep]
//! ```

mod contenders;
mod procs;
mod report;
mod workloads;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use contenders::{BackendPorts, Contender, Env, Programs};
use elsinore_bench::{command_line, cpu_model, free_port, load_average, mint_certs};
use report::Sample;
use workloads::Workload;

pub struct Args {
    rounds: usize,
    duration: u64,
    warmup: u64,
    workloads: Vec<Workload>,
    contenders: Vec<Contender>,
    connections: usize,
    streams: usize,
    parallel: usize,
    idle: usize,
    catalog_services: Vec<usize>,
    catalog_rounds: Option<usize>,
    elsinore: Option<PathBuf>,
    envoy: String,
    nginx: String,
    haproxy: String,
    elsinore_log: String,
    timeout: Duration,
    markdown: Option<PathBuf>,
    keep: bool,
}

const USAGE: &str = "usage: dataplane [--rounds N] [--duration SECS] [--warmup SECS] \
[--workloads http1,http2,connect,connect-resume,bulk,bulk-down,idle-tcp,idle-http,catalog] \
[--contenders direct,elsinore,elsinore-yield,nginx,haproxy,envoy] [--connections N] [--streams N] \
[--parallel N] [--idle N] [--catalog-services 10000,100000] [--catalog-rounds N] \
[--elsinore PATH] [--envoy PATH] [--nginx PATH] [--haproxy PATH] [--elsinore-log FILTER] \
[--timeout SECS] [--markdown FILE] [--keep]";

fn list<T>(v: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect()
}

impl Args {
    fn parse(raw: &[String]) -> Result<Args> {
        let mut a = Args {
            rounds: 3,
            duration: 10,
            warmup: 2,
            workloads: Workload::ALL.to_vec(),
            contenders: Contender::ALL.to_vec(),
            connections: 64,
            streams: 10,
            parallel: 32,
            idle: 5000,
            catalog_services: vec![10_000, 100_000],
            catalog_rounds: None,
            elsinore: None,
            // run.sh points this at the real binary behind pip's launcher.
            envoy: std::env::var("BENCH_ENVOY").unwrap_or_else(|_| "envoy".to_owned()),
            nginx: "nginx".to_owned(),
            haproxy: "haproxy".to_owned(),
            elsinore_log: "warn".to_owned(),
            timeout: Duration::from_secs(60),
            markdown: None,
            keep: false,
        };
        let mut it = raw.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| anyhow!("{flag} needs a value"))
                    .cloned()
            };
            fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T> {
                v.parse()
                    .map_err(|_| anyhow!("{flag} {v:?} is not a valid number"))
            }
            match flag.as_str() {
                "--rounds" => a.rounds = num(flag, &value()?)?,
                "--duration" => a.duration = num(flag, &value()?)?,
                "--warmup" => a.warmup = num(flag, &value()?)?,
                "--connections" => a.connections = num(flag, &value()?)?,
                "--streams" => a.streams = num(flag, &value()?)?,
                "--parallel" => a.parallel = num(flag, &value()?)?,
                "--idle" => a.idle = num(flag, &value()?)?,
                "--catalog-rounds" => a.catalog_rounds = Some(num(flag, &value()?)?),
                "--timeout" => a.timeout = Duration::from_secs(num(flag, &value()?)?),
                "--workloads" => a.workloads = list(&value()?, Workload::parse)?,
                "--contenders" => {
                    let mut cs = list(&value()?, Contender::parse)?;
                    // The table always reads direct, Elsinore, nginx, HAProxy, Envoy.
                    cs.sort();
                    cs.dedup();
                    a.contenders = cs;
                }
                "--catalog-services" => {
                    a.catalog_services = list(&value()?, |s| num("--catalog-services", s))?
                }
                "--elsinore" => a.elsinore = Some(PathBuf::from(value()?)),
                "--envoy" => a.envoy = value()?,
                "--nginx" => a.nginx = value()?,
                "--haproxy" => a.haproxy = value()?,
                "--elsinore-log" => a.elsinore_log = value()?,
                "--elsinore-yield" => bail!(
                    "--elsinore-yield is gone: Elsinore runs at its defaults, and \
                     `--contenders` takes `elsinore-yield` for proxy.yieldToClients"
                ),
                "--markdown" => a.markdown = Some(PathBuf::from(value()?)),
                "--keep" => a.keep = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        ensure!(a.rounds > 0, "--rounds must be at least 1");
        ensure!(a.duration > 0, "--duration must be at least 1");
        ensure!(
            a.connections > 0 && a.streams > 0 && a.parallel > 0,
            "--connections, --streams and --parallel must be positive"
        );
        ensure!(a.idle > 0, "--idle must be at least 1");
        ensure!(!a.workloads.is_empty(), "--workloads is empty");
        ensure!(!a.contenders.is_empty(), "--contenders is empty");
        Ok(a)
    }
}

/// `name` as given if it is a path, else the first match on `PATH`.
fn find_program(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        ensure!(p.is_file(), "{name} is not a file");
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found on PATH (bench/run.sh installs it)"))
}

/// A binary built next to this one (same cargo profile).
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locate this program")?;
    let p = me
        .parent()
        .map(|d| d.join(name))
        .ok_or_else(|| anyhow!("{} has no directory", me.display()))?;
    ensure!(
        p.is_file(),
        "{} not found: build with `cargo build --release -p elsinore-gateway -p elsinore-bench`",
        p.display()
    );
    Ok(p)
}

fn run_one(
    env: &Env,
    args: &Args,
    round: usize,
    workload: Workload,
    contender: Contender,
) -> Result<workloads::Figures> {
    let tag = format!("r{round}-{}-{}", workload.name(), contender.name());
    let log_dir = env.dir.join(&tag).join("load");
    std::fs::create_dir_all(&log_dir)?;
    let mut dep = contenders::deploy(
        contender,
        env,
        &tag,
        workload.max_sessions(args.idle),
        workload.resumption(),
    )?;
    let figures = match workload {
        Workload::Http1 => workloads::http1(&mut dep, args, &log_dir),
        Workload::Http2 => workloads::http2(&mut dep, args, &log_dir),
        Workload::Connect => workloads::connect(&mut dep, args, env, &log_dir, "connect"),
        Workload::ConnectResume => {
            workloads::connect(&mut dep, args, env, &log_dir, "connect_resume")
        }
        Workload::Bulk => workloads::bulk(&mut dep, args, &log_dir, false),
        Workload::BulkDown => workloads::bulk(&mut dep, args, &log_dir, true),
        Workload::IdleTcp => workloads::idle(&mut dep, args, false),
        Workload::IdleHttp => workloads::idle(&mut dep, args, true),
        Workload::Catalog => bail!("catalog is not a per-contender workload"),
    };
    drop(dep);
    figures
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(&raw)?;
    procs::install_signal_cleanup()?;

    let elsinore = match &args.elsinore {
        Some(p) => find_program(&p.display().to_string())?,
        None => sibling("elsinore")?,
    };
    let dataplane_work: Vec<Workload> = args
        .workloads
        .iter()
        .copied()
        .filter(|w| *w != Workload::Catalog)
        .collect();
    let needs = |c: Contender| !dataplane_work.is_empty() && args.contenders.contains(&c);
    let program = |c: Contender, name: &str| -> Result<PathBuf> {
        if needs(c) {
            find_program(name)
        } else {
            Ok(PathBuf::from(name))
        }
    };
    let programs = Programs {
        connrate: sibling("connrate")?,
        catalog: if args.workloads.contains(&Workload::Catalog) {
            sibling("catalog")?
        } else {
            PathBuf::from("catalog")
        },
        // nginx is also the HTTP backend, needed by every contender.
        nginx: find_program(&args.nginx)?,
        haproxy: program(Contender::Haproxy, &args.haproxy)?,
        envoy: program(Contender::Envoy, &args.envoy)?,
        elsinore,
    };

    let tmp = tempfile::Builder::new()
        .prefix("elsinore-bench-dataplane-")
        .tempdir()
        .context("create a temporary directory")?;
    // A private copy: another build replacing target/release/elsinore
    // mid-run must not change what later rounds measure.
    let mut programs = programs;
    let frozen = tmp.path().join("elsinore");
    std::fs::copy(&programs.elsinore, &frozen)
        .with_context(|| format!("copy {}", programs.elsinore.display()))?;
    programs.elsinore = frozen;
    // The DNS SAN lets nginx and HAProxy verify the ingress by name (they
    // cannot match the SPIFFE URI SAN that Elsinore and Envoy check).
    let mint = |mesh: &str| {
        let dns = format!("*.{mesh}.global");
        mint_certs(&programs.elsinore, tmp.path(), mesh, Some(&dns))
    };
    let certs_a = mint("mesh-a")?;
    let certs_b = mint("mesh-b")?;
    let env = Env {
        dir: tmp.path().to_owned(),
        certs_a,
        certs_b,
        programs,
        backend: BackendPorts {
            http: free_port()?,
            h2c: free_port()?,
            echo: free_port()?,
            bulk: free_port()?,
        },
        timeout: args.timeout,
        elsinore_log: args.elsinore_log.clone(),
    };
    eprintln!("working directory {}", env.dir.display());

    let load_before = load_average();
    let revision = revision();
    let mut samples: Vec<Sample> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let backends = if dataplane_work.is_empty() {
        None
    } else {
        Some(contenders::start_backends(&env)?)
    };
    for round in 1..=args.rounds {
        for &workload in &dataplane_work {
            for &contender in &args.contenders {
                if workload.needs_gateways() && contender == Contender::Direct {
                    continue;
                }
                if contender == Contender::ElsinoreYield && !workload.yield_acts() {
                    continue;
                }
                eprintln!(
                    "[load {}] round {round} {} {}",
                    load_average(),
                    workload.name(),
                    contender.title()
                );
                match run_one(&env, &args, round, workload, contender) {
                    Ok(figures) => {
                        let shown: Vec<String> = figures
                            .iter()
                            .map(|(k, v)| format!("{k}={}", report::fmt_num(*v)))
                            .collect();
                        eprintln!("    {}", shown.join(" "));
                        samples.extend(figures.into_iter().map(|(key, value)| Sample {
                            round,
                            contender,
                            key,
                            value,
                        }));
                    }
                    Err(e) => {
                        let msg = format!(
                            "round {round} {} {}: {e:#}",
                            workload.name(),
                            contender.title()
                        );
                        eprintln!("    FAILED: {msg}");
                        failures.push(msg);
                    }
                }
            }
        }
    }
    drop(backends);
    let load_after_dataplane = load_average();

    let mut catalog_rows = Vec::new();
    if args.workloads.contains(&Workload::Catalog) {
        let rounds = args.catalog_rounds.unwrap_or(args.rounds);
        for &n in &args.catalog_services {
            eprintln!(
                "[load {}] catalog {n} services, {rounds} round(s)",
                load_average()
            );
            match workloads::catalog(&env, n, rounds, &env.dir) {
                Ok(figures) => {
                    eprintln!("    {figures:?}");
                    catalog_rows.push((n, figures));
                }
                Err(e) => {
                    let msg = format!("catalog {n}: {e:#}");
                    eprintln!("    FAILED: {msg}");
                    failures.push(msg);
                }
            }
        }
    }

    let md = render_markdown(
        &args,
        &raw,
        &env,
        &samples,
        &catalog_rows,
        &failures,
        &load_before,
        &load_after_dataplane,
        &revision,
    );
    println!("{md}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if args.keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn render_markdown(
    args: &Args,
    raw: &[String],
    env: &Env,
    samples: &[Sample],
    catalog_rows: &[(usize, workloads::Figures)],
    failures: &[String],
    load_before: &str,
    load_after: &str,
    revision: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "- Date: {}", command_line("date", &["-u"]));
    let _ = writeln!(
        out,
        "- Machine: {} CPU(s), {}; {}",
        command_line("nproc", &[]),
        cpu_model(),
        command_line("uname", &["-sr"])
    );
    let _ = writeln!(
        out,
        "- Load average (1/5/15 min): {load_before} before, {load_after} after the data-plane rounds, {} at the end",
        load_average()
    );
    let _ = writeln!(
        out,
        "- Elsinore: {revision} (`elsinore --worker-threads 1 --log {} run`), every setting at its default (in `connect`, `proxy.tlsResumption: false`, as for every contender); column \"{}\": `proxy.yieldToClients: true` in both gateways, HTTP workloads only",
        args.elsinore_log,
        Contender::ElsinoreYield.title()
    );
    let _ = writeln!(
        out,
        "- Peers: {}; {}; Envoy {}",
        command_line(&env.programs.nginx.display().to_string(), &["-v"]),
        command_line(&env.programs.haproxy.display().to_string(), &["-v"]),
        command_line(&env.programs.envoy.display().to_string(), &["--version"])
            .split_whitespace()
            .last()
            .unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "- Load tools: {}; {}; {}",
        command_line("wrk", &["-v"]),
        command_line("h2load", &["--version"]),
        command_line("iperf3", &["--version"])
    );
    let _ = writeln!(
        out,
        "- Command: `bench/run.sh{}`",
        raw.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    let _ = writeln!(
        out,
        "- {} round(s), {} s per measurement after {} s warm-up (HTTP); wrk `-t1 -c{}`, h2load `-t1 -c{} -m{}`, \
         connrate `--parallel {}`, iperf3 `-P1`, {} idle connections",
        args.rounds,
        args.duration,
        args.warmup,
        args.connections,
        args.connections,
        args.streams,
        args.parallel,
        args.idle
    );
    let contenders = &args.contenders;
    let rounds = args.rounds;
    if !samples.is_empty() {
        let (table, verdicts) = report::tables(samples, rounds, contenders);
        let _ = writeln!(
            out,
            "\nMedians over rounds. In each gateway's cell, `×d` is its ratio to direct and `×p` to the \
             best peer (nginx, HAProxy, Envoy), both computed within each round, then the median taken. \
             CPU is user + system time of both gateway processes (per request, per connection or per GB); \
             RSS from `/proc/<pid>/status`.\n"
        );
        out.push_str(&table);
        let _ = writeln!(
            out,
            "\n#### Targets\n\n| target | figure | verdict |\n|---|---|---|"
        );
        for v in verdicts {
            let _ = writeln!(
                out,
                "| {}: {} | {} | {} |",
                v.label,
                v.target,
                v.figure,
                match v.met {
                    Some(true) => "**met**",
                    Some(false) => "**missed**",
                    None => "not measured",
                }
            );
        }
        for (n, figures) in catalog_rows {
            let get = |k: &str| {
                figures
                    .iter()
                    .find(|(key, _)| key.ends_with(k))
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            let limit = if *n <= 10_000 { 1000.0 } else { 10_000.0 };
            let _ = writeln!(
                out,
                "| catalog {n} services: sync ≤ {limit:.0} ms | {:.0} ms | {} |\n\
                 | catalog {n} services: consumer RSS ≤ 200 MiB | {:.1} MiB peak | {} |",
                get(".sync"),
                verdict(get(".sync") <= limit),
                get(".consumer_hwm"),
                verdict(get(".consumer_hwm") <= 200.0)
            );
        }
        let _ = writeln!(out, "\n#### Per round\n");
        out.push_str(&report::per_round(samples, rounds, contenders));
    } else if !catalog_rows.is_empty() {
        let _ = writeln!(
            out,
            "\n| catalog | sync (median) | consumer peak RSS | owner peak RSS |\n|---|---:|---:|---:|"
        );
        for (n, figures) in catalog_rows {
            let get = |k: &str| {
                figures
                    .iter()
                    .find(|(key, _)| key.ends_with(k))
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            let _ = writeln!(
                out,
                "| {n} services | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                get(".sync"),
                get(".consumer_hwm"),
                get(".owner_hwm")
            );
        }
    }
    if !catalog_rows.is_empty() && !samples.is_empty() {
        let _ = writeln!(
            out,
            "\n#### Catalog delivery (window 256, `bench/src/bin/catalog.rs`)\n\n| services | sync (median) | consumer peak RSS | owner peak RSS |\n|---:|---:|---:|---:|"
        );
        for (n, figures) in catalog_rows {
            let get = |k: &str| {
                figures
                    .iter()
                    .find(|(key, _)| key.ends_with(k))
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            let _ = writeln!(
                out,
                "| {n} | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                get(".sync"),
                get(".consumer_hwm"),
                get(".owner_hwm")
            );
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\n#### Failed runs\n");
        for f in failures {
            let first = f.lines().next().unwrap_or("");
            let _ = writeln!(out, "- {first}");
        }
    }
    out
}

/// The git revision of the gateway under test, taken when the run starts.
fn revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = command_line("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args([
            "-C",
            dir,
            "status",
            "--porcelain",
            "--",
            "../gateway",
            "../certs",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("git {rev} + uncommitted changes in gateway/ or certs/")
    } else {
        format!("git {rev}")
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}
