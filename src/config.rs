//! Configuration: the TOML file as written (`raw` structs, unknown keys refused) turned into
//! one validated [`Config`] the rest of the gateway reads.
//!
//! Validation collects **every** problem, each named by its key path as written in the file
//! (`tenants[0].keys[1].secret_file: must hold at least 32 bytes`), so an operator fixes the
//! file in one pass. Error messages never contain secret values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every problem found in a configuration file, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One human sentence per problem, prefixed with the key path.
    pub problems: Vec<String>,
}

/// Largest configuration file accepted.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Largest secret or key file accepted.
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// Minimum length of HMAC secrets (tenant HS* keys and the session secret).
pub const MIN_SECRET_BYTES: usize = 32;

// === raw (as written) ===

mod raw;
mod validate;

use validate::Validator;
pub use validate::{normalize_hostname, valid_tenant_id};

// === validated ===

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from (for SIGHUP re-reads and relative paths in messages).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub store: StoreUrl,
    pub admin_tokens: Vec<AdminToken>,
    pub session: SessionConfig,
    pub acme: AcmeConfig,
    pub dns: DnsConfig,
    pub webhooks: WebhooksConfig,
    pub certificates: Vec<CertificateConfig>,
    pub tenants: Vec<TenantConfig>,
    pub domains: Vec<DomainConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub https_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    pub state_dir: PathBuf,
}

/// `[store].url`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file, already joined with `state_dir` when relative.
    Sqlite(PathBuf),
}

/// One admin bearer token, kept only as its SHA-256.
#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub sha256: [u8; 32],
}

/// A secret's bytes. `Debug` never prints them.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// `[session]`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub cookie_name: String,
    pub ttl: Duration,
    pub secret: Secret,
}

/// `[acme]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    pub enabled: bool,
    pub directory: String,
    pub contact: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub renew_before: Duration,
    /// New ACME orders allowed per minute and account.
    pub orders_per_minute: u32,
}

/// `[dns]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    pub nameservers: Vec<SocketAddr>,
    pub edge_target: String,
    pub verify_zone: String,
    pub check_interval: Duration,
}

/// `[webhooks]`.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    pub allow_private_targets: bool,
    pub timeout: Duration,
}

/// One `[[certificates]]` entry, files already read and checked.
#[derive(Debug, Clone)]
pub struct CertificateConfig {
    pub hostnames: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM text of the chain.
    pub cert_pem: Vec<u8>,
    /// PEM text of the private key.
    pub key_pem: Secret,
}

/// Algorithms a tenant key may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    HS256,
    HS384,
    HS512,
    RS256,
    ES256,
    EdDSA,
}

impl KeyAlg {
    /// Parses the `alg` as written in config and in JWT headers (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "HS256" => Self::HS256,
            "HS384" => Self::HS384,
            "HS512" => Self::HS512,
            "RS256" => Self::RS256,
            "ES256" => Self::ES256,
            "EdDSA" => Self::EdDSA,
            _ => return None,
        })
    }

    /// The name as it appears in a JWT header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    /// True for the HMAC family.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }
}

/// Key material of a tenant key.
#[derive(Debug, Clone)]
pub enum KeyMaterial {
    /// HMAC secret bytes.
    Secret(Secret),
    /// PEM public key.
    PublicPem(Vec<u8>),
}

/// One `[[tenants.keys]]` entry.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub kid: String,
    pub alg: KeyAlg,
    pub material: KeyMaterial,
}

/// When a `GET` shows the confirm page instead of redeeming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmMode {
    /// Only for links with `one_time: true` (default).
    OneTime,
    /// For every link.
    Always,
    /// Never: every link redeems on `GET`.
    Never,
}

/// `[tenants.branding]`.
#[derive(Debug, Clone, Default)]
pub struct Branding {
    pub title: Option<String>,
    pub description: Option<String>,
    pub logo_url: Option<String>,
    pub color: Option<String>,
    pub font: Option<String>,
    pub buttons: Vec<(String, String)>,
}

/// `[[tenants.webhooks]]`.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: Secret,
    pub events: Vec<String>,
}

/// One `[[tenants]]` entry.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    pub upstream: Vec<SocketAddr>,
    pub upstream_tls: bool,
    pub public_paths: Vec<String>,
    pub login_url: Option<String>,
    pub confirm: ConfirmMode,
    pub session_ttl: Duration,
    /// Claim name -> header name, in a stable order.
    pub headers: Vec<(String, String)>,
    pub keys: Vec<KeyConfig>,
    pub branding: Option<Branding>,
    pub webhooks: Vec<WebhookConfig>,
}

/// One `[[domains]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    pub hostname: String,
    pub tenant: String,
}

/// Webhook event names the gateway can send.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "link.redeemed",
    "domain.active",
    "domain.failed",
    "certificate.renewed",
];

// === loading ===

impl Config {
    /// The `[[domains]]` entries a `[[certificates]]` entry covers (served with a static
    /// certificate; the others go through DNS checks and ACME).
    pub fn static_domains(&self) -> impl Iterator<Item = &DomainConfig> {
        self.domains.iter().filter(|d| {
            self.certificates
                .iter()
                .any(|c| c.hostnames.contains(&d.hostname))
        })
    }

    /// Reads and validates the file at `path`, reporting every problem at once.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_limited(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        let text = String::from_utf8(text).map_err(|_| ConfigError {
            problems: vec![format!("{}: not UTF-8 text", path.display())],
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text; `path` names the file and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let root: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![syntax_error(&e, text, path)],
        })?;
        let mut v = Validator::default();
        let config = v.config(root, path);
        if v.problems.is_empty() {
            config.ok_or_else(|| ConfigError {
                problems: vec!["configuration incomplete".into()],
            })
        } else {
            Err(ConfigError {
                problems: v.problems,
            })
        }
    }

    /// The tenant with this id.
    pub fn tenant(&self, id: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.id == id)
    }
}

/// A TOML syntax error as one line: the message and where, never the source text (the line
/// may hold a secret). `Display` of the error quotes the offending line, so it is not used.
fn syntax_error(e: &toml::de::Error, text: &str, path: &Path) -> String {
    let at = match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!(" (line {line}, column {column})")
        }
        None => String::new(),
    };
    format!(
        "{}: TOML syntax error{at}: {}",
        path.display(),
        one_line(e.message())
    )
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads a file, refusing ones larger than `limit`.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// Parses a duration such as `30s`, `5m`, `12h`, `5d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("not a duration ({e}); use e.g. 30s, 5m, 12h, 5d"))
}

#[cfg(test)]
mod tests;
