//! The workspace's test harness: starting the workspace's binaries as the tests run them
//! (behind the qemu-user runner under emulation) and waiting for a condition.
//!
//! Tests only: no product crate depends on it but as a dev-dependency.

use std::time::{Duration, Instant};

/// A command that runs `program`, one of this workspace's binaries, as the tests run:
/// behind `WRAITHGATE_TARGET_RUNNER` (split on whitespace) when that is set. Under
/// qemu-user (`tools/cross-aarch64`) the kernel cannot exec an aarch64 binary by itself
/// without binfmt_misc, so the runner runs it; the child is then qemu, and signals sent to
/// it reach the program.
pub fn workspace_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = std::env::var("WRAITHGATE_TARGET_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut c = std::process::Command::new(first);
            c.args(words).arg(program);
            c
        }
        None => std::process::Command::new(program),
    }
}

/// Calls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_first_value_or_none_after_the_timeout() {
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        assert_eq!(wait_for(Duration::from_millis(10), || None::<()>), None);
    }

    #[test]
    fn workspace_command_runs_the_program_behind_the_runner() {
        // Only this test sets the variable in this process's test binary.
        std::env::set_var("WRAITHGATE_TARGET_RUNNER", "qemu-aarch64 -L /x");
        let c = workspace_command("/bin/prog");
        std::env::remove_var("WRAITHGATE_TARGET_RUNNER");
        assert_eq!(c.get_program(), "qemu-aarch64");
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(args, ["-L", "/x", "/bin/prog"]);
    }
}
