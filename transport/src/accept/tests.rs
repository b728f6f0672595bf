#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tokio::io::AsyncReadExt;

use super::*;
use crate::test_support::{WAIT, limit, wait_until};

/// Admitted connections, kept open with their permits until a test drops them.
type Held = Arc<Mutex<Vec<(TcpStream, Permit)>>>;

#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn hooks(self: &Arc<Self>) -> Hooks {
        let (a, r, f) = (Arc::clone(self), Arc::clone(self), Arc::clone(self));
        Hooks::default()
            .on_accepted(move |_| {
                a.accepted.fetch_add(1, Ordering::Relaxed);
            })
            .on_refused(move |_| {
                r.refused.fetch_add(1, Ordering::Relaxed);
            })
            .on_failed(move |_| {
                f.failed.fetch_add(1, Ordering::Relaxed);
            })
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

struct Running {
    addr: SocketAddr,
    connections: Connections,
    counts: Arc<Counts>,
    held: Held,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(cap: usize) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Connections::new(cap);
    let counts = Arc::new(Counts::default());
    let held: Held = Arc::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(
        listener,
        Settings::new("test"),
        connections.clone(),
        stop.clone(),
        counts.hooks(),
        {
            let held = Arc::clone(&held);
            move |tcp, _, permit| held.lock().unwrap().push((tcp, permit))
        },
    ));
    Running {
        addr,
        connections,
        counts,
        held,
        stop,
        task,
    }
}

impl Running {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    async fn wait_held(&self, n: usize) {
        wait_until(&format!("{n} admitted connections"), WAIT, || async {
            let held = self.held();
            if held == n {
                Ok(())
            } else {
                Err(format!("{held} admitted"))
            }
        })
        .await;
    }
}

/// Reads until the server closes the connection (EOF or reset).
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn the_cap_closes_connections_beyond_it_and_a_freed_permit_admits_the_next() {
    let _limit = limit();
    let l = start(2).await;
    let _a = TcpStream::connect(l.addr).await.unwrap();
    let _b = TcpStream::connect(l.addr).await.unwrap();
    l.wait_held(2).await;
    assert_eq!(l.connections.open(), 2);

    let mut over = TcpStream::connect(l.addr).await.unwrap();
    assert!(
        closed_by_server(&mut over).await,
        "a connection over the cap must be closed at once"
    );
    assert_eq!(Counts::get(&l.counts.refused), 1);
    assert_eq!(Counts::get(&l.counts.accepted), 3);
    assert_eq!(l.held(), 2);

    // One connection ends: its slot admits the next one.
    drop(l.held.lock().unwrap().pop());
    assert_eq!(l.connections.open(), 1);
    let _c = TcpStream::connect(l.addr).await.unwrap();
    l.wait_held(2).await;
    assert_eq!(Counts::get(&l.counts.refused), 1);
    assert_eq!(l.connections.open(), 2);
    l.stop.cancel();
    l.task.await.unwrap();
}

#[tokio::test]
async fn stop_ends_accepting_while_open_connections_keep_their_permits() {
    let _limit = limit();
    let l = start(4).await;
    let mut open = TcpStream::connect(l.addr).await.unwrap();
    l.wait_held(1).await;

    l.stop.cancel();
    l.task.await.unwrap();
    // The listener is closed once the loop returned: a connect is refused.
    assert!(TcpStream::connect(l.addr).await.is_err());
    assert_eq!(
        l.connections.open(),
        1,
        "the open connection keeps its slot"
    );
    assert!(
        !l.connections
            .drained(Instant::now() + Duration::from_millis(20))
            .await
    );

    // The admitted connection still works: its socket is not closed.
    let (mut server, _permit) = l.held.lock().unwrap().pop().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut server, b"x")
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"x");
}

#[tokio::test(start_paused = true)]
async fn drained_returns_when_the_last_permit_drops() {
    let _limit = limit();
    let connections = Connections::new(3);
    let first = connections.try_admit().unwrap();
    let second = connections.try_admit().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let waiting = tokio::spawn({
        let connections = connections.clone();
        async move { connections.drained(deadline).await }
    });
    drop(first);
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "one connection is still open");
    drop(second);
    assert!(
        waiting.await.unwrap(),
        "drained once the last permit dropped"
    );
    assert!(Instant::now() < deadline);
}

#[tokio::test(start_paused = true)]
async fn drained_gives_up_at_the_deadline() {
    let _limit = limit();
    let connections = Connections::new(1);
    let _held = connections.try_admit().unwrap();
    assert!(connections.try_admit().is_none(), "the cap is one");
    let start = Instant::now();
    assert!(!connections.drained(start + Duration::from_secs(30)).await);
    assert_eq!(Instant::now() - start, Duration::from_secs(30));
    assert_eq!(connections.open(), 1);
}

#[test]
fn a_cap_of_zero_still_admits_one() {
    let connections = Connections::new(0);
    assert_eq!(connections.cap(), 1);
    let _one = connections.try_admit().unwrap();
    assert!(connections.try_admit().is_none());
}

/// Set in the child process of [`an_accept_error_backs_off_instead_of_spinning`].
const EMFILE_CHILD: &str = "ELSINORE_ACCEPT_EMFILE_CHILD";
const EMFILE_TEST: &str = "accept::tests::an_accept_error_backs_off_instead_of_spinning";
const EMFILE_DONE: &str = "emfile child: backed off and recovered";

/// A real EMFILE: the test runs itself again in a child process whose
/// open-file limit is small (`prlimit`, so this process and the tests
/// beside it keep theirs), where it fills the descriptor table with a
/// connection waiting in the listener's backlog.
#[test]
fn an_accept_error_backs_off_instead_of_spinning() {
    let _limit = limit();
    if std::env::var_os(EMFILE_CHILD).is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(emfile_child());
        println!("{EMFILE_DONE}");
        return;
    }
    let out = std::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", EMFILE_TEST, "--nocapture", "--test-threads=1"])
        .env(EMFILE_CHILD, "1")
        .output()
        .expect("running the test binary under prlimit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(EMFILE_DONE),
        "the child failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

async fn emfile_child() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(24) => break, // EMFILE
            Err(e) => panic!("filling the descriptor table: {e}"),
        }
    }
    // The client takes the last free descriptor; accepting its connection
    // needs one more.
    fillers.pop();
    let _client = TcpStream::connect(addr).await.unwrap();

    let backoff = Duration::from_millis(20);
    let failures: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let accepted = Arc::new(AtomicU64::new(0));
    let hooks = Hooks::default()
        .on_failed({
            let failures = Arc::clone(&failures);
            move |e| {
                assert_eq!(e.raw_os_error(), Some(24), "expected EMFILE, got {e}");
                failures.lock().unwrap().push(Instant::now());
            }
        })
        .on_accepted({
            let accepted = Arc::clone(&accepted);
            move |_| {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
    let stop = CancellationToken::new();
    let held: Held = Arc::default();
    let task = tokio::spawn(serve(
        listener,
        Settings {
            name: "emfile",
            backoff,
        },
        Connections::new(8),
        stop.clone(),
        hooks,
        {
            let held = Arc::clone(&held);
            move |tcp, _, permit| held.lock().unwrap().push((tcp, permit))
        },
    ));
    wait_until("five failed accepts", WAIT, || async {
        let n = failures.lock().unwrap().len();
        if n >= 5 {
            Ok(())
        } else {
            Err(format!("{n} failures"))
        }
    })
    .await;
    let times = failures.lock().unwrap().clone();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // Without the back-off the next accept fails within microseconds.
        assert!(
            gap >= backoff - Duration::from_millis(2),
            "accept retried after {gap:?}, not after the {backoff:?} back-off ({} failures)",
            times.len()
        );
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 0);

    // A descriptor frees up: the waiting connection is accepted.
    fillers.pop();
    wait_until("the waiting connection accepted", WAIT, || async {
        match held.lock().unwrap().len() {
            1 => Ok(()),
            n => Err(format!("{n} admitted")),
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    drop(fillers);
}
