//! CPU time of threads and process trees, read from `/proc` (schedstat, nanoseconds).

use std::fs;

/// On-CPU nanoseconds of one task (`/proc/<pid>/task/<tid>`), or of a process's whole
/// thread group when `tid` is `None`.
pub fn task_cpu_ns(pid: u32, tid: Option<u32>) -> u64 {
    match tid {
        Some(t) => read_schedstat(&format!("/proc/{pid}/task/{t}/schedstat")).unwrap_or(0),
        None => {
            let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
                return 0;
            };
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .map(|t| read_schedstat(&format!("/proc/{pid}/task/{t}/schedstat")).unwrap_or(0))
                .sum()
        }
    }
}

fn read_schedstat(path: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `pid` and all its live descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = parent_of(p) {
                parents.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// On-CPU nanoseconds of `pid` and its live descendants.
pub fn tree_cpu_ns(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| task_cpu_ns(p, None))
        .sum()
}

/// The calling thread's id.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_thread_uses_cpu() {
        let pid = std::process::id();
        let tid = gettid();
        let before = task_cpu_ns(pid, Some(tid));
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(task_cpu_ns(pid, Some(tid)) > before);
        assert!(process_tree(pid).contains(&pid));
        assert!(tree_cpu_ns(pid) >= task_cpu_ns(pid, Some(tid)));
    }
}
