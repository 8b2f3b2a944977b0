//! The plain-HTTP listener: ACME HTTP-01 answers under `/.well-known/acme-challenge/`, a 308
//! to `https://` for served hosts, 421 `unknown_host` for the rest.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::gateway::Gateway;
use crate::metrics::Outcome;

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Store lookups for HTTP-01 tokens this node does not hold, running at once at most: a flood
/// of made-up tokens gets 404s rather than queueing work on the store.
const MAX_CHALLENGE_LOOKUPS: usize = 4;

/// The HTTP (port 80) application.
pub struct HttpRedirect {
    gw: Arc<Gateway>,
    lookups: tokio::sync::Semaphore,
}

impl HttpRedirect {
    /// The application over the shared gateway state.
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self {
            gw,
            lookups: tokio::sync::Semaphore::new(MAX_CHALLENGE_LOOKUPS),
        }
    }

    /// The HTTP-01 answer for `token`: this node's own orders first, then those of the other
    /// nodes sharing the store (the CA may reach any node behind the routing CNAME).
    async fn challenge_answer(&self, token: &str) -> Option<String> {
        if let Some(ka) = self.gw.acme_challenges.get(token) {
            return Some(ka.clone());
        }
        let _permit = self.lookups.try_acquire().ok()?;
        match self
            .gw
            .store
            .acme_challenge(token, crate::gateway::now())
            .await
        {
            Ok(ka) => ka,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up an HTTP-01 answer");
                None
            }
        }
    }
}

fn reply(
    status: u16,
    headers: &[(header::HeaderName, String)],
    body: Vec<u8>,
) -> Response<Vec<u8>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

/// True for a syntactically valid ACME token (base64url).
fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[async_trait]
impl ServeHttp for HttpRedirect {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path();
        if let Some(token) = path.strip_prefix(CHALLENGE_PREFIX) {
            self.gw.metrics.request(Outcome::AcmeChallenge);
            if valid_token(token) {
                if let Some(ka) = self.challenge_answer(token).await {
                    return reply(
                        200,
                        &[(header::CONTENT_TYPE, "application/octet-stream".into())],
                        ka.into_bytes(),
                    );
                }
            }
            return reply(
                404,
                &[(header::CONTENT_TYPE, "text/plain".into())],
                b"not found\n".to_vec(),
            );
        }
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host())
            .map(|h| crate::mint::split_host_port(h).0.to_ascii_lowercase());
        let served = host.as_deref().filter(|h| self.gw.hosts.contains_key(*h));
        let Some(host) = served else {
            self.gw.metrics.request(Outcome::Rejected);
            return reply(
                421,
                &[(header::CONTENT_TYPE, "application/json".into())],
                crate::pages::json_error("unknown_host", "This host is not served here."),
            );
        };
        self.gw.metrics.request(Outcome::RedirectHttps);
        let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let location = match self.gw.https_port {
            443 => format!("https://{host}{pq}"),
            p => format!("https://{host}:{p}{pq}"),
        };
        reply(308, &[(header::LOCATION, location)], Vec::new())
    }
}
