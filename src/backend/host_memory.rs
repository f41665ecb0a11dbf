//! How much memory this process may still commit, for the host backend's capacity.
//!
//! The host backend zeroes every block it hands out, which commits its pages at once. In a
//! memory-limited container (`docker run --memory`, a Kubernetes pod's limit) the kernel does
//! not refuse such memory: it kills the process (SIGKILL, nothing said). A backend that knows
//! the limit refuses first, and the caller's out-of-memory path (an error naming the options
//! to change) runs instead. Read by hand from `/proc` and `/sys/fs/cgroup`: no maintained
//! crate reads cgroup limits without pulling in a process-inspection library.

use std::path::{Path, PathBuf};

/// The least of what `/proc/meminfo` says is available (`MemAvailable`) and what every memory
/// cgroup holding this process has left (cgroup v2 `memory.max` less `memory.current`, v1
/// `memory.limit_in_bytes` less `memory.usage_in_bytes`, each ancestor's included). `None`
/// when none of them could be read.
pub fn available() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    [
        mem_available(&meminfo),
        cgroup_room(&cgroups, Path::new("/sys/fs/cgroup")),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The room left in the memory cgroups of a `/proc/self/cgroup` text, mounted under `root`:
/// the least over the process's cgroup and its ancestors that have a limit.
fn cgroup_room(cgroups: &str, root: &Path) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in cgroups.lines() {
        // hierarchy-id:controllers:path
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let rooted = path.trim_start_matches('/');
        let room = if id == "0" && controllers.is_empty() {
            room_along(&root.join(rooted), root, "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            let v1 = root.join("memory");
            room_along(
                &v1.join(rooted),
                &v1,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            None
        };
        least = match (least, room) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    least
}

/// The least room (`limit` less `usage`) of `dir` and its ancestors up to `top`, over those
/// whose limit is a number (v2's "max" and v1's page-rounded `i64::MAX` mean none).
fn room_along(dir: &Path, top: &Path, limit: &str, usage: &str) -> Option<u64> {
    let mut least: Option<u64> = None;
    let mut at: PathBuf = dir.to_path_buf();
    loop {
        if let Some(room) = room_in(&at, limit, usage) {
            least = Some(least.map_or(room, |l| l.min(room)));
        }
        if at == top || !at.starts_with(top) || !at.pop() {
            return least;
        }
    }
}

/// `limit` less `usage` in the cgroup directory `dir`, when it has a limit. The usage counts
/// the page cache, whose inactive part the kernel reclaims before it kills anything in the
/// cgroup: that part is left out (`memory.stat`'s `inactive_file`, v1's hierarchical
/// `total_inactive_file` first), as the kubelet's working set does.
fn room_in(dir: &Path, limit: &str, usage: &str) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let limit: u64 = read(limit)?.trim().parse().ok()?;
    // v1 writes "no limit" as i64::MAX rounded down to a page.
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = read(usage).and_then(|u| u.trim().parse().ok()).unwrap_or(0);
    let stat = read("memory.stat").unwrap_or_default();
    let reclaimable = stat_value(&stat, "total_inactive_file")
        .or_else(|| stat_value(&stat, "inactive_file"))
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

/// The value of `key` in a `memory.stat` text (`key value` lines).
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    /// A v2 cgroup with a limit under an ancestor with a larger one, and one without a limit
    /// at the top: the least room counts; a v1 memory hierarchy beside it is read too.
    #[test]
    fn the_least_room_of_the_cgroup_and_its_ancestors_counts() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("pods/pod1");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(root.path().join("pods/memory.max"), "1000000\n").unwrap();
        std::fs::write(root.path().join("pods/memory.current"), "100000\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "600000\n").unwrap();
        std::fs::write(leaf.join("memory.current"), "200000\n").unwrap();
        assert_eq!(cgroup_room("0::/pods/pod1\n", root.path()), Some(400_000));
        // No limit anywhere.
        assert_eq!(cgroup_room("0::/\n", root.path()), None);

        let v1 = root.path().join("memory/job");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "300000\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "250000\n").unwrap();
        std::fs::write(
            root.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        let both = "4:memory:/job\n0::/pods/pod1\n";
        assert_eq!(cgroup_room(both, root.path()), Some(50_000));
        assert_eq!(cgroup_room("4:cpu,cpuacct:/job\n", root.path()), None);
    }

    /// cgroup v2 counts the page cache in `memory.current`; the kernel reclaims its inactive
    /// part before it kills anything in the cgroup, so that part is room the process may still
    /// commit. A container that has read files (a build, a model's weights) has room even when
    /// `memory.current` is close to `memory.max`.
    #[test]
    fn reclaimable_page_cache_of_a_v2_cgroup_counts_as_room() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("job");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(leaf.join("memory.max"), "1000000\n").unwrap();
        std::fs::write(leaf.join("memory.current"), "950000\n").unwrap();
        std::fs::write(
            leaf.join("memory.stat"),
            "anon 100000\nfile 850000\nactive_file 50000\ninactive_file 800000\n",
        )
        .unwrap();
        let room = cgroup_room("0::/job\n", root.path()).unwrap();
        assert!(
            room >= 1_000_000 - (950_000 - 800_000),
            "800000 bytes of inactive page cache are reclaimable, yet the room is {room}"
        );
    }

    /// cgroup v1's `memory.usage_in_bytes` includes the page cache, and sits at the limit once
    /// the cache has filled it: the cgroup still has room (its inactive cache), not none.
    #[test]
    fn a_v1_cgroup_whose_usage_is_at_its_limit_by_page_cache_still_has_room() {
        let root = tempfile::tempdir().unwrap();
        let v1 = root.path().join("memory/job");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "300000\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "300000\n").unwrap();
        std::fs::write(
            v1.join("memory.stat"),
            "cache 280000\nrss 20000\ninactive_file 250000\nactive_file 30000\n\
             total_cache 280000\ntotal_rss 20000\ntotal_inactive_file 250000\n\
             total_active_file 30000\n",
        )
        .unwrap();
        let room = cgroup_room("4:memory:/job\n", root.path()).unwrap_or(0);
        assert!(
            room >= 250_000,
            "250000 bytes of inactive page cache are reclaimable, yet the room is {room}"
        );
    }
}
