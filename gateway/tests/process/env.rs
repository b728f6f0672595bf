//! Every flag can be set through an `ELSINORE_*` variable: the config
//! file, the log filter and format, the runtime's worker threads.

use crate::harness::{GatewaySpec, Net, Proc, WAIT, run_to_end};

/// mesh-a with one (undialed) peer, its config written; returns the spec
/// and the config path.
fn mesh_a(net: &Net, dir: &std::path::Path) -> (GatewaySpec, std::path::PathBuf) {
    let b = GatewaySpec::new(net, 20, "mesh-b", dir);
    let mut a = GatewaySpec::new(net, 10, "mesh-a", dir);
    a.peers = vec![b.as_peer(false)];
    let config = a.config_path(dir);
    a.write(&config);
    (a, config)
}

#[test]
fn elsinore_config_selects_the_file_and_elsinore_log_format_json_gives_json_lines() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::spawn(
        "mesh-a",
        &["run"],
        &[
            ("ELSINORE_CONFIG", config.to_str().unwrap()),
            ("ELSINORE_LOG_FORMAT", "json"),
        ],
    );
    p.wait_ready(a.admin);
    p.wait_log_after(0, &["gateway started"], WAIT);
    p.stop();
    let lines = p.lines();
    assert!(!lines.is_empty());
    let mut started = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "gateway started" {
            started = Some(v);
        }
    }
    let started = started.expect("no `gateway started` line");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["fields"]["mesh"], "mesh-a");
    assert_eq!(started["fields"]["admin"], a.admin.to_string());
    assert_eq!(started["fields"]["federation"], a.federation.to_string());
}

#[test]
fn text_logs_to_a_pipe_carry_no_terminal_colour_codes() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::run("mesh-a", &config, &[("ELSINORE_LOG_FORMAT", "text")]);
    p.wait_ready(a.admin);
    let started = p.wait_log_after(0, &["gateway started"], WAIT);
    assert!(
        started.contains(&format!(
            " INFO elsinore_gateway::runtime: gateway started mesh=mesh-a federation={}",
            a.federation
        )),
        "{started:?}"
    );
    p.stop();
    for line in p.lines() {
        assert!(!line.contains('\u{1b}'), "escape codes in {line:?}");
    }
}

#[test]
fn elsinore_log_sets_the_filter() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::run("mesh-a", &config, &[("ELSINORE_LOG", "warn")]);
    p.wait_ready(a.admin);
    p.stop();
    // With `warn`, none of the info lines every start and stop logs.
    let lines = p.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("gateway started") || l.contains("shutting down")),
        "{lines:#?}"
    );
}

#[test]
fn elsinore_worker_threads_one_runs_a_single_threaded_gateway_that_still_stops() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::run("mesh-a", &config, &[("ELSINORE_WORKER_THREADS", "1")]);
    p.wait_ready(a.admin);
    // A current-thread runtime has no worker threads.
    let names = thread_names(p.pid());
    assert!(!names.iter().any(|n| n.starts_with("tokio-r")), "{names:?}");
    p.stop();

    let mut p = Proc::run("mesh-a", &config, &[("ELSINORE_WORKER_THREADS", "3")]);
    p.wait_ready(a.admin);
    let names = thread_names(p.pid());
    let workers = names.iter().filter(|n| n.starts_with("tokio-r")).count();
    assert!(workers >= 3, "{names:?}");
    p.stop();
}

/// The names of the threads of process `pid` (Linux `/proc`).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn every_flag_of_every_command_has_an_elsinore_variable() {
    for command in [
        &["run"][..],
        &["check"],
        &["certs", "init"],
        &["demo"],
        &["catalog"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (status, help, _) = run_to_end(&args, &[], WAIT);
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{args:?}");
        // Every option is introduced by a line starting with `--name`
        // (or `-x, --name`); its description carries `[env: ELSINORE_...]`.
        let mut options: Vec<String> = Vec::new();
        let mut sections: Vec<String> = Vec::new();
        for line in help.lines() {
            let t = line.trim_start();
            let option = t
                .strip_prefix("-h, ")
                .or_else(|| t.strip_prefix("-V, "))
                .unwrap_or(t);
            if option.starts_with("--") {
                options.push(option.split_whitespace().next().unwrap().to_owned());
                sections.push(String::new());
            } else if let Some(s) = sections.last_mut() {
                s.push_str(t);
            }
        }
        assert!(options.len() >= 4, "{args:?}: {help}");
        for (option, text) in options.iter().zip(&sections) {
            if option == "--help" || option == "--version" {
                continue;
            }
            assert!(
                text.contains("[env: ELSINORE_"),
                "`elsinore {}` {option} has no ELSINORE_* variable: {text:?}",
                command.join(" ")
            );
        }
    }
}
