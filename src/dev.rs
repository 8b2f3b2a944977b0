//! `linkgate dev`: the quick start. Writes development secrets and a self-signed certificate
//! for `localhost` into `./.linkgate-dev` (once), starts an upstream that shows the identity
//! headers it receives, prints a ready-to-open magic link, and serves `conf/dev.toml`.

use std::path::Path;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

use crate::config::Config;
use crate::mint::{LinkForm, MintRequest};
use crate::pages::escape;

/// The embedded development configuration.
pub const DEV_CONFIG: &str = include_str!("../conf/dev.toml");
const DEV_DIR: &str = ".linkgate-dev";
const ECHO_ADDR: &str = "127.0.0.1:8081";

/// An upstream that answers every request with a page listing what the gateway sent.
pub struct EchoUpstream;

#[async_trait]
impl ServeHttp for EchoUpstream {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let mut rows = String::new();
        for (k, v) in req.headers.iter() {
            let name = k.as_str();
            if name.starts_with("x-linkgate-")
                || name.starts_with("x-forwarded-")
                || name == "cookie"
            {
                let mut shown = String::from_utf8_lossy(v.as_bytes()).into_owned();
                if name == "x-linkgate-assertion" {
                    if let Some(p) = shown
                        .split('.')
                        .nth(1)
                        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                    {
                        shown = format!(
                            "{}…\n(payload: {})",
                            &shown[..24.min(shown.len())],
                            String::from_utf8_lossy(&p)
                        );
                    }
                }
                rows.push_str(&format!(
                    "<tr><th>{}</th><td><pre>{}</pre></td></tr>",
                    escape(name),
                    escape(&shown)
                ));
            }
        }
        let body = format!(
            "<!doctype html><meta charset=utf-8><title>upstream</title><h1>Upstream received {} {}</h1><table>{rows}</table>",
            escape(req.method.as_str()),
            escape(req.uri.path())
        )
        .into_bytes();
        Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

fn ensure_secret(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        let hex: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        crate::tls::write_private(path, hex.as_bytes())?;
    }
    Ok(())
}

/// Prepares the development directory and returns the validated configuration plus the
/// echo upstream service.
pub fn prepare() -> anyhow::Result<(Config, Service<EchoUpstream>)> {
    let dir = Path::new(DEV_DIR);
    std::fs::create_dir_all(dir)?;
    ensure_secret(&dir.join("session.key"))?;
    ensure_secret(&dir.join("tenant-dev.key"))?;
    crate::tls::ensure_dev_certificate(dir)?;
    let config = Config::parse(DEV_CONFIG, Path::new("conf/dev.toml"))
        .map_err(|e| anyhow::anyhow!("embedded dev config: {e}"))?;
    let mut claims = serde_json::Map::new();
    claims.insert("email".into(), "dev@example.com".into());
    claims.insert("name".into(), "Dev User".into());
    let link = crate::mint::mint(
        &config,
        &MintRequest {
            tenant: "dev".into(),
            sub: "dev-user".into(),
            ttl: crate::mint::DEFAULT_TTL,
            claims,
            one_time: false,
            redirect: None,
            host: None,
            form: LinkForm::Path,
        },
        crate::gateway::now(),
    )?;
    let mut echo = Service::new("dev upstream".to_string(), EchoUpstream);
    echo.add_tcp(ECHO_ADDR);
    eprintln!(
        "\nlinkgate dev: open this magic link (self-signed certificate for localhost; accept it or use curl -k):\n\n  {}\n\nadmin API: http://{} (bearer token: dev-admin-token), metrics: http://{}/metrics\n",
        link.url, config.server.admin_listen, config.server.admin_listen
    );
    Ok((config, echo))
}
