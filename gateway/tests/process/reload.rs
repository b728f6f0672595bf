//! Live reload of `exports` in a running process: on SIGHUP and when the
//! watched file changes (written in place, replaced by rename, or swapped
//! the way Kubernetes updates a mounted ConfigMap). A bad file is refused
//! with the last good catalog kept; changes outside `exports` are warned
//! about and not applied.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;

use crate::harness::{
    Export, GatewaySpec, Net, Proc, WAIT, accepts, export_names, get_json, http_get, spawn_backend,
    wait_for,
};

/// mesh-a exporting `reviews` to mesh-b (which is not started: a bundle is
/// all mesh-a needs of it).
fn mesh_a(net: &Net, dir: &Path) -> GatewaySpec {
    let backend = spawn_backend(net.ip(30), "backend", Arc::new(|| {}));
    let b = GatewaySpec::new(net, 20, "mesh-b", dir);
    let mut a = GatewaySpec::new(net, 10, "mesh-a", dir);
    a.exports = vec![Export::new("reviews", backend, &["mesh-b"])];
    a.peers = vec![b.as_peer(false)];
    a
}

fn with_export(spec: &GatewaySpec, name: &str) -> GatewaySpec {
    let mut next = spec.clone();
    let backend = spec.exports[0].backend;
    next.exports.push(Export::new(name, backend, &["mesh-b"]));
    next
}

/// `name -> name.mesh-a.global` for each of `names`.
fn exports(names: &[&str]) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|n| ((*n).to_owned(), format!("{n}.mesh-a.global")))
        .collect()
}

/// Waits until mesh-a's `/catalog` lists exactly `names`.
fn wait_exports(spec: &GatewaySpec, names: &[&str]) {
    let want = exports(names);
    wait_for(&format!("/catalog to export {names:?}"), WAIT, || {
        let got = export_names(&get_json(spec.admin, "/catalog")?);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

#[test]
fn sighup_reloads_a_change_the_file_watcher_cannot_see() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let a = mesh_a(&net, dir.path());
    // The watched directory holds only a link to a file elsewhere: writing
    // that file raises no event in the watched directory, so only SIGHUP
    // can make the gateway read it.
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("mesh-a.yaml");
    a.write(&real);
    let config = a.config_path(dir.path());
    symlink(&real, &config).unwrap();

    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    wait_exports(&a, &["reviews"]);

    with_export(&a, "ratings").write(&real);
    let mark = p.mark();
    p.signal("HUP");
    p.wait_log_after(mark, &["SIGHUP: reloading the config"], WAIT);
    p.wait_log_after(mark, &["exports reloaded", "exports=2"], WAIT);
    wait_exports(&a, &["ratings", "reviews"]);
    // SIGHUP reloads; it does not stop the process.
    assert_eq!(http_get(a.admin, "/live").map(|r| r.0), Ok(200));
}

#[test]
fn a_file_written_in_place_or_replaced_by_rename_is_reloaded() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let a = mesh_a(&net, dir.path());
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    wait_exports(&a, &["reviews"]);

    // An edit in place (truncate and write).
    let two = with_export(&a, "ratings");
    let mark = p.mark();
    two.write(&config);
    wait_exports(&a, &["ratings", "reviews"]);
    p.wait_log_after(mark, &["exports reloaded", "exports=2"], WAIT);

    // A new file renamed over the old one (editors, config management).
    let three = with_export(&two, "details");
    three.replace(&config);
    wait_exports(&a, &["details", "ratings", "reviews"]);

    // An export taken out again is withdrawn.
    a.replace(&config);
    wait_exports(&a, &["reviews"]);
}

#[test]
fn a_kubernetes_configmap_update_is_reloaded() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let a = mesh_a(&net, dir.path());
    // A ConfigMap volume: `mesh-a.yaml -> ..data/mesh-a.yaml`, `..data ->
    // ..<timestamp>`; an update writes a new timestamped directory and
    // renames a new `..data` link over the old one.
    let config = a.config_path(dir.path());
    let mount = config.parent().unwrap().to_owned();
    let version = |n: u32, spec: &GatewaySpec| {
        let d = mount.join(format!("..2026_12_06_13_00_0{n}.{n}"));
        std::fs::create_dir(&d).unwrap();
        spec.write(&d.join("mesh-a.yaml"));
        d
    };
    let first = version(1, &a);
    symlink(first.file_name().unwrap(), mount.join("..data")).unwrap();
    symlink("..data/mesh-a.yaml", &config).unwrap();

    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    wait_exports(&a, &["reviews"]);

    let second = version(2, &with_export(&a, "ratings"));
    symlink(second.file_name().unwrap(), mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    let mark = p.mark();
    wait_exports(&a, &["ratings", "reviews"]);
    p.wait_log_after(mark, &["exports reloaded", "exports=2"], WAIT);
}

#[test]
fn a_bad_change_is_refused_naming_the_problem_and_the_last_good_catalog_is_kept() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let a = mesh_a(&net, dir.path());
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    let good = with_export(&a, "ratings");
    good.replace(&config);
    wait_exports(&a, &["ratings", "reviews"]);

    // A valid YAML file with one invalid value: an export to an unknown peer.
    let mut bad = with_export(&good, "details");
    bad.exports[2].peers = vec!["mesh-z".to_owned()];
    let mark = p.mark();
    bad.replace(&config);
    let line = p.wait_log_after(mark, &["config reload rejected"], WAIT);
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("config={}", config.display())),
        "{line}"
    );
    assert!(
        line.contains("exports[2].peers[0]: unknown peer \"mesh-z\""),
        "{line}"
    );
    // Refused before anything was published: the last good catalog stands.
    assert_eq!(
        export_names(&get_json(a.admin, "/catalog").unwrap()),
        exports(&["ratings", "reviews"])
    );

    // Not YAML at all: refused with the line and column.
    let mark = p.mark();
    std::fs::write(&config, "exports: [\n  - name: {\n").unwrap();
    let line = p.wait_log_after(mark, &["config reload rejected"], WAIT);
    assert!(line.contains("line "), "{line}");
    assert_eq!(
        export_names(&get_json(a.admin, "/catalog").unwrap()),
        exports(&["ratings", "reviews"])
    );
    assert_eq!(http_get(a.admin, "/ready").map(|r| r.0), Ok(200));

    // The reloader lives on: the next good file applies.
    let mark = p.mark();
    with_export(&good, "details").replace(&config);
    wait_exports(&a, &["details", "ratings", "reviews"]);
    p.wait_log_after(mark, &["exports reloaded", "exports=3"], WAIT);
}

#[test]
fn a_change_outside_exports_is_warned_about_and_not_applied() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let a = mesh_a(&net, dir.path());
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);

    // Move the admin listener and add an export in one edit.
    let mut next = with_export(&a, "ratings");
    next.admin = net.port(10);
    let mark = p.mark();
    next.replace(&config);
    let warning = p.wait_log_after(mark, &["need a restart"], WAIT);
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("listeners.admin"), "{warning}");
    // The export applies; the listener stays where it was bound.
    wait_exports(&a, &["ratings", "reviews"]);
    assert!(!accepts(next.admin), "{} was bound by a reload", next.admin);

    // While the file still differs from the running config outside
    // `exports`, every reload says so again.
    let mark = p.mark();
    let mut still_moved = with_export(&next, "details");
    still_moved.exports.retain(|e| e.name != "ratings");
    still_moved.replace(&config);
    wait_exports(&a, &["details", "reviews"]);
    let again = p.wait_log_after(mark, &["need a restart"], WAIT);
    assert!(again.contains("listeners.admin"), "{again}");

    // Back to the running listeners: an exports-only change warns about
    // nothing.
    let mark = p.mark();
    let exports_only = with_export(&a, "ratings");
    exports_only.replace(&config);
    wait_exports(&a, &["ratings", "reviews"]);
    p.wait_log_after(mark, &["exports reloaded"], WAIT);
    assert!(
        !p.lines()[mark..]
            .iter()
            .any(|l| l.contains("need a restart")),
        "an exports-only change was reported as needing a restart"
    );
}
