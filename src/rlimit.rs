//! The machine's open-file limit, which sizes how many chargers the proxy can hold (two sockets
//! each). Shared by `proxy` (`proxy.max_connections = 0`) and `check` (the warning when the
//! configured number does not fit), so it lives below both.

/// The process's open-file limit, (soft, hard).
pub fn open_file_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some((limit.rlim_cur, limit.rlim_max))
}

/// Chargers that fit in `open_files`: two sockets each, a few files for everything else.
pub fn chargers_within(open_files: u64) -> u64 {
    (open_files.saturating_sub(64) / 2).max(1)
}
