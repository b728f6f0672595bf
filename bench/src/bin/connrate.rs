//! New-connection load generator and TCP echo backend for the data-plane
//! benchmark (`dataplane`).
//!
//! `connrate run` keeps N loops busy for T seconds, each doing connect →
//! write 1 byte → read the 1-byte echo → close, and prints one JSON line with
//! the number of completed connections. Through a gateway pair every such
//! connection costs a full mTLS handshake between the gateways, so this
//! measures connection setup, not throughput. `connrate echo` is the backend
//! those connections end at (also used for the idle-connection test). Both
//! run on a single-threaded runtime so `taskset` pins all of their work.
//!
//! ```text
//! connrate run --target 127.0.0.1:PORT [--parallel 32] [--duration 10]
//! connrate echo --listen 127.0.0.1:PORT
//! ```

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one connection may take (connect + echo) before it counts as an error.
const PER_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

enum Mode {
    Run {
        target: SocketAddr,
        parallel: usize,
        duration: Duration,
    },
    Echo {
        listen: SocketAddr,
    },
}

fn parse(raw: &[String]) -> Result<Mode> {
    let mut it = raw.iter();
    let mode = it
        .next()
        .ok_or_else(|| anyhow!("usage: connrate run|echo … (try --help)"))?;
    let mut target = None;
    let mut listen = None;
    let mut parallel = 32usize;
    let mut duration = Duration::from_secs(10);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow!("{flag} needs a value"))
                .cloned()
        };
        match flag.as_str() {
            "--target" => {
                let v = value()?;
                target = Some(v.parse().with_context(|| format!("--target {v:?}"))?);
            }
            "--listen" => {
                let v = value()?;
                listen = Some(v.parse().with_context(|| format!("--listen {v:?}"))?);
            }
            "--parallel" => {
                let v = value()?;
                parallel = v.parse().with_context(|| format!("--parallel {v:?}"))?;
            }
            "--duration" => {
                let v = value()?;
                let secs: f64 = v.parse().with_context(|| format!("--duration {v:?}"))?;
                ensure!(secs > 0.0, "--duration {v:?} must be positive");
                duration = Duration::from_secs_f64(secs);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    match mode.as_str() {
        "run" => {
            ensure!(parallel > 0, "--parallel must be at least 1");
            Ok(Mode::Run {
                target: target.ok_or_else(|| anyhow!("run needs --target ADDR"))?,
                parallel,
                duration,
            })
        }
        "echo" => Ok(Mode::Echo {
            listen: listen.ok_or_else(|| anyhow!("echo needs --listen ADDR"))?,
        }),
        "-h" | "--help" => {
            println!(
                "usage: connrate run --target ADDR [--parallel N] [--duration SECS]\n       \
                 connrate echo --listen ADDR"
            );
            std::process::exit(0);
        }
        other => bail!("unknown mode {other:?} (run or echo)"),
    }
}

/// One connect → 1 byte → echo → close.
async fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}

async fn run(target: SocketAddr, parallel: usize, duration: Duration) -> Result<()> {
    let done = Rc::new(Cell::new(0u64));
    let errors = Rc::new(Cell::new(0u64));
    let first_error: Rc<Cell<Option<String>>> = Rc::new(Cell::new(None));
    let started = Instant::now();
    let deadline = started + duration;
    let mut loops = Vec::with_capacity(parallel);
    for _ in 0..parallel {
        let (done, errors, first_error) = (done.clone(), errors.clone(), first_error.clone());
        loops.push(tokio::task::spawn_local(async move {
            while Instant::now() < deadline {
                match tokio::time::timeout(PER_CONNECTION_TIMEOUT, one_connection(target)).await {
                    Ok(Ok(())) => done.set(done.get() + 1),
                    outcome => {
                        errors.set(errors.get() + 1);
                        let why = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        let previous = first_error.take();
                        first_error.set(previous.or(Some(why)));
                        // A refused or reset connection returns at once; do
                        // not spin on a dead target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    for one in loops {
        one.await.context("a connection loop panicked")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "connections": done.get(),
        "errors": errors.get(),
        "seconds": seconds,
        "connections_per_second": done.get() as f64 / seconds,
        "first_error": first_error.take(),
    });
    println!("{line}");
    Ok(())
}

async fn echo(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::task::spawn_local(async move {
            let _ = stream.set_nodelay(true);
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mode = parse(&raw)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the runtime")?;
    let local = tokio::task::LocalSet::new();
    match mode {
        Mode::Run {
            target,
            parallel,
            duration,
        } => local.block_on(&runtime, run(target, parallel, duration)),
        Mode::Echo { listen } => local.block_on(&runtime, echo(listen)),
    }
}
