//! The configuration file as written: serde structs, unknown keys refused. Only
//! [`super::Validator`] reads them; the rest of the gateway reads the validated types.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub https_listen: Option<String>,
    pub http_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub threads: Option<usize>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default)]
    pub tokens: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    pub name: String,
    pub token_sha256: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub cookie_name: Option<String>,
    pub ttl: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    pub enabled: Option<bool>,
    pub directory: Option<String>,
    pub contact: Option<Vec<String>>,
    pub challenge: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub renew_before: Option<String>,
    pub orders_per_minute: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub nameservers: Option<Vec<String>>,
    pub edge_target: Option<String>,
    pub verify_zone: Option<String>,
    pub check_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Webhooks {
    pub allow_private_targets: Option<bool>,
    pub timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub hostnames: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub upstream: Vec<String>,
    pub upstream_tls: Option<bool>,
    pub public_paths: Option<Vec<String>>,
    pub login_url: Option<String>,
    pub confirm: Option<String>,
    pub session_ttl: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub keys: Vec<toml::Value>,
    pub branding: Option<toml::Value>,
    #[serde(default)]
    pub webhooks: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub kid: String,
    pub alg: String,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub public_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branding {
    pub title: Option<String>,
    pub description: Option<String>,
    pub logo_url: Option<String>,
    pub color: Option<String>,
    pub font: Option<String>,
    #[serde(default)]
    pub buttons: Vec<Button>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Button {
    pub label: String,
    pub url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub events: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub hostname: String,
    pub tenant: String,
}
