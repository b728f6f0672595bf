//! Names the commit the binary was built from, for `elsinore --version` and
//! the `elsinore_build_info` metric. The commit comes from `ELSINORE_COMMIT`
//! when the builder sets it (a source tarball has no `.git`), else from
//! `git rev-parse`; with neither it is `unknown`, and the build goes on.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ELSINORE_COMMIT");
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let from_env = std::env::var("ELSINORE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty() && c.bytes().all(|b| b.is_ascii_graphic()));
    // Only this repository's git counts: a source tarball unpacked inside
    // some other repository must not take that repository's commit.
    let ours = dir.parent().and_then(|root| {
        let top = git(&dir, &["rev-parse", "--show-toplevel"])?;
        let same = std::fs::canonicalize(top).ok()? == std::fs::canonicalize(root).ok()?;
        same.then_some(())
    });
    let commit = match from_env {
        Some(c) => c,
        None if ours.is_none() => "unknown".to_owned(),
        None => {
            // Rebuild when HEAD moves: HEAD itself (checkout), the branch it
            // names (commit), and packed-refs (gc).
            for path in ["HEAD", "packed-refs"] {
                if let Some(p) =
                    git(&dir, &["rev-parse", "--git-path", path]).and_then(|p| absolute(&dir, &p))
                {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"])
                && let Some(p) = git(&dir, &["rev-parse", "--git-path", &branch])
                    .and_then(|p| absolute(&dir, &p))
            {
                println!("cargo:rerun-if-changed={p}");
            }
            git(&dir, &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=ELSINORE_COMMIT={commit}");
}

/// The path to watch, if it exists: cargo reruns a build script on every
/// build when a watched file is missing (a branch held only in packed-refs).
fn absolute(dir: &Path, path: &str) -> Option<String> {
    let p = Path::new(path);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    p.exists().then(|| p.display().to_string())
}
