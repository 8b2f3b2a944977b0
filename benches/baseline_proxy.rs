//! Baseline for `benches/load.sh`: the smallest pingora 0.9 + rustls HTTPS proxy
//! that does the same transport job as linkgate (TLS termination, HTTP/1.1 + h2 via
//! ALPN, keep-alive, forwarding to one upstream) but no authentication at all. It runs
//! pingora as linkgate does: the same worker-thread count, no downstream modules.
//! linkgate's requests/s through the same setup should stay >= 0.95x of this.
//!
//! It is a `harness = false` bench target, so `cargo bench` and
//! `cargo test --all-targets` run its `main`. Without configuration it prints a
//! hint and exits 0 at once, so neither command ever blocks on it.
//!
//! Configuration, from the environment or from argv:
//!
//! ```text
//! baseline_proxy serve LISTEN CERT KEY UPSTREAM [THREADS]
//! BASELINE_LISTEN=127.0.0.1:8443 BASELINE_CERT=c.pem BASELINE_KEY=k.pem \
//!   BASELINE_UPSTREAM=127.0.0.1:8080 [BASELINE_THREADS=1] baseline_proxy
//! ```
//!
//! The process runs until SIGINT/SIGTERM (pingora's signal handling).

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;

/// The same allocator as linkgate's binary, so the comparison is of the proxies' work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Baseline {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Baseline {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// The same framework setting as linkgate: no downstream modules (pingora's default is a
    /// disabled response-compression module, built and called on every request).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

struct Args {
    listen: String,
    cert: String,
    key: String,
    upstream: String,
    threads: usize,
}

fn args() -> Option<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("serve") {
        if argv.len() < 5 {
            return None;
        }
        return Some(Args {
            listen: argv[1].clone(),
            cert: argv[2].clone(),
            key: argv[3].clone(),
            upstream: argv[4].clone(),
            threads: argv.get(5).and_then(|t| t.parse().ok()).unwrap_or(1),
        });
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Some(Args {
        listen: var("BASELINE_LISTEN")?,
        cert: var("BASELINE_CERT")?,
        key: var("BASELINE_KEY")?,
        upstream: var("BASELINE_UPSTREAM")?,
        threads: var("BASELINE_THREADS")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1),
    })
}

fn main() {
    // `cargo bench` passes `--bench`, `cargo test --all-targets` passes nothing (or
    // test-harness flags): with no configuration, there is nothing to measure here.
    let Some(args) = args() else {
        println!(
            "baseline_proxy: not configured, nothing to do. This is the reference proxy \
             for benches/load.sh; run it as\n  baseline_proxy serve LISTEN CERT KEY UPSTREAM \
             [THREADS]\nor with BASELINE_LISTEN, BASELINE_CERT, BASELINE_KEY, \
             BASELINE_UPSTREAM [, BASELINE_THREADS] set."
        );
        return;
    };

    let mut conf = ServerConf::new().expect("default pingora configuration");
    conf.threads = args.threads.max(1);
    // Keep several instances (and linkgate) from sharing /tmp/pingora.* files.
    let tag = std::process::id();
    conf.pid_file = std::env::temp_dir()
        .join(format!("baseline_proxy.{tag}.pid"))
        .display()
        .to_string();
    conf.upgrade_sock = std::env::temp_dir()
        .join(format!("baseline_proxy.{tag}.sock"))
        .display()
        .to_string();

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(
        &server.configuration,
        Baseline {
            upstream: args
                .upstream
                .parse()
                .expect("upstream must be an IP:port address"),
        },
    );
    let mut tls = TlsSettings::intermediate(&args.cert, &args.key).expect("TLS settings");
    tls.enable_h2();
    proxy.add_tls_with_settings(&args.listen, None, tls);
    server.add_service(proxy);

    eprintln!(
        "baseline_proxy: listening on https://{} with {} thread(s)",
        args.listen, server.configuration.threads
    );
    server.run_forever();
}
