//! How many listening sockets egress may hold for imports, so that a large
//! catalog never takes the last file descriptor: the admin endpoint, the
//! federation streams, DNS and the data connections themselves need some.
//! The budget is `proxy.vipListenerBudget` when set, else derived from the
//! process's soft open-file limit (read from `/proc/self/limits`, which
//! needs no unsafe code) minus a reserve.

use std::path::Path;

/// Descriptors kept out of the budget: a quarter of the limit, at least
/// [`MIN_RESERVE`] and at most [`MAX_RESERVE`].
pub const MIN_RESERVE: u64 = 256;
pub const MAX_RESERVE: u64 = 4096;

/// The budget and where it came from (for the log and `/catalog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub listeners: usize,
    pub source: String,
}

/// The budget for this process: `configured` if given, else derived from
/// the soft open-file limit. Without a readable limit (not Linux), no cap.
pub fn listener_budget(configured: Option<usize>) -> Budget {
    if let Some(n) = configured {
        return Budget {
            listeners: n,
            source: "proxy.vipListenerBudget".to_owned(),
        };
    }
    match soft_nofile(Path::new("/proc/self/limits")) {
        Some(limit) => Budget {
            listeners: derive(limit),
            source: format!(
                "open-file limit {limit} minus a reserve of {}",
                reserve(limit)
            ),
        },
        None => Budget {
            listeners: usize::MAX,
            source: "no open-file limit known".to_owned(),
        },
    }
}

fn reserve(limit: u64) -> u64 {
    (limit / 4).clamp(MIN_RESERVE, MAX_RESERVE)
}

/// The listeners a soft limit of `limit` descriptors allows.
pub fn derive(limit: u64) -> usize {
    usize::try_from(limit.saturating_sub(reserve(limit))).unwrap_or(usize::MAX)
}

/// The soft "Max open files" of a `/proc/<pid>/limits` file; `None` when
/// unreadable or "unlimited".
pub fn soft_nofile(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_soft_nofile(&text)
}

fn parse_soft_nofile(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_soft_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            20000                524288               files     \n";
        assert_eq!(parse_soft_nofile(text), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_soft_nofile(unlimited), None);
        assert_eq!(parse_soft_nofile("garbage"), None);
        // This process has one on Linux.
        assert!(soft_nofile(Path::new("/proc/self/limits")).is_some());
    }

    #[test]
    fn leaves_a_reserve() {
        assert_eq!(derive(1024), 768);
        assert_eq!(derive(20_000), 15_904);
        assert_eq!(derive(1_048_576), 1_048_576 - 4096);
        assert_eq!(derive(100), 0);
        assert_eq!(listener_budget(Some(7)).listeners, 7);
    }
}
