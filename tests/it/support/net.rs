//! Loopback ports and process limits.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// A loopback address that was free a moment ago (the OS picked it; we released it).
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener
        .local_addr()
        .expect("local_addr of an ephemeral listener")
}

/// A loopback address with nothing listening on it: connects are refused at once.
pub fn dead_addr() -> SocketAddr {
    free_addr()
}

/// Waits until `addr` accepts a TCP connection; `false` if it did not within `limit`.
pub async fn wait_until_accepting(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        );
        if let Ok(Ok(_stream)) = attempt.await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Raises this process's open-file soft limit to at least `wanted` (capped by the hard limit);
/// child processes inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}
