//! The admin listener: health, readiness, metrics and JWKS without authentication; the
//! `/v1` API (links, revocations) behind bearer tokens checked against stored SHA-256
//! hashes in constant time.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{header, Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::domains::{DomainError, DomainManager};
use crate::gateway::{now, Gateway};
use crate::mint::{LinkForm, MintError, MintRequest};
use crate::revocation::Revocation;

/// Largest admin request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The admin application.
pub struct AdminApi {
    gw: Arc<Gateway>,
    domains: Option<Arc<DomainManager>>,
}

impl AdminApi {
    /// The admin API over the shared gateway state; `domains` when ACME is enabled.
    pub fn new(gw: Arc<Gateway>, domains: Option<Arc<DomainManager>>) -> Self {
        Self { gw, domains }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainBody {
    hostname: String,
    tenant: String,
}

fn domain_error(e: DomainError) -> Response<Vec<u8>> {
    match e {
        DomainError::InvalidHostname(m) => error(400, "invalid_hostname", m),
        DomainError::UnknownTenant(t) => error(400, "unknown_tenant", format!("no tenant `{t}`")),
        DomainError::Taken(h) => error(
            409,
            "hostname_taken",
            format!("`{h}` is already registered"),
        ),
        DomainError::NotFound(h) => error(404, "not_found", format!("no domain `{h}`")),
        DomainError::Store(e) => {
            tracing::error!(error = %e, "store error in the domains API");
            error(503, "store_unavailable", "the store is not available")
        }
    }
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_response(status: u16, v: &Value) -> Response<Vec<u8>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn error(status: u16, code: &str, message: impl Into<String>) -> Response<Vec<u8>> {
    json_response(status, &json!({"error": code, "message": message.into()}))
}

fn invalid_body(e: impl std::fmt::Display) -> Response<Vec<u8>> {
    error(400, "invalid_body", format!("invalid body: {e}"))
}

/// Parses a JSON request body; the error names the field at fault (`ttl`, `claims.x`).
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            inner.to_string()
        } else {
            format!("`{path}`: {inner}")
        }
    })
}

/// A duration given as a string (`"1h"`) or a whole number of seconds.
enum TtlArg {
    Secs(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for TtlArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TtlArg;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as \"1h\" or whole seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TtlArg, E> {
                Ok(TtlArg::Secs(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TtlArg, E> {
                Ok(TtlArg::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A time given as RFC 3339 or whole Unix seconds.
enum TimeArg {
    Secs(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for TimeArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TimeArg;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 time or whole Unix seconds")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TimeArg, E> {
                Ok(TimeArg::Secs(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TimeArg, E> {
                i64::try_from(v)
                    .map(TimeArg::Secs)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TimeArg, E> {
                Ok(TimeArg::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Unix seconds of an RFC 3339 time (any offset; fractions of a second dropped).
fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    tenant: String,
    sub: String,
    ttl: Option<TtlArg>,
    claims: Option<Map<String, Value>>,
    one_time: Option<bool>,
    redirect: Option<String>,
    host: Option<String>,
    form: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationBody {
    jti: Option<String>,
    tenant: Option<String>,
    sub: Option<String>,
    before: Option<TimeArg>,
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl AdminApi {
    async fn domains_api(&self, method: Method, path: &str, body: &[u8]) -> Response<Vec<u8>> {
        let rest = path
            .trim_start_matches("/v1/domains")
            .trim_start_matches('/');
        let (raw_host, action) = rest.split_once('/').unwrap_or((rest, ""));
        // Any spelling of a name (case, trailing dot, percent-escapes, IDNA) finds the domain;
        // a name that cannot be one finds nothing.
        let host = if raw_host.is_empty() {
            String::new()
        } else {
            let config = self.gw.config.load();
            crate::domains::path_hostname(
                raw_host,
                &config.dns.edge_target,
                &config.dns.verify_zone,
            )
            .unwrap_or_else(|| raw_host.to_ascii_lowercase())
        };
        // `[[domains]]` entries a `[[certificates]]` entry covers. The others go through the
        // DNS and ACME flow and are listed from the store (with ACME off they cannot exist).
        let statics = || {
            let config = self.gw.config.load();
            config
                .static_domains()
                .filter_map(|d| self.static_domain(&d.hostname))
                .collect::<Vec<Value>>()
        };
        let Some(dm) = &self.domains else {
            return match (method, host.as_str(), action) {
                (Method::GET, "", "") => json_response(200, &json!({ "domains": statics() })),
                (Method::GET, h, "") => match self.static_domain(h) {
                    Some(d) => json_response(200, &d),
                    None => error(404, "not_found", format!("no domain `{h}`")),
                },
                _ => error(
                    501,
                    "not_implemented",
                    "custom domains need [acme] enabled = true",
                ),
            };
        };
        match (method, host.as_str(), action) {
            (Method::POST, "", "") => {
                let b: DomainBody = match parse_body(body) {
                    Ok(b) => b,
                    Err(e) => return invalid_body(e),
                };
                match dm.create(&b.hostname, &b.tenant).await {
                    Ok(row) => json_response(201, &dm.view(&row)),
                    Err(e) => domain_error(e),
                }
            }
            (Method::GET, "", "") => match dm.list().await {
                Ok(rows) => {
                    let mut all = statics();
                    all.extend(rows.iter().map(|r| dm.view(r)));
                    json_response(200, &json!({ "domains": all }))
                }
                Err(e) => domain_error(e),
            },
            (Method::GET, h, "") => match dm.get(h).await {
                Ok(Some(row)) => json_response(200, &dm.view(&row)),
                Ok(None) => match self.static_domain(h) {
                    Some(d) => json_response(200, &d),
                    None => error(404, "not_found", format!("no domain `{h}`")),
                },
                Err(e) => domain_error(e),
            },
            (Method::DELETE, h, "") if !h.is_empty() => match dm.delete(h).await {
                Ok(()) => respond(204, "application/json", Vec::new()),
                Err(e) => domain_error(e),
            },
            (Method::POST, h, "check") if !h.is_empty() => match dm.check_now(h).await {
                Ok(row) => json_response(200, &dm.view(&row)),
                Err(e) => domain_error(e),
            },
            _ => error(405, "method_not_allowed", "not a domains API operation"),
        }
    }

    /// The domain object of a `[[domains]]` entry served with a static certificate.
    fn static_domain(&self, hostname: &str) -> Option<Value> {
        let config = self.gw.config.load();
        let d = config.static_domains().find(|d| d.hostname == hostname)?;
        let cert = self.gw.certs.get(hostname);
        Some(json!({
            "hostname": d.hostname,
            "tenant": d.tenant,
            "state": if cert.is_some() { "active" } else { "pending_ownership" },
            "records": [],
            "last_checked_at": null,
            "last_error": null,
            "certificate": cert.map(|c| json!({
                "not_before": rfc3339(c.not_before),
                "not_after": rfc3339(c.not_after),
                "issuer": c.issuer,
            })),
        }))
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let hash: [u8; 32] = sha2::Sha256::digest(token.trim().as_bytes()).into();
        let config = self.gw.config.load();
        // Compare with every token, without early exit.
        config
            .admin_tokens
            .iter()
            .fold(subtle::Choice::from(0), |acc, t| {
                acc | t.sha256.ct_eq(&hash)
            })
            .into()
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        session.set_keepalive(None);
                        return Err(error(413, "invalid_body", "body larger than 64 KiB"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(_) => return Err(invalid_body("cannot read the request body")),
            }
        }
    }

    fn create_link(&self, body: &[u8]) -> Response<Vec<u8>> {
        let b: LinkBody = match parse_body(body) {
            Ok(b) => b,
            Err(e) => return invalid_body(e),
        };
        let config = self.gw.config.load();
        if config.tenant(&b.tenant).is_none() {
            return error(400, "unknown_tenant", format!("no tenant `{}`", b.tenant));
        }
        if b.sub.is_empty() {
            return invalid_body("`sub` must not be empty");
        }
        let ttl = match b.ttl {
            None => crate::mint::DEFAULT_TTL,
            Some(TtlArg::Secs(s)) => Duration::from_secs(s),
            Some(TtlArg::Text(t)) => match crate::config::parse_duration(&t) {
                Ok(d) => d,
                Err(e) => return invalid_body(format!("`ttl`: {e}")),
            },
        };
        let form = match b.form.as_deref() {
            None | Some("path") => LinkForm::Path,
            Some("query") => LinkForm::Query,
            Some(_) => return invalid_body("`form` must be \"path\" or \"query\""),
        };
        let req = MintRequest {
            tenant: b.tenant,
            sub: b.sub,
            ttl,
            claims: b.claims.unwrap_or_default(),
            one_time: b.one_time.unwrap_or(false),
            redirect: b.redirect,
            host: b.host,
            form,
        };
        match crate::mint::mint(&config, &req, now()) {
            Ok(m) => json_response(
                201,
                &json!({"url": m.url, "token": m.token, "jti": m.jti, "expires_at": rfc3339(m.expires_at)}),
            ),
            Err(MintError::NoSigningKey(t)) => error(
                400,
                "no_signing_key",
                format!("tenant `{t}` has no HS* key: it signs its own links"),
            ),
            Err(MintError::UnknownTenant(t)) => {
                error(400, "unknown_tenant", format!("no tenant `{t}`"))
            }
            Err(MintError::BadTtl) => invalid_body("`ttl` must be between 1 second and 365 days"),
            Err(MintError::BadRedirect) => {
                invalid_body("`redirect` must be a path starting with a single /")
            }
            Err(MintError::BadHost(h)) => invalid_body(format!("`host`: `{h}` is not a host name")),
            Err(MintError::NoHost(t)) => {
                invalid_body(format!("`host`: tenant `{t}` has no domain; give one"))
            }
        }
    }

    async fn create_revocation(&self, body: &[u8]) -> Response<Vec<u8>> {
        let b: RevocationBody = match parse_body(body) {
            Ok(b) => b,
            Err(e) => return invalid_body(e),
        };
        let now = now();
        let before = match b.before {
            None => now,
            Some(TimeArg::Secs(s)) => s,
            Some(TimeArg::Text(t)) => match parse_rfc3339(&t) {
                Some(secs) => secs,
                None => return invalid_body("`before` must be RFC 3339 or Unix seconds"),
            },
        };
        let config = self.gw.config.load();
        let rev = match (b.jti, b.tenant, b.sub) {
            (Some(j), None, None) if !j.is_empty() => Revocation::Jti { jti: j },
            (None, Some(tenant), sub) => {
                if config.tenant(&tenant).is_none() {
                    return error(400, "unknown_tenant", format!("no tenant `{tenant}`"));
                }
                match sub {
                    Some(sub) if !sub.is_empty() => Revocation::Subject {
                        tenant,
                        sub,
                        before,
                    },
                    Some(_) => return invalid_body("`sub` must not be empty"),
                    None => Revocation::Tenant { tenant, before },
                }
            }
            _ => return invalid_body(
                "give one of {\"jti\"}, {\"tenant\",\"sub\",\"before\"?}, {\"tenant\",\"before\"?}",
            ),
        };
        match self.gw.store.add_revocation(&rev, now).await {
            Ok(id) => {
                self.gw.revocations.apply(&rev);
                self.gw
                    .metrics
                    .revocations
                    .set(self.gw.revocations.len() as i64);
                tracing::info!(revocation = id, "revocation recorded");
                let mut v = serde_json::to_value(&rev).unwrap_or(Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), id.into());
                }
                json_response(201, &v)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store revocation");
                error(503, "store_unavailable", "the store is not available")
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => {
                return json_response(200, &json!({"status": "ok"}));
            }
            (Method::GET, "/readyz") => {
                let ready = self.gw.ready.load(Ordering::Acquire) && self.gw.store.ping().await;
                return if ready {
                    json_response(200, &json!({"status": "ready"}))
                } else {
                    json_response(503, &json!({"status": "starting"}))
                };
            }
            (Method::GET, "/metrics") => {
                return respond(200, "text/plain; version=0.0.4", self.gw.metrics.render());
            }
            (Method::GET, "/v1/jwks.json") => {
                return respond(200, "application/json", self.gw.signer.jwks().to_vec());
            }
            _ => {}
        }
        // The body is read first (bounded) so that refusals keep the connection reusable.
        let body = match Self::read_body(session).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if !self.authorized(session) {
            return error(401, "unauthorized", "a valid bearer token is required");
        }
        match (method, path.as_str()) {
            (Method::POST, "/v1/links") => self.create_link(&body),
            (Method::POST, "/v1/revocations") => self.create_revocation(&body).await,
            (_, "/v1/links" | "/v1/revocations") => error(405, "method_not_allowed", "use POST"),
            (m, p) if p == "/v1/domains" || p.starts_with("/v1/domains/") => {
                self.domains_api(m, p, &body).await
            }
            _ => error(404, "not_found", "no such endpoint"),
        }
    }
}
