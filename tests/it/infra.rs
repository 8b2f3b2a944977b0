//! ACME/DNS test infrastructure for the custom-domain tests (SPEC section 5): a real ACME CA
//! (Debian's `pebble`) and a DNS server whose records change at runtime
//! (`pebble-challtestsrv`), each started by the test on free 127.0.0.1 ports with its own
//! temp dir and killed in `Drop`. Nothing is read from outside the repository at runtime:
//! pebble's config JSON and the certificate of its HTTPS listener are generated here.

use std::fs;
use std::io::BufReader;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{free_port, plain_client, q, Gateway, GatewayCfg, Prepared, TenantCfg};

/// What customer hostnames CNAME to (`[dns] edge_target`).
pub const EDGE_TARGET: &str = "edge.gateway.test";
/// Where ownership CNAMEs point into (`[dns] verify_zone`).
pub const VERIFY_ZONE: &str = "verify.gateway.test";
/// The substring the gateway logs each time it creates an ACME account.
pub const ACCOUNT_CREATED_LOG: &str = "ACME account created";

/// A port free for both TCP and UDP on 127.0.0.1 (the DNS server binds both).
pub fn free_port_udp_tcp() -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
            return p;
        }
    }
    panic!("no port free for both TCP and UDP");
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

fn spawn_logged(cmd: &mut Command, log_path: &PathBuf) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("spawn {cmd:?}: {e} (is the Debian package `pebble` installed?)")
        })
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// DNS: pebble-challtestsrv
// ---------------------------------------------------------------------------------------

/// A `pebble-challtestsrv` used only as a runtime-mutable DNS server (its own challenge
/// responders disabled, no default A/AAAA answers). Names are matched case-sensitively by
/// the server, so every helper lower-cases them.
pub struct Dns {
    child: Option<Child>,
    /// UDP + TCP DNS port.
    pub port: u16,
    /// HTTP management API port.
    pub mgmt_port: u16,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Dns {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Dns {
    pub async fn start() -> Dns {
        let dir = tempdir("linkgate-it-dns-");
        let port = free_port_udp_tcp();
        let mgmt_port = free_port();
        let log_path = dir.path().join("challtestsrv.log");
        let child = spawn_logged(
            Command::new("pebble-challtestsrv")
                .arg("-dns01")
                .arg(format!("127.0.0.1:{port}"))
                .arg("-management")
                .arg(format!("127.0.0.1:{mgmt_port}"))
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv4", "", "-defaultIPv6", ""])
                .current_dir(dir.path()),
            &log_path,
        );
        let mut dns = Dns {
            child: Some(child),
            port,
            mgmt_port,
            log_path,
            _dir: dir,
        };
        dns.wait_ready().await;
        dns
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("pebble-challtestsrv exited ({st}); log:\n{}", self.log());
            }
            let mgmt_ok = self
                .try_post("clear-a", &json!({"host": "ready.infra.test"}))
                .await
                .is_ok();
            let port = self.port;
            let dns_ok = tokio::task::spawn_blocking(move || {
                dns_query(port, "ready.infra.test", RR_A).is_ok()
            })
            .await
            .unwrap();
            if mgmt_ok && dns_ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "pebble-challtestsrv not ready after 15 s; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `127.0.0.1:<port>` as written in `[dns] nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn try_post(&self, path: &str, body: &Value) -> Result<(), String> {
        let r = plain_client()
            .post(format!("http://127.0.0.1:{}/{path}", self.mgmt_port))
            .timeout(Duration::from_secs(5))
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("{path}: {}", r.status()))
        }
    }

    async fn post(&self, path: &str, body: Value) {
        self.try_post(path, &body)
            .await
            .unwrap_or_else(|e| panic!("challtestsrv {path} {body}: {e}"));
    }

    /// Sets (replaces) the CNAME of `host`.
    pub async fn set_cname(&self, host: &str, target: &str) {
        let host = host.to_ascii_lowercase();
        let target = target.to_ascii_lowercase();
        self.post("set-cname", json!({"host": host, "target": target}))
            .await;
    }

    /// Sets the CNAME of `host` (lower-cased) to `target` exactly as given (any case).
    pub async fn set_cname_verbatim(&self, host: &str, target: &str) {
        let host = host.to_ascii_lowercase();
        self.post("set-cname", json!({"host": host, "target": target}))
            .await;
    }

    pub async fn clear_cname(&self, host: &str) {
        self.post("clear-cname", json!({"host": host.to_ascii_lowercase()}))
            .await;
    }

    /// Replaces the A records of `host`.
    pub async fn set_a(&self, host: &str, addrs: &[&str]) {
        let host = host.to_ascii_lowercase();
        self.post("clear-a", json!({"host": host})).await;
        self.post("add-a", json!({"host": host, "addresses": addrs}))
            .await;
    }

    pub async fn clear_a(&self, host: &str) {
        self.post("clear-a", json!({"host": host.to_ascii_lowercase()}))
            .await;
    }

    /// Queries this server (UDP) and returns the answer section.
    pub async fn query(&self, name: &str, qtype: u16) -> Vec<DnsAnswer> {
        let port = self.port;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || dns_query(port, &name, qtype))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("DNS query: {e}"))
    }
}

pub const RR_A: u16 = 1;
pub const RR_CNAME: u16 = 5;

#[derive(Debug, Clone, PartialEq)]
pub enum DnsAnswer {
    A(Ipv4Addr),
    Cname(String),
    Other(u16),
}

/// A minimal hand-made DNS client: one UDP question, the answer section parsed (names with
/// compression pointers; A and CNAME data decoded).
pub fn dns_query(port: u16, name: &str, qtype: u16) -> Result<Vec<DnsAnswer>, String> {
    let id: u16 = rand_id();
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    sock.send_to(&q, (Ipv4Addr::LOCALHOST, port))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
    let m = &buf[..n];
    if m.len() < 12 || m[..2] != id.to_be_bytes() {
        return Err("bad DNS answer header".into());
    }
    let rcode = m[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let qd = u16::from_be_bytes([m[4], m[5]]) as usize;
    let an = u16::from_be_bytes([m[6], m[7]]) as usize;
    let mut pos = 12;
    for _ in 0..qd {
        pos = read_name(m, pos)?.1 + 4;
    }
    let mut out = vec![];
    for _ in 0..an {
        let (_, p) = read_name(m, pos)?;
        if p + 10 > m.len() {
            return Err("truncated RR".into());
        }
        let ty = u16::from_be_bytes([m[p], m[p + 1]]);
        let rdlen = u16::from_be_bytes([m[p + 8], m[p + 9]]) as usize;
        let rd = p + 10;
        if rd + rdlen > m.len() {
            return Err("truncated rdata".into());
        }
        out.push(match ty {
            RR_A if rdlen == 4 => {
                DnsAnswer::A(Ipv4Addr::new(m[rd], m[rd + 1], m[rd + 2], m[rd + 3]))
            }
            RR_CNAME => DnsAnswer::Cname(read_name(m, rd)?.0),
            other => DnsAnswer::Other(other),
        });
        pos = rd + rdlen;
    }
    Ok(out)
}

fn rand_id() -> u16 {
    use std::time::{SystemTime, UNIX_EPOCH};
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 65_521) as u16
}

/// Reads a (possibly compressed) name at `pos`; returns it (lower-case, no trailing dot)
/// and the position after it in the original stream.
fn read_name(m: &[u8], mut pos: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<String> = vec![];
    let mut end = None;
    for _ in 0..128 {
        let len = *m.get(pos).ok_or("name out of bounds")? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr =
                ((len & 0x3f) << 8) | *m.get(pos + 1).ok_or("pointer out of bounds")? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        if len == 0 {
            let end = end.unwrap_or(pos + 1);
            return Ok((labels.join(".").to_ascii_lowercase(), end));
        }
        let label = m.get(pos + 1..pos + 1 + len).ok_or("label out of bounds")?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += 1 + len;
    }
    Err("name loop".into())
}

// ---------------------------------------------------------------------------------------
// ACME: pebble
// ---------------------------------------------------------------------------------------

/// The PKI of pebble's own HTTPS listener (the ACME API, not the issuing CA).
pub struct ApiPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn make_api_pki() -> ApiPki {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        KeyUsagePurpose,
    };
    let (ca, ca_key) = crate::harness::test_ca("linkgate it pebble API CA");

    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    ApiPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A pebble ACME CA. Created with its ports and listener PKI fixed (so the gateway config
/// can name them), then started with the port its VA uses for HTTP-01 (the gateway's
/// `http_listen` port). `stop`/`start_again` keep the ports and the listener PKI; pebble
/// itself makes a new issuing root and forgets every account at each start.
pub struct Pebble {
    child: Option<Child>,
    pub port: u16,
    pub mgmt_port: u16,
    pub tls_port: u16,
    pub http_port: u16,
    pub dns_port: u16,
    pub pki: ApiPki,
    /// File holding `pki.ca_pem` (for `[acme] ca_file`).
    pub ca_file: PathBuf,
    /// PEM of the issuing root of the current run (`/roots/0`).
    pub root_pem: String,
    pub log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Pebble {
    /// Picks ports and writes the listener PKI; nothing runs yet.
    pub fn new(dns_port: u16) -> Pebble {
        let dir = tempdir("linkgate-it-pebble-");
        let pki = make_api_pki();
        let ca_file = dir.path().join("api-ca.pem");
        fs::write(&ca_file, &pki.ca_pem).unwrap();
        fs::write(dir.path().join("api-cert.pem"), &pki.cert_pem).unwrap();
        fs::write(dir.path().join("api-key.pem"), &pki.key_pem).unwrap();
        Pebble {
            child: None,
            port: free_port(),
            mgmt_port: free_port(),
            tls_port: free_port(),
            http_port: 0,
            dns_port,
            pki,
            ca_file,
            root_pem: String::new(),
            log_path: dir.path().join("pebble.log"),
            dir,
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Starts pebble; its VA validates HTTP-01 on `http_port`.
    pub async fn start(&mut self, http_port: u16) {
        assert!(self.child.is_none(), "pebble already running");
        self.http_port = http_port;
        let d = self.dir.path();
        let config = json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{}", self.mgmt_port),
                "certificate": d.join("api-cert.pem"),
                "privateKey": d.join("api-key.pem"),
                "httpPort": http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = d.join("pebble-config.json");
        fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let child = spawn_logged(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .arg("-dnsserver")
                .arg(format!("127.0.0.1:{}", self.dns_port))
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .current_dir(d),
            &self.log_path,
        );
        self.child = Some(child);
        self.wait_ready().await;
        self.root_pem = self.fetch_root().await;
    }

    /// Stops pebble (SIGKILL); the ports stay reserved for `start_again`.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Freezes pebble (SIGSTOP): requests to it hang, unanswered, until [`Pebble::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused pebble run again (SIGCONT); held requests are answered.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("pebble running").id();
        let st = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }

    /// Starts pebble again on the same ports (new issuing root, no accounts).
    pub async fn start_again(&mut self) {
        let http_port = self.http_port;
        self.start(http_port).await;
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A client that trusts only the CA of pebble's HTTPS listener.
    pub fn api_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).unwrap(),
            )
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    async fn wait_ready(&mut self) {
        let client = self.api_client();
        let url = self.directory_url();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("pebble exited ({st}); log:\n{}", self.log());
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("pebble not ready after 20 s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn fetch_root(&self) -> String {
        let r = self
            .api_client()
            .get(format!("https://127.0.0.1:{}/roots/0", self.mgmt_port))
            .send()
            .await
            .expect("pebble /roots/0");
        assert_eq!(r.status(), 200, "pebble /roots/0");
        let pem = r.text().await.unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"), "root: {pem}");
        pem
    }

    /// DER of the current issuing root.
    pub fn root_der(&self) -> Vec<u8> {
        pem_certs(&self.root_pem).remove(0)
    }
}

pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut BufReader::new(pem.as_bytes()))
        .map(|c| c.unwrap().to_vec())
        .collect()
}

// ---------------------------------------------------------------------------------------
// TLS probes against a trust root other than the harness's test CA
// ---------------------------------------------------------------------------------------

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Handshakes with `127.0.0.1:port` using SNI `host`, verifying the server's chain against
/// `root_der` only; returns the DER chain the server sent (leaf first).
pub fn served_chain_blocking(
    port: u16,
    host: &str,
    root_der: &[u8],
) -> Result<Vec<Vec<u8>>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root_der.to_vec()))
        .map_err(|e| e.to_string())?;
    let cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

pub async fn served_chain(port: u16, host: &str, root_der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let host = host.to_string();
    let root = root_der.to_vec();
    tokio::task::spawn_blocking(move || served_chain_blocking(port, &host, &root))
        .await
        .unwrap()
}

/// The serial number of a DER certificate, as hex.
pub fn cert_serial(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    c.tbs_certificate.raw_serial_as_string()
}

/// DNS names in the certificate's subjectAltName.
pub fn cert_dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    let mut out = vec![];
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push(d.to_string());
            }
        }
    }
    out
}

/// (not_before, not_after) of a DER certificate, Unix seconds.
pub fn cert_validity(der: &[u8]) -> (i64, i64) {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    (
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    )
}

// ---------------------------------------------------------------------------------------
// A gateway wired to its own pebble and DNS server
// ---------------------------------------------------------------------------------------

pub struct DomainOpts {
    pub renew_before: String,
    pub orders_per_minute: u32,
    /// Tenant ids (each a default [`TenantCfg`]).
    pub tenants: Vec<&'static str>,
    /// Raw TOML appended to the config (e.g. more `[[domains]]`).
    pub extra_toml: String,
    /// A second node (ACME off) sharing the gateway's store: pebble's HTTP-01 requests go to
    /// it, not to the node that orders.
    pub challenges_via_peer: bool,
}

impl Default for DomainOpts {
    fn default() -> Self {
        DomainOpts {
            renew_before: "30d".into(),
            orders_per_minute: 10,
            tenants: vec!["acme"],
            extra_toml: String::new(),
            challenges_via_peer: false,
        }
    }
}

/// A gateway (tenant `acme` unless `opts` say otherwise, static host `links.acme.test`) with `[acme]` pointing at its own
/// pebble and `[dns]` at its own DNS server, where `edge.gateway.test A 127.0.0.1` is set.
/// Fields drop in order: gateway, pebble, DNS.
pub struct DomainEnv {
    pub gw: Gateway,
    /// The second node of `DomainOpts::challenges_via_peer`.
    pub peer: Option<Gateway>,
    pub pebble: Pebble,
    pub dns: Dns,
}

impl DomainEnv {
    pub async fn start() -> DomainEnv {
        Self::start_with(DomainOpts::default()).await
    }

    pub async fn start_with(opts: DomainOpts) -> DomainEnv {
        let dns = Dns::start().await;
        dns.set_a(EDGE_TARGET, &["127.0.0.1"]).await;
        let mut pebble = Pebble::new(dns.port);
        let mut cfg =
            GatewayCfg::with_tenants(opts.tenants.iter().map(|t| TenantCfg::new(t)).collect());
        cfg.tail = format!(
            "[acme]\nenabled = true\ndirectory = {}\nca_file = {}\nrenew_before = {}\norders_per_minute = {}\n\n\
             [dns]\nnameservers = [{}]\nedge_target = {}\nverify_zone = {}\ncheck_interval = \"1s\"\n",
            q(&pebble.directory_url()),
            q(pebble.ca_file.to_str().unwrap()),
            q(&opts.renew_before),
            opts.orders_per_minute,
            q(&dns.addr()),
            q(EDGE_TARGET),
            q(VERIFY_ZONE),
        );
        cfg.tail += &opts.extra_toml;
        let p = Prepared::new(cfg);
        let peer = opts.challenges_via_peer.then(|| {
            let peer = Prepared::new(GatewayCfg::with_tenants(
                opts.tenants.iter().map(|t| TenantCfg::new(t)).collect(),
            ));
            // The same SQLite file as the first node.
            let db = p.path("state").join("linkgate.db");
            let text = fs::read_to_string(&peer.config_path).unwrap().replace(
                "url = \"sqlite://linkgate.db\"",
                &format!("url = {}", q(&format!("sqlite://{}", db.display()))),
            );
            fs::write(&peer.config_path, text).unwrap();
            peer
        });
        pebble
            .start(peer.as_ref().map_or(p.http_port, |peer| peer.http_port))
            .await;
        let gw = Gateway::start_prepared(p).await;
        let peer = match peer {
            Some(peer) => Some(Gateway::start_prepared(peer).await),
            None => None,
        };
        DomainEnv {
            gw,
            peer,
            pebble,
            dns,
        }
    }

    /// Logs of the three processes (tails), for assertion messages.
    pub fn diag(&self) -> String {
        format!(
            "--- gateway log (tail) ---\n{}\n--- pebble log (tail) ---\n{}\n--- dns log (tail) ---\n{}",
            tail(&self.gw.log(), 60),
            tail(&self.pebble.log(), 30),
            tail(&self.dns.log(), 10)
        )
    }

    /// `POST /v1/domains`, asserting 201; returns the domain object.
    pub async fn add_domain(&self, hostname: &str, tenant: &str) -> Value {
        let r = self
            .gw
            .admin_post(
                "/v1/domains",
                &json!({"hostname": hostname, "tenant": tenant}),
            )
            .await;
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(st, 201, "POST /v1/domains {hostname}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }

    pub async fn get_domain(&self, hostname: &str) -> Value {
        self.admin_get(&format!("/v1/domains/{hostname}")).await
    }

    /// `GET /v1/domains`, asserting 200.
    pub async fn list_domains(&self) -> Value {
        self.admin_get("/v1/domains").await
    }

    /// `GET path` on the admin listener, asserting 200 and a JSON body.
    async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .gw
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(st, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }

    /// `POST /v1/domains/{h}/check`, asserting 200; returns the object after the check.
    pub async fn check(&self, hostname: &str) -> Value {
        let r = self
            .gw
            .admin(
                reqwest::Method::POST,
                &format!("/v1/domains/{hostname}/check"),
            )
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(st, 200, "POST /v1/domains/{hostname}/check: {text}");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }

    /// Polls `GET /v1/domains/{h}` every 250 ms until `pred` holds; panics with the last object
    /// and the logs after `timeout`.
    pub async fn wait_for(
        &self,
        hostname: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen_states: Vec<String> = vec![];
        loop {
            let d = self.get_domain(hostname).await;
            let st = d["state"].as_str().unwrap_or("?").to_string();
            if seen_states.last() != Some(&st) {
                seen_states.push(st);
            }
            if pred(&d) {
                return d;
            }
            if Instant::now() > deadline {
                panic!(
                    "{hostname}: not {what} after {timeout:?}; states seen {seen_states:?}; last object:\n{}\n{}",
                    serde_json::to_string_pretty(&d).unwrap(),
                    self.diag()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits (up to 10 s) until `GET /v1/domains/{hostname}` answers `status`.
    pub async fn wait_status(&self, hostname: &str, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .gw
                .admin(reqwest::Method::GET, &format!("/v1/domains/{hostname}"))
                .send()
                .await
                .unwrap();
            if r.status() == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "GET /v1/domains/{hostname}: {} after 10 s, not {status}\n{}",
                r.status(),
                self.diag()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_state(&self, hostname: &str, state: &str, timeout: Duration) -> Value {
        self.wait_for(hostname, state, timeout, |d| d["state"] == state)
            .await
    }

    /// Sets the ownership CNAME to the value the gateway asked for in `domain`.
    pub async fn set_ownership(&self, domain: &Value) {
        let rec = &domain["records"][0];
        self.dns
            .set_cname(
                rec["name"].as_str().unwrap(),
                rec["value"].as_str().unwrap(),
            )
            .await;
    }

    /// Sets the routing CNAME `<hostname> CNAME edge.gateway.test`.
    pub async fn set_routing(&self, hostname: &str) {
        self.dns.set_cname(hostname, EDGE_TARGET).await;
    }

    /// Adds a domain and drives it to `active` (both CNAMEs set); returns the object.
    pub async fn activate(&self, hostname: &str) -> Value {
        let d = self.add_domain(hostname, "acme").await;
        self.set_ownership(&d).await;
        self.set_routing(hostname).await;
        self.wait_state(hostname, "active", Duration::from_secs(60))
            .await
    }

    /// The chain served for `hostname`, verified against the current pebble root only.
    pub async fn served(&self, hostname: &str) -> Result<Vec<Vec<u8>>, String> {
        served_chain(self.gw.https_port, hostname, &self.pebble.root_der()).await
    }

    /// An HTTPS client that resolves `hostname` to 127.0.0.1 and trusts only pebble's root.
    pub fn client_for(&self, hostname: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pebble.root_pem.as_bytes()).unwrap(),
            )
            .resolve(hostname, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap()
    }

    pub fn account_creations(&self) -> usize {
        self.gw.log().matches(ACCOUNT_CREATED_LOG).count()
    }
}
