//! Time from the routing CNAME appearing to the certificate being served by SNI, against a
//! real Pebble (`PEBBLE_VA_NOSLEEP=1`) and a DNS server changed at runtime (target <= 3 s).
//! Two ways: waiting for the scheduler (`check_interval = 1s`), and calling
//! `POST /v1/domains/{h}/check` right after the record appears.
//!
//! `cargo bench --bench onboarding` (needs Debian's `pebble`; only runs under `cargo bench`).
//! Reuses the integration-test harness, which starts every process on free ports.

#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../tests/it/harness.rs"]
mod harness;
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../tests/it/infra.rs"]
mod infra;

use std::time::{Duration, Instant};

async fn time_to_served(env: &infra::DomainEnv, host: &str, check_now: bool) -> Duration {
    let d = env.add_domain(host, "acme").await;
    env.set_ownership(&d).await;
    env.wait_state(host, "pending_routing", Duration::from_secs(30))
        .await;
    let start = Instant::now();
    env.set_routing(host).await;
    if check_now {
        env.check(host).await;
    }
    loop {
        if env.served(host).await.is_ok() {
            return start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!("{host} not served after 60 s\n{}", env.diag());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("onboarding bench: skipped (run with `cargo bench --bench onboarding`)");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let env = infra::DomainEnv::start().await;
        for (label, check_now) in [("scheduler (check_interval 1s)", false), ("POST .../check", true)] {
            let mut times = Vec::new();
            for i in 0..5 {
                let host = format!("links{i}-{}.onboard.test", check_now as u8);
                times.push(time_to_served(&env, &host, check_now).await);
            }
            times.sort();
            println!(
                "routing CNAME -> certificate served, {label}: median {:.2} s, min {:.2} s, max {:.2} s (target <= 3 s)",
                times[2].as_secs_f64(),
                times[0].as_secs_f64(),
                times[4].as_secs_f64()
            );
        }
    });
}
