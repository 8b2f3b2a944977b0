//! Minting magic links (for `linkgate mint` and `POST /v1/links`): signed with the tenant's
//! first HS* key, host defaulting to the tenant's first domain.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::config::{Config, KeyAlg, KeyMaterial};

/// Default link lifetime (5 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 86_400);

/// Which URL form a link takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkForm {
    /// `https://HOST/login/<JWT>`.
    Path,
    /// `https://HOST/?magic_link=<JWT>`.
    Query,
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub tenant: String,
    pub sub: String,
    pub ttl: Duration,
    pub claims: Map<String, Value>,
    pub one_time: bool,
    pub redirect: Option<String>,
    pub host: Option<String>,
    pub form: LinkForm,
}

/// A minted link.
#[derive(Debug, Clone)]
pub struct Minted {
    pub url: String,
    pub token: String,
    pub jti: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Why a link could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("tenant `{0}` has no HS256/HS384/HS512 key: it signs its own links")]
    NoSigningKey(String),
    #[error("tenant `{0}` has no domain; pass a host")]
    NoHost(String),
    #[error("redirect must be a path starting with a single /")]
    BadRedirect,
    #[error("host `{0}` is not a valid host name")]
    BadHost(String),
    #[error("ttl must be between 1 second and 365 days")]
    BadTtl,
}

/// Mints a link per `req` at time `now` (Unix seconds).
pub fn mint(config: &Config, req: &MintRequest, now: i64) -> Result<Minted, MintError> {
    let tenant = config
        .tenant(&req.tenant)
        .ok_or_else(|| MintError::UnknownTenant(req.tenant.clone()))?;
    let (kid, secret, alg) = tenant
        .keys
        .iter()
        .find_map(|k| match &k.material {
            KeyMaterial::Secret(s) if k.alg.is_hmac() => Some((k.kid.clone(), s, k.alg)),
            _ => None,
        })
        .ok_or_else(|| MintError::NoSigningKey(req.tenant.clone()))?;
    if req.ttl.is_zero() || req.ttl > Duration::from_secs(365 * 86_400) {
        return Err(MintError::BadTtl);
    }
    if let Some(r) = &req.redirect {
        if !crate::link::is_safe_redirect(r) {
            return Err(MintError::BadRedirect);
        }
    }
    let host = match &req.host {
        Some(h) => {
            let (name, _port) = split_host_port(h);
            crate::config::normalize_hostname(name).map_err(|_| MintError::BadHost(h.clone()))?;
            h.to_ascii_lowercase()
        }
        None => {
            let d = config
                .domains
                .iter()
                .find(|d| d.tenant == req.tenant)
                .ok_or_else(|| MintError::NoHost(req.tenant.clone()))?;
            match config.server.https_listen.port() {
                443 => d.hostname.clone(),
                p => format!("{}:{p}", d.hostname),
            }
        }
    };
    let jti = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
    let expires_at = now + req.ttl.as_secs() as i64;
    let mut claims = req.claims.clone();
    claims.insert("sub".into(), req.sub.clone().into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), expires_at.into());
    claims.insert("jti".into(), jti.clone().into());
    if req.one_time {
        claims.insert("one_time".into(), true.into());
    }
    if let Some(r) = &req.redirect {
        claims.insert("redirect".into(), r.clone().into());
    }
    let mut header = Header::new(match alg {
        KeyAlg::HS384 => Algorithm::HS384,
        KeyAlg::HS512 => Algorithm::HS512,
        _ => Algorithm::HS256,
    });
    header.kid = Some(kid);
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret.0))
        .expect("HMAC signing of JSON claims cannot fail");
    let url = match req.form {
        LinkForm::Path => format!("https://{host}/login/{token}"),
        LinkForm::Query => format!("https://{host}/?magic_link={token}"),
    };
    Ok(Minted {
        url,
        token,
        jti,
        expires_at,
    })
}

/// Splits `host[:port]` (no IPv6 literals: hosts here are DNS names).
pub fn split_host_port(h: &str) -> (&str, Option<&str>) {
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (name, Some(port)),
        _ => (h, None),
    }
}

/// Parses `k=v` claim arguments: `v` as JSON when it parses, else as a string.
pub fn parse_claim_arg(arg: &str) -> Option<(String, Value)> {
    let (k, v) = arg.split_once('=')?;
    if k.is_empty() {
        return None;
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Some((k.to_string(), value))
}
