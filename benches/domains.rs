//! Custom-domain scale: TLS handshakes/s with N certificates in the SNI map versus 1
//! (target >= 0.98x), memory per published domain, and start-up time with N stored domains
//! (target <= 5 s for 100,000). N = `LINKGATE_BENCH_DOMAINS` (default 100000).
//!
//! `cargo bench --bench domains` (only runs when invoked by `cargo bench`).

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use linkgate::config::Config;
use linkgate::metrics::Metrics;
use linkgate::store::{DomainRow, SqliteStore, Store};
use linkgate::tls::{certified_key_from_pem, CertStore, SniResolver};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Pki {
    ca_der: CertificateDer<'static>,
    chain_pem: String,
    key_pem: String,
}

/// A CA and a leaf for `*.bench.test` signed by it.
fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["*.bench.test".to_string()]).unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_der: ca.der().clone(),
        chain_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn handshake(client_cfg: &Arc<ClientConfig>, server_cfg: &Arc<ServerConfig>, name: &str) {
    let mut client = ClientConnection::new(
        client_cfg.clone(),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
    let mut buf = Vec::with_capacity(16 * 1024);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = Cursor::new(&buf[..]);
        while (rd.position() as usize) < buf.len() {
            server.read_tls(&mut rd).unwrap();
        }
        server.process_new_packets().unwrap();
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = Cursor::new(&buf[..]);
        while (rd.position() as usize) < buf.len() {
            client.read_tls(&mut rd).unwrap();
        }
        client.process_new_packets().unwrap();
    }
}

fn handshakes_per_sec(store: Arc<CertStore>, pki: &Pki, names: &[String], rounds: usize) -> f64 {
    let metrics = Arc::new(Metrics::new());
    let server_cfg = Arc::new(
        ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver::new(store, metrics))),
    );
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    // Full handshakes every time: with one name a resuming client would be unfairly fast.
    let mut client_cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let client_cfg = Arc::new(client_cfg);
    for name in names.iter().take(50) {
        handshake(&client_cfg, &server_cfg, name);
    }
    let start = Instant::now();
    for i in 0..rounds {
        let name = &names[(i * 7919) % names.len()];
        handshake(&client_cfg, &server_cfg, name);
    }
    rounds as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("domains bench: skipped (run with `cargo bench --bench domains`)");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::var("LINKGATE_BENCH_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pki = pki();
    let names: Vec<String> = (0..n).map(|i| format!("d{i}.bench.test")).collect();

    // 1. Memory per published domain: each name gets its own parsed certificate.
    let before = rss_bytes();
    let big = Arc::new(CertStore::default());
    for name in &names {
        let loaded =
            certified_key_from_pem(pki.chain_pem.as_bytes(), pki.key_pem.as_bytes()).unwrap();
        big.insert(name, Arc::new(loaded)).unwrap();
    }
    let per_domain = (rss_bytes().saturating_sub(before)) as f64 / n as f64;

    // 2. Handshakes/s: N names in the map versus 1.
    let one = Arc::new(CertStore::default());
    let loaded = certified_key_from_pem(pki.chain_pem.as_bytes(), pki.key_pem.as_bytes()).unwrap();
    one.insert(&names[0], Arc::new(loaded)).unwrap();
    // Alternate the two cases so machine noise hits both alike; keep each one's best run.
    let rounds = 2000;
    let shared = Arc::new(CertStore::default());
    for name in &names {
        shared.insert(name, one.get(&names[0]).unwrap()).unwrap();
    }
    let (mut hs_one, mut hs_big, mut hs_shared) = (0f64, 0f64, 0f64);
    for _ in 0..3 {
        hs_one = hs_one.max(handshakes_per_sec(one.clone(), &pki, &names[..1], rounds));
        hs_big = hs_big.max(handshakes_per_sec(big.clone(), &pki, &names, rounds));
        hs_shared = hs_shared.max(handshakes_per_sec(shared.clone(), &pki, &names, rounds));
    }
    eprintln!("(N names sharing one certificate object: {hs_shared:.0}/s)");
    drop(big);

    // 3. Start-up with N stored domains: open the store, load and publish every certificate.
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    std::fs::write(dir.path().join("session.key"), [7u8; 32]).unwrap();
    let config_text = format!(
        r#"
[server]
state_dir = "{dir}"
[session]
secret_file = "{dir}/session.key"
[acme]
enabled = true
directory = "https://127.0.0.1:1/dir"
[dns]
nameservers = ["127.0.0.1:1"]
edge_target = "edge.bench.test"
verify_zone = "verify.bench.test"
[[tenants]]
id = "bench"
upstream = ["127.0.0.1:1"]
  [[tenants.keys]]
  kid = "k"
  alg = "HS256"
  secret = "0123456789abcdef0123456789abcdef"
"#,
        dir = dir.path().display()
    );
    let config = Config::parse(&config_text, std::path::Path::new("bench.toml")).unwrap();
    let linkgate::config::StoreUrl::Sqlite(db) = config.store.clone();
    let fill_start = Instant::now();
    rt.block_on(async {
        let store = SqliteStore::open(&db).unwrap();
        for name in &names {
            let row = DomainRow {
                hostname: name.clone(),
                tenant: "bench".into(),
                token: "t".into(),
                state: "active".into(),
                records: "[]".into(),
                last_checked_at: Some(0),
                last_error: None,
                cert_pem: Some(pki.chain_pem.clone()),
                key_pem: Some(pki.key_pem.clone()),
                not_before: Some(0),
                not_after: Some(i64::MAX / 2),
                issuer: Some("bench".into()),
                failures: 0,
                routing_misses: 0,
                next_check_at: i64::MAX / 2,
                renew_after: None,
                created_at: 0,
                version: 0,
            };
            store.insert_domain(&row).await.unwrap();
        }
    });
    let fill = fill_start.elapsed();
    let start = Instant::now();
    let served = rt.block_on(async {
        let gw = linkgate::server::build_gateway(config.clone(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let dm = linkgate::domains::DomainManager::new(gw.clone(), &config).unwrap();
        dm.load().await.unwrap()
    });
    let startup = start.elapsed();

    println!("custom domains at scale (N = {n}):");
    println!("  TLS handshakes/s, 1 cert in map:  {hs_one:>10.0}");
    println!(
        "  TLS handshakes/s, N certs in map: {hs_big:>10.0}   ratio {:.3} (target >= 0.98)",
        hs_big / hs_one
    );
    println!(
        "  memory per published domain:      {:>10.0} bytes",
        per_domain
    );
    println!(
        "  start-up with N stored domains:   {:>10.2} s   ({served} certificates published; target <= 5 s; filling the store took {:.1} s)",
        startup.as_secs_f64(),
        fill.as_secs_f64()
    );
    let _ = Duration::ZERO;
}
