//! Test harness: starts the `linkgate` binary as a black box with a generated config,
//! test certificates and recording upstream servers, and offers clients and helpers
//! that speak the external contract of `/work/shared/SPEC.md`.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const ADMIN_TOKEN: &str = "it-admin-token-0123456789abcdef";
pub const COOKIE: &str = "__Host-linkgate";
/// `not_after` of every test certificate: 2099-01-01T00:00:00Z.
pub const CERT_NOT_AFTER: i64 = 4_070_908_800;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_linkgate")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A free port for the gateway's listeners, picked outside the kernel's ephemeral range
/// (32768-60999 by default) so that nothing binding port 0 (our upstreams, other test
/// processes) can take it between this check and the gateway's bind; within this
/// process, every call gets a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (seed % SPAN + n) % SPAN) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// A plain-HTTP client (admin listener), ignoring proxy settings.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A TOML basic string (JSON escaping is valid TOML for these values).
pub fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub fn default_secret(tenant: &str) -> Vec<u8> {
    format!("{tenant}-hs256-secret-0123456789abcdefghijklmnop").into_bytes()
}

// ---------------------------------------------------------------------------------------
// JWT helpers
// ---------------------------------------------------------------------------------------

/// Standard claims for a valid link: `sub`, `iat` 5 s ago, `exp` in 10 minutes.
pub fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iat": now() - 5, "exp": now() + 600, "jti": unique_id("jti") })
}

pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{t:x}-{n}-{}", std::process::id())
}

pub fn sign_hs(secret: &[u8], alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// Builds a compact JWS by hand from a header, a payload and a raw signature segment.
pub fn craft(header: &Value, payload: &Value, sig_segment: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        sig_segment
    )
}

/// Builds a JWS by hand (any header and payload bytes) and signs it with HMAC-SHA256.
pub fn craft_hs256(secret: &[u8], header: &[u8], payload: &[u8]) -> String {
    use hmac_sha256::hmac;
    let signing_input = format!("{}.{}", b64(header), b64(payload));
    let mac = hmac(secret, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac))
}

/// Minimal HMAC-SHA256 on top of `sha2` (no extra dependency).
mod hmac_sha256 {
    use sha2::{Digest, Sha256};
    pub fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for i in 0..64 {
            ipad[i] ^= k[i];
            opad[i] ^= k[i];
        }
        let inner = Sha256::new()
            .chain_update(ipad)
            .chain_update(msg)
            .finalize();
        Sha256::new()
            .chain_update(opad)
            .chain_update(inner)
            .finalize()
            .to_vec()
    }
}

/// Decodes the payload of a JWT without verifying it.
pub fn jwt_payload(token: &str) -> Value {
    let p = token.split('.').nth(1).expect("three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// Config model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum KeyMaterial {
    /// HS* key in a `secret_file` (bytes written as given).
    SecretFile(Vec<u8>),
    /// HS* key given inline as `secret`.
    Secret(String),
    /// HS* key read from an environment variable (`secret_env`): (var name, value).
    SecretEnv(String, String),
    /// A public key in a `public_key_file`; the private PEM is kept for signing in tests.
    PublicKey {
        public_pem: String,
        private_pem: String,
    },
}

#[derive(Clone, Debug)]
pub struct KeyCfg {
    pub kid: String,
    pub alg: Algorithm,
    pub material: KeyMaterial,
}

impl KeyCfg {
    pub fn hs256(kid: &str, secret: Vec<u8>) -> Self {
        KeyCfg {
            kid: kid.into(),
            alg: Algorithm::HS256,
            material: KeyMaterial::SecretFile(secret),
        }
    }

    /// A fresh Ed25519 key pair, configured by its public key only.
    pub fn ed25519(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        KeyCfg {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            material: KeyMaterial::PublicKey {
                public_pem: kp.public_key_pem(),
                private_pem: kp.serialize_pem(),
            },
        }
    }

    pub fn secret_bytes(&self) -> Option<Vec<u8>> {
        match &self.material {
            KeyMaterial::SecretFile(b) => {
                let mut b = b.clone();
                if b.last() == Some(&b'\n') {
                    b.pop();
                }
                Some(b)
            }
            KeyMaterial::Secret(s) => Some(s.as_bytes().to_vec()),
            KeyMaterial::SecretEnv(_, v) => Some(v.as_bytes().to_vec()),
            KeyMaterial::PublicKey { .. } => None,
        }
    }

    /// Signs `claims` with this key (header carries `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        let key = match &self.material {
            KeyMaterial::PublicKey { private_pem, .. } => match self.alg {
                Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
                Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
                _ => EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
            },
            _ => EncodingKey::from_secret(&self.secret_bytes().unwrap()),
        };
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        other => panic!("alg {other:?} not used in tests"),
    }
}

#[derive(Clone, Debug)]
pub struct TenantCfg {
    pub id: String,
    pub hosts: Vec<String>,
    pub keys: Vec<KeyCfg>,
    /// false: the upstream address is a closed port (for 502 tests).
    pub live_upstream: bool,
    /// Raw TOML lines placed inside this `[[tenants]]` table (before the keys).
    pub extra: Vec<String>,
    /// Further upstream addresses after the first: true = a live server, false = closed port.
    pub more_upstreams: Vec<bool>,
}

impl TenantCfg {
    pub fn new(id: &str) -> Self {
        TenantCfg {
            id: id.into(),
            hosts: vec![format!("links.{id}.test")],
            keys: vec![KeyCfg::hs256("k1", default_secret(id))],
            live_upstream: true,
            extra: vec![],
            more_upstreams: vec![],
        }
    }
    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }
    pub fn keys(mut self, keys: Vec<KeyCfg>) -> Self {
        self.keys = keys;
        self
    }
    pub fn dead_upstream(mut self) -> Self {
        self.live_upstream = false;
        self
    }
    pub fn host(&self) -> &str {
        &self.hosts[0]
    }
}

#[derive(Clone, Debug)]
pub struct GatewayCfg {
    pub tenants: Vec<TenantCfg>,
    /// Raw TOML lines appended to `[session]`.
    pub session_extra: Vec<String>,
    /// Hostnames that get a certificate but no `[[domains]]` entry.
    pub extra_cert_hosts: Vec<String>,
    /// Raw TOML appended at the end of the file.
    pub tail: String,
    /// Bytes of `[session] secret_file`.
    pub session_secret: Vec<u8>,
}

impl Default for GatewayCfg {
    /// Two tenants, `acme` (public paths `/static/`, `/pub`) and `globex`.
    fn default() -> Self {
        GatewayCfg {
            tenants: vec![
                TenantCfg::new("acme").extra(r#"public_paths = ["/static/", "/pub"]"#),
                TenantCfg::new("globex"),
            ],
            session_extra: vec![],
            extra_cert_hosts: vec![],
            tail: String::new(),
            session_secret: vec![7u8; 48],
        }
    }
}

impl GatewayCfg {
    pub fn with_tenants(tenants: Vec<TenantCfg>) -> Self {
        GatewayCfg {
            tenants,
            ..GatewayCfg::default()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

pub struct TestPki {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub leaf_pem: String,
    pub leaf_key_pem: String,
}

/// A self-signed test CA named `common_name` (valid 2020–2099) and its key.
pub fn test_ca(common_name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    (ca, ca_key)
}

pub fn make_pki(hosts: &[String]) -> TestPki {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
    let (ca, ca_key) = test_ca("linkgate test CA");

    let leaf_key = KeyPair::generate().unwrap();
    let mut lp = CertificateParams::new(hosts.to_vec()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hosts[0].clone());
    lp.distinguished_name = dn;
    lp.not_before = rcgen::date_time_ymd(2020, 1, 1);
    lp.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let leaf = lp.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        ca_der: ca.der().to_vec(),
        leaf_pem: leaf.pem(),
        leaf_key_pem: leaf_key.serialize_pem(),
    }
}

// ---------------------------------------------------------------------------------------
// Recording upstream
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// Header (lower-case name, value) pairs in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap()
    }
    /// Everything the upstream saw, as one string (for "never reaches upstream" checks).
    pub fn dump(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.uri);
        for (n, v) in &self.headers {
            s.push_str(&format!("{n}: {v}\n"));
        }
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }
}

/// The response type of a [`TestHttpServer`] handler.
pub type TestResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// A hyper HTTP/1.1 server for tests, on its own thread with a current-thread tokio
/// runtime, answering every request with `handler`. Dropping it stops accepting and joins
/// the thread.
pub struct TestHttpServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestHttpServer {
    /// Serves on `listener` (made non-blocking here) until dropped.
    pub fn start<F, Fut>(listener: TcpListener, handler: F) -> TestHttpServer
    where
        F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<TestResponse, std::convert::Infallible>>
            + Send
            + 'static,
    {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        acc = listener.accept() => {
                            let Ok((stream, _)) = acc else { continue };
                            let svc = hyper::service::service_fn(handler.clone());
                            tokio::spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        TestHttpServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for TestHttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    records: Arc<Mutex<Vec<Recorded>>>,
    _server: TestHttpServer,
}

impl Upstream {
    /// A hyper HTTP/1.1 server on its own thread and runtime. Answers 200
    /// `upstream ok <path>`; a path containing `/slow` waits 1.5 s first.
    pub fn start() -> Upstream {
        let records: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recs = records.clone();
        let server = TestHttpServer::start(
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(),
            move |req| upstream_handle(req, recs.clone()),
        );
        Upstream {
            addr: server.addr,
            records,
            _server: server,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    /// The last recorded request whose path is `path`.
    pub fn last(&self, path: &str) -> Option<Recorded> {
        self.requests().into_iter().rev().find(|r| r.path() == path)
    }

    pub fn dump(&self) -> String {
        self.requests()
            .iter()
            .map(Recorded::dump)
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

impl Recorded {
    /// Reads a whole request (method, path and query, lower-cased headers, body).
    pub async fn capture(req: hyper::Request<hyper::body::Incoming>) -> Recorded {
        use http_body_util::BodyExt;
        let method = req.method().to_string();
        let uri = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().to_string());
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        Recorded {
            method,
            uri,
            headers,
            body,
        }
    }
}

async fn upstream_handle(
    req: hyper::Request<hyper::body::Incoming>,
    recs: Arc<Mutex<Vec<Recorded>>>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let rec = Recorded::capture(req).await;
    let path = rec.uri.split('?').next().unwrap_or("").to_string();
    recs.lock().unwrap().push(rec);
    if path.contains("/slow") {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    Ok(hyper::Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            "upstream ok {path}"
        ))))
        .unwrap())
}

// ---------------------------------------------------------------------------------------
// Prepared config (files on disk, nothing running)
// ---------------------------------------------------------------------------------------

pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub cfg: GatewayCfg,
    pub config_path: PathBuf,
    pub https_port: u16,
    pub http_port: u16,
    pub admin_port: u16,
    pub pki: TestPki,
    pub upstreams: HashMap<String, Upstream>,
    /// tenant id -> upstream address written in the config.
    pub upstream_addrs: HashMap<String, SocketAddr>,
    /// tenant id -> the servers of `more_upstreams` (live ones only) and all extra addresses.
    pub more_upstreams: HashMap<String, (Vec<Upstream>, Vec<SocketAddr>)>,
    pub env: Vec<(String, String)>,
}

impl Prepared {
    pub fn new(cfg: GatewayCfg) -> Prepared {
        let dir = tempfile::Builder::new()
            .prefix("linkgate-it-")
            .tempdir()
            .unwrap();
        let mut upstreams = HashMap::new();
        let mut upstream_addrs = HashMap::new();
        let mut more_upstreams = HashMap::new();
        for t in &cfg.tenants {
            if t.live_upstream {
                let u = Upstream::start();
                upstream_addrs.insert(t.id.clone(), u.addr);
                upstreams.insert(t.id.clone(), u);
            } else {
                upstream_addrs.insert(
                    t.id.clone(),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
                );
            }
            let mut servers = vec![];
            let mut addrs = vec![];
            for live in &t.more_upstreams {
                if *live {
                    let u = Upstream::start();
                    addrs.push(u.addr);
                    servers.push(u);
                } else {
                    addrs.push(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())));
                }
            }
            more_upstreams.insert(t.id.clone(), (servers, addrs));
        }
        let mut hosts: Vec<String> = cfg.tenants.iter().flat_map(|t| t.hosts.clone()).collect();
        hosts.extend(cfg.extra_cert_hosts.iter().cloned());
        let pki = make_pki(&hosts);
        let mut p = Prepared {
            config_path: dir.path().join("linkgate.toml"),
            dir,
            cfg,
            https_port: free_port(),
            http_port: free_port(),
            admin_port: free_port(),
            pki,
            upstreams,
            upstream_addrs,
            more_upstreams,
            env: vec![],
        };
        let text = p.render();
        fs::write(&p.config_path, text).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, data: &[u8]) -> String {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// Renders the TOML config and writes the files it references.
    pub fn render(&mut self) -> String {
        let state = self.path("state");
        fs::create_dir_all(&state).unwrap();
        let session_key = self.write("session.key", &self.cfg.session_secret.clone());
        let cert = self.write("cert.pem", self.pki.leaf_pem.as_bytes());
        let key = self.write("key.pem", self.pki.leaf_key_pem.as_bytes());
        let mut all_hosts: Vec<String> = self
            .cfg
            .tenants
            .iter()
            .flat_map(|t| t.hosts.clone())
            .collect();
        all_hosts.extend(self.cfg.extra_cert_hosts.iter().cloned());

        let mut s = String::new();
        s += "[server]\n";
        s += &format!("https_listen = \"127.0.0.1:{}\"\n", self.https_port);
        s += &format!("http_listen = \"127.0.0.1:{}\"\n", self.http_port);
        s += &format!("admin_listen = \"127.0.0.1:{}\"\n", self.admin_port);
        s += "threads = 1\n";
        s += &format!("state_dir = {}\n\n", q(state.to_str().unwrap()));
        s += "[store]\nurl = \"sqlite://linkgate.db\"\n\n";
        s += &format!(
            "[admin]\ntokens = [{{ name = \"it\", token_sha256 = \"{}\" }}]\n\n",
            sha256_hex(ADMIN_TOKEN.as_bytes())
        );
        s += &format!("[session]\nsecret_file = {}\n", q(&session_key));
        for l in &self.cfg.session_extra {
            s += l;
            s += "\n";
        }
        s += "\n[[certificates]]\n";
        s += &format!(
            "hostnames = [{}]\n",
            all_hosts
                .iter()
                .map(|h| q(h))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s += &format!("cert_file = {}\nkey_file = {}\n\n", q(&cert), q(&key));

        let tenants = self.cfg.tenants.clone();
        let mut env = vec![];
        for t in &tenants {
            s += "[[tenants]]\n";
            s += &format!("id = {}\n", q(&t.id));
            let mut ups = vec![q(&self.upstream_addrs[&t.id].to_string())];
            ups.extend(
                self.more_upstreams[&t.id]
                    .1
                    .iter()
                    .map(|a| q(&a.to_string())),
            );
            s += &format!("upstream = [{}]\n", ups.join(", "));
            for l in &t.extra {
                s += l;
                s += "\n";
            }
            for (i, k) in t.keys.iter().enumerate() {
                s += "\n  [[tenants.keys]]\n";
                s += &format!("  kid = {}\n  alg = \"{}\"\n", q(&k.kid), alg_name(k.alg));
                match &k.material {
                    KeyMaterial::SecretFile(b) => {
                        let p = self.write(&format!("{}-{i}.key", t.id), b);
                        s += &format!("  secret_file = {}\n", q(&p));
                    }
                    KeyMaterial::Secret(v) => s += &format!("  secret = {}\n", q(v)),
                    KeyMaterial::SecretEnv(var, val) => {
                        env.push((var.clone(), val.clone()));
                        s += &format!("  secret_env = {}\n", q(var));
                    }
                    KeyMaterial::PublicKey { public_pem, .. } => {
                        let p = self.write(&format!("{}-{i}.pub.pem", t.id), public_pem.as_bytes());
                        s += &format!("  public_key_file = {}\n", q(&p));
                    }
                }
            }
            s += "\n";
        }
        for t in &tenants {
            for h in &t.hosts {
                s += &format!(
                    "[[domains]]\nhostname = {}\ntenant = {}\n\n",
                    q(h),
                    q(&t.id)
                );
            }
        }
        s += &self.cfg.tail;
        self.env = env;
        s
    }

    /// Re-renders the config from `self.cfg` (rewriting the files it references) and writes
    /// it to `config_path`; returns the new text.
    pub fn write_config(&mut self) -> String {
        let text = self.render();
        fs::write(&self.config_path, &text).unwrap();
        text
    }

    /// Runs the binary with `args` (config flag added) and returns (code, stdout, stderr).
    pub fn run_cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .envs(self.env.iter().map(|(a, b)| (a.as_str(), b.as_str())))
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Running gateway
// ---------------------------------------------------------------------------------------

pub struct Gateway {
    pub p: Prepared,
    pub child: Option<Child>,
    pub log_path: PathBuf,
}

impl std::ops::Deref for Gateway {
    type Target = Prepared;
    fn deref(&self) -> &Prepared {
        &self.p
    }
}

/// Runs `linkgate serve` on `p`'s config, its output appended to `log_path`.
fn spawn_child(p: &Prepared, log_path: &std::path::Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    Command::new(bin())
        .arg("serve")
        .arg("--config")
        .arg(&p.config_path)
        .envs(p.env.iter().map(|(a, b)| (a.as_str(), b.as_str())))
        .env("RUST_BACKTRACE", "1")
        .envs(
            std::env::var("IT_GATEWAY_RUST_LOG")
                .ok()
                .map(|v| ("RUST_LOG", v)),
        )
        .current_dir(p.dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn linkgate")
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Gateway {
    pub async fn start(cfg: GatewayCfg) -> Gateway {
        Self::start_prepared(Prepared::new(cfg)).await
    }

    pub async fn default() -> Gateway {
        Self::start(GatewayCfg::default()).await
    }

    pub async fn start_prepared(p: Prepared) -> Gateway {
        let mut gw = Self::spawn_prepared(p);
        // Another process may take a listener port between `free_port` and linkgate's bind;
        // linkgate then exits saying so. It starts again on new HTTPS and admin ports (no one
        // outside knows them yet; the HTTP port may be in a pebble config, so it stays).
        for _ in 0..3 {
            match gw.ready_or_exit().await {
                Ok(()) => return gw,
                Err(_) if gw.could_not_listen() => {
                    let text = fs::read_to_string(&gw.p.config_path).unwrap();
                    let (https, admin) = (free_port(), free_port());
                    let text = text
                        .replace(
                            &format!("https_listen = \"127.0.0.1:{}\"", gw.p.https_port),
                            &format!("https_listen = \"127.0.0.1:{https}\""),
                        )
                        .replace(
                            &format!("admin_listen = \"127.0.0.1:{}\"", gw.p.admin_port),
                            &format!("admin_listen = \"127.0.0.1:{admin}\""),
                        );
                    fs::write(&gw.p.config_path, text).unwrap();
                    (gw.p.https_port, gw.p.admin_port) = (https, admin);
                    gw.child = Some(spawn_child(&gw.p, &gw.log_path));
                }
                Err(_) => break,
            }
        }
        gw.wait_ready().await;
        gw
    }

    /// Starts the gateway process without waiting for it to be ready (see `wait_ready`).
    pub fn spawn_prepared(p: Prepared) -> Gateway {
        let log_path = p.path("gateway.log");
        fs::File::create(&log_path).unwrap();
        let child = spawn_child(&p, &log_path);
        Gateway {
            p,
            child: Some(child),
            log_path,
        }
    }

    /// True when the process exited because a listener port was taken.
    fn could_not_listen(&self) -> bool {
        let log = self.log();
        log.contains("cannot listen") && !log.contains("server.http_listen =")
    }

    /// Waits (up to 20 s) until `/readyz` answers 200, or the process exits (its status).
    async fn ready_or_exit(&mut self) -> Result<(), std::process::ExitStatus> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(status);
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                panic!("linkgate not ready after 20 s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 20 s) until `/readyz` answers 200; panics if the process exits first.
    pub async fn wait_ready(&mut self) {
        if let Err(status) = self.ready_or_exit().await {
            panic!(
                "linkgate exited during start-up ({status}); log:\n{}\nconfig:\n{}",
                self.log(),
                fs::read_to_string(&self.p.config_path).unwrap()
            );
        }
    }

    /// Stops the gateway (SIGTERM, waiting for a graceful exit) and starts it again with the
    /// same config, state dir and ports. The log file is appended to, so `log()` holds the
    /// output of every run.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.signal("TERM");
            self.wait_exit(Duration::from_secs(30)).await;
        }
        self.wait_ports_free(Duration::from_secs(10)).await;
        self.child = Some(spawn_child(&self.p, &self.log_path));
        self.wait_ready().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the gateway's ports can be bound again. A restart once failed with
    /// `AddrInUse` on its HTTPS port right after the old process had exited; this waits that
    /// out and, if it lasts, names who holds the port.
    async fn wait_ports_free(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for port in [self.p.https_port, self.p.http_port, self.p.admin_port] {
            while TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
                if Instant::now() > deadline {
                    let holders = Command::new("ss")
                        .args(["-tanp", &format!("sport = :{port}")])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    panic!(
                        "port {port} still in use {timeout:?} after linkgate exited:\n{holders}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Kills the gateway with SIGKILL (no graceful shutdown) and reaps it; `restart()`
    /// then starts a new process on the same config, state dir and ports.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGHUP and waits (up to 10 s) until the log reports the outcome:
    /// `Some(true)` reloaded, `Some(false)` refused, `None` no report.
    pub async fn reload(&self) -> Option<bool> {
        let count = |log: &str| {
            (
                log.matches("configuration reloaded").count(),
                log.matches("configuration not reloaded").count(),
            )
        };
        let before = count(&self.log());
        self.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, refused) = count(&self.log());
            if refused > before.1 {
                // Every problem is logged; let the burst finish.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Some(false);
            }
            if ok > before.0 {
                return Some(true);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                panic!(
                    "linkgate did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn upstream(&self, tenant: &str) -> &Upstream {
        &self.upstreams[tenant]
    }

    pub fn tenant(&self, id: &str) -> &TenantCfg {
        self.cfg.tenants.iter().find(|t| t.id == id).unwrap()
    }

    pub fn host(&self, tenant: &str) -> String {
        self.tenant(tenant).host().to_string()
    }

    /// Signs `claims` with the tenant's first key.
    pub fn token(&self, tenant: &str, claims: &Value) -> String {
        self.tenant(tenant).keys[0].sign(claims)
    }

    /// `https://<tenant host>:<port><path>`
    pub fn url(&self, tenant: &str, path: &str) -> String {
        self.url_host(&self.host(tenant), path)
    }

    pub fn url_host(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https_port)
    }

    pub fn http_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http_port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn all_hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self
            .cfg
            .tenants
            .iter()
            .flat_map(|t| t.hosts.clone())
            .collect();
        h.extend(self.cfg.extra_cert_hosts.iter().cloned());
        h.push("unknown.test".into());
        h
    }

    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).unwrap(),
            )
            .timeout(Duration::from_secs(15));
        for h in self.all_hosts() {
            b = b.resolve(&h, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        }
        b
    }

    /// Default client: ALPN offers h2 and http/1.1.
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    pub fn client_h1(&self) -> reqwest::Client {
        self.client_builder().http1_only().build().unwrap()
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        plain_client()
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(15))
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.admin(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        plain_client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `/login/<token>` on the tenant's host and returns the session cookie value
    /// (asserting a 303).
    pub async fn redeem(&self, tenant: &str, token: &str) -> String {
        let r = self
            .client()
            .get(self.url(tenant, &format!("/login/{token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            303,
            "redeem failed: {}",
            r.text().await.unwrap()
        );
        session_cookie(&r)
            .expect("Set-Cookie with the session cookie")
            .value
    }

    /// A session for `sub` on `tenant` (via a fresh link); returns the cookie value.
    pub async fn login(&self, tenant: &str, sub: &str) -> String {
        let tok = self.token(tenant, &claims(sub));
        self.redeem(tenant, &tok).await
    }

    pub async fn get_with_cookie(
        &self,
        tenant: &str,
        path: &str,
        cookie: &str,
    ) -> reqwest::Response {
        self.client()
            .get(self.url(tenant, path))
            .header("cookie", format!("{COOKIE}={cookie}"))
            .send()
            .await
            .unwrap()
    }

    /// Fetches the JWKS from a served host and from admin, checks they agree, and
    /// verifies `assertion` (signature, `aud` = tenant, `iss` = https://host, exp).
    pub async fn verify_assertion(&self, tenant: &str, assertion: &str) -> Value {
        use jsonwebtoken::jwk::JwkSet;
        let host_jwks: Value = self
            .client()
            .get(self.url(tenant, "/.well-known/linkgate/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .expect("host JWKS is JSON");
        let admin_jwks: Value = plain_client()
            .get(self.admin_url("/v1/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .expect("admin JWKS is JSON");
        assert_eq!(host_jwks, admin_jwks, "host and admin JWKS differ");
        let set: JwkSet = serde_json::from_value(host_jwks.clone()).expect("JWKS parses");
        let header = jsonwebtoken::decode_header(assertion).expect("assertion header");
        assert!(
            matches!(header.alg, Algorithm::EdDSA | Algorithm::ES256),
            "assertion alg {:?}",
            header.alg
        );
        let kid = header.kid.clone().expect("assertion has kid");
        let jwk = set
            .find(&kid)
            .unwrap_or_else(|| panic!("kid {kid} not in {host_jwks}"));
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.leeway = 5;
        v.set_audience(&[tenant]);
        v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
        let data = jsonwebtoken::decode::<Value>(assertion, &key, &v).expect("assertion verifies");
        let c = data.claims;
        let host = self.host(tenant);
        let iss = c["iss"].as_str().unwrap();
        assert!(
            iss == format!("https://{host}")
                || iss == format!("https://{host}:{}", self.https_port),
            "iss {iss}"
        );
        let iat = c["iat"].as_i64().unwrap();
        let exp = c["exp"].as_i64().unwrap();
        assert!(exp > now(), "assertion expired");
        assert!(exp - iat <= 300, "assertion lives {}s > 300s", exp - iat);
        c
    }
}

// ---------------------------------------------------------------------------------------
// Response helpers
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// lower-cased attribute name -> value ("" for flags)
    pub attrs: Vec<(String, String)>,
}

impl SetCookie {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn parse_set_cookie(s: &str) -> SetCookie {
    let mut parts = s.split(';');
    let (name, value) = parts.next().unwrap().trim().split_once('=').unwrap();
    let attrs = parts
        .map(|a| {
            let a = a.trim();
            match a.split_once('=') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), v.trim().to_string()),
                None => (a.to_ascii_lowercase(), String::new()),
            }
        })
        .collect();
    SetCookie {
        name: name.to_string(),
        value: value.to_string(),
        attrs,
    }
}

pub fn session_cookie(r: &reqwest::Response) -> Option<SetCookie> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| parse_set_cookie(v.to_str().unwrap()))
        .find(|c| c.name == COOKIE)
}

pub fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Asserts `Location` names `path` on the same origin (relative, or absolute on `host`).
pub fn assert_location(r: &reqwest::Response, gw: &Gateway, host: &str, path: &str) {
    let loc = header(r, "location").expect("Location header");
    let abs1 = format!("https://{host}{path}");
    let abs2 = format!("https://{host}:{}{path}", gw.https_port);
    assert!(
        loc == path || loc == abs1 || loc == abs2,
        "Location {loc:?}, expected {path:?}"
    );
}

/// Asserts a JSON error answer per SPEC section 4 (including keep-alive) and returns its body.
pub async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    expect_error_inner(r, status, code, true).await
}

/// Like `expect_error` for the admin API, where SPEC does not promise keep-alive.
pub async fn expect_admin_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    expect_error_inner(r, status, code, false).await
}

async fn expect_error_inner(
    r: reqwest::Response,
    status: u16,
    code: &str,
    keep_alive: bool,
) -> Value {
    let st = r.status().as_u16();
    let conn = header(&r, "connection").unwrap_or_default();
    let ct = header(&r, "content-type").unwrap_or_default();
    let text = r.text().await.unwrap();
    assert_eq!(st, status, "status for expected `{code}`; body: {text}");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("error body is not JSON (expected `{code}`): {text}"));
    assert_eq!(v["error"], code, "error code; body: {text}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
        "message missing: {text}"
    );
    assert!(
        ct.contains("application/json"),
        "content-type {ct:?} for {code}"
    );
    assert!(
        !keep_alive || !conn.eq_ignore_ascii_case("close"),
        "error answer `{code}` closes the connection"
    );
    v
}

// ---------------------------------------------------------------------------------------
// Raw TLS (for paths the URL parser would normalise, and handshake checks)
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Sends `GET <raw_target>` over TLS (SNI = host, trusting the test CA) and
/// parses the answer. `extra_headers` are raw `Name: value` lines.
pub async fn raw_get(
    gw: &Gateway,
    host: &str,
    raw_target: &str,
    extra_headers: &[String],
) -> RawResponse {
    let ca = gw.pki.ca_der.clone();
    let port = gw.https_port;
    let host = host.to_string();
    let mut req = format!("GET {raw_target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nUser-Agent: it\r\n");
    for h in extra_headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tokio::task::spawn_blocking(move || raw_exchange(&ca, &host, port, req.as_bytes()))
        .await
        .unwrap()
}

fn raw_exchange(ca_der: &[u8], host: &str, port: u16, req: &[u8]) -> RawResponse {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(req).unwrap();
    tls.flush().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if !buf.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => panic!("raw read: {e}"),
        }
        if response_complete(&buf) {
            break;
        }
    }
    parse_raw(&buf)
}

type Head = (usize, Vec<(String, String)>, u16);

fn split_head(buf: &[u8]) -> Option<Head> {
    let pos = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((pos + 4, headers, status))
}

fn response_complete(buf: &[u8]) -> bool {
    let Some((start, headers, _)) = split_head(buf) else {
        return false;
    };
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if let Some(cl) = get("content-length") {
        return buf.len() - start >= cl.parse::<usize>().unwrap();
    }
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return buf.ends_with(b"0\r\n\r\n");
    }
    false
}

fn parse_raw(buf: &[u8]) -> RawResponse {
    let (start, headers, status) = split_head(buf)
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(buf)));
    let mut body = buf[start..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_s = String::from_utf8_lossy(&rest[..p]);
            let size =
                usize::from_str_radix(size_s.split(';').next().unwrap().trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[p + 2..p + 2 + size]);
            rest = &rest[p + 2 + size + 2..];
        }
        body = out;
    }
    RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Performs a TLS handshake that accepts any certificate, so only the server can
/// make it fail. `sni = None` sends no SNI. Returns the negotiated ALPN on success.
pub async fn tls_handshake(port: u16, sni: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    let sni = sni.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = match &sni {
            Some(h) => rustls::pki_types::ServerName::try_from(h.clone()).unwrap(),
            None => {
                cfg.enable_sni = false;
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap()
            }
        };
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
        }
        Ok(conn.alpn_protocol().map(<[u8]>::to_vec))
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// Sum of the values of all samples named `name` whose labels include `labels`;
/// None when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (sample_name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        if sample_name != name {
            continue;
        }
        let (label_str, value_str) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.rfind('}').unwrap();
            (&r[..end], &r[end + 1..])
        } else {
            ("", rest)
        };
        let mut got = HashMap::new();
        for part in split_labels(label_str) {
            if let Some((k, v)) = part.split_once('=') {
                got.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
            }
        }
        if labels
            .iter()
            .all(|(k, v)| got.get(*k).map(String::as_str) == Some(*v))
        {
            let v: f64 = value_str
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

fn split_labels(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut in_q = false;
    for c in s.chars() {
        match c {
            '"' => {
                in_q = !in_q;
                cur.push(c);
            }
            ',' if !in_q => {
                out.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
