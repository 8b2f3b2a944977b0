//! A tenant's upstream servers: round robin over the healthy ones, with TCP health checks.
//!
//! Picking a server is on the hot path, so it is one atomic increment and a scan of a
//! small array of health flags: no lock, no allocation, no hashing. Health checks run in
//! rounds the housekeeping loop starts beside itself, and only flip those flags.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// Failed checks in a row that take a server out of rotation.
const FAILURES_TO_DOWN: u32 = 2;
/// Longest wait for a health check's TCP connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// One upstream server and what the health checks last found.
struct Server {
    addr: SocketAddr,
    healthy: AtomicBool,
    failures: AtomicU32,
}

/// The upstream servers of one tenant.
pub struct UpstreamPool {
    servers: Box<[Server]>,
    next: AtomicUsize,
}

impl UpstreamPool {
    /// A pool of `addrs`, every server healthy until a check says otherwise.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let servers = addrs
            .into_iter()
            .map(|addr| Server {
                addr,
                healthy: AtomicBool::new(true),
                failures: AtomicU32::new(0),
            })
            .collect();
        Self {
            servers,
            next: AtomicUsize::new(0),
        }
    }

    /// The next healthy server in turn; `None` when none is healthy.
    pub fn select(&self) -> Option<SocketAddr> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.servers[(start.wrapping_add(i)) % n])
            .find(|s| s.healthy.load(Ordering::Relaxed))
            .map(|s| s.addr)
    }

    /// Checks every server at once (a TCP connection within a second) and updates its
    /// health: out after [`FAILURES_TO_DOWN`] failures in a row, back after one success.
    pub async fn check_health(&self) {
        let checks = self.servers.iter().map(|s| async move {
            let ok = matches!(
                tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(s.addr)).await,
                Ok(Ok(_))
            );
            self.record(s, ok);
        });
        futures::future::join_all(checks).await;
    }

    /// Applies one health-check result to `s`, logging changes of state.
    fn record(&self, s: &Server, ok: bool) {
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            if !s.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = %s.addr, "upstream healthy again");
            }
        } else {
            let failures = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= FAILURES_TO_DOWN && s.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(upstream = %s.addr, failures, "upstream failed health checks; out of rotation");
            }
        }
    }

    /// Whether the server at `addr` is in rotation (for tests and diagnostics).
    pub fn is_healthy(&self, addr: SocketAddr) -> Option<bool> {
        self.servers
            .iter()
            .find(|s| s.addr == addr)
            .map(|s| s.healthy.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn round_robin_skips_unhealthy_servers() {
        let pool = UpstreamPool::new([addr(1), addr(2), addr(3)]);
        let picks: Vec<_> = (0..6).map(|_| pool.select().unwrap().port()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);

        let s2 = &pool.servers[1];
        pool.record(s2, false);
        assert_eq!(
            pool.is_healthy(addr(2)),
            Some(true),
            "one failure is not enough"
        );
        pool.record(s2, false);
        assert_eq!(pool.is_healthy(addr(2)), Some(false));
        let picks: Vec<_> = (0..4).map(|_| pool.select().unwrap().port()).collect();
        assert!(!picks.contains(&2), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&3), "{picks:?}");

        pool.record(s2, true);
        assert!((0..3).any(|_| pool.select() == Some(addr(2))));
    }

    #[test]
    fn no_server_when_none_is_healthy() {
        let pool = UpstreamPool::new([addr(1)]);
        pool.record(&pool.servers[0], false);
        pool.record(&pool.servers[0], false);
        assert_eq!(pool.select(), None);
        assert_eq!(UpstreamPool::new([]).select(), None);
    }

    #[tokio::test]
    async fn health_check_connects_over_tcp() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = UpstreamPool::new([live.local_addr().unwrap(), dead]);
        pool.check_health().await;
        pool.check_health().await;
        assert_eq!(pool.is_healthy(live.local_addr().unwrap()), Some(true));
        assert_eq!(pool.is_healthy(dead), Some(false));
    }
}
