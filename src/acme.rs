//! ACME (RFC 8555) with `instant-acme`: one account per directory, created once and kept in
//! the store; HTTP-01 challenges answered by the plain-HTTP listener; a fresh P-256 key and
//! CSR per order; the issued chain checked to parse, match its key and cover the name before
//! it is returned; new orders rate-limited per account; renewal windows from ARI when offered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use dashmap::DashMap;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::Mutex;

use crate::config::AcmeConfig;
use crate::gateway::now;
use crate::store::Store;
use crate::tls::{certified_key_from_pem, LoadedCert};

/// Why an order failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("cannot reach the ACME server at {directory}: {detail}")]
    Unreachable { directory: String, detail: String },
    #[error("the ACME server refused the request: {0}")]
    Api(String),
    #[error("the CA could not validate the HTTP-01 challenge for {host}: {detail}")]
    Validation { host: String, detail: String },
    #[error("the ACME order did not complete: {0}")]
    Order(String),
    #[error("the issued certificate is not usable: {0}")]
    BadCertificate(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot prepare a key or CSR: {0}")]
    Key(String),
}

impl AcmeError {
    fn from_acme(directory: &str, e: instant_acme::Error) -> Self {
        match e {
            instant_acme::Error::Api(p) => AcmeError::Api(p.to_string()),
            other => {
                let detail = other.to_string();
                if detail.contains("connect")
                    || detail.contains("hyper")
                    || detail.contains("error sending")
                {
                    AcmeError::Unreachable {
                        directory: directory.to_string(),
                        detail,
                    }
                } else {
                    AcmeError::Order(detail)
                }
            }
        }
    }

    fn account_gone(&self) -> bool {
        matches!(self, AcmeError::Api(m) if m.contains("accountDoesNotExist") || m.contains("account") && m.contains("not"))
    }
}

/// A certificate obtained from the CA.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub loaded: LoadedCert,
}

/// How long a published HTTP-01 answer stays valid if its order never withdraws it.
const CHALLENGE_TTL_SECS: i64 = 600;

/// Removes challenge answers when an order ends, whatever the outcome.
struct ChallengeGuard<'a> {
    answers: &'a DashMap<String, String>,
    tokens: Vec<String>,
}

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.answers.remove(t);
        }
    }
}

/// The gateway's ACME client.
pub struct AcmeClient {
    config: AcmeConfig,
    store: Arc<dyn Store>,
    account: Mutex<Option<Arc<Account>>>,
    recent_orders: Mutex<VecDeque<Instant>>,
}

impl AcmeClient {
    /// A client for `config`'s directory; the account is loaded or created on first use.
    pub fn new(config: AcmeConfig, store: Arc<dyn Store>) -> Self {
        Self {
            config,
            store,
            account: Mutex::new(None),
            recent_orders: Mutex::new(VecDeque::new()),
        }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, AcmeError> {
        let r = match &self.config.ca_file {
            Some(ca) => instant_acme::Account::builder_with_root(ca),
            None => instant_acme::Account::builder(),
        };
        r.map_err(|e| AcmeError::from_acme(&self.config.directory, e))
    }

    /// The account: from memory, else from the store, else created (once) and stored.
    async fn account(&self, fresh: bool) -> Result<Arc<Account>, AcmeError> {
        let mut slot = self.account.lock().await;
        if !fresh {
            if let Some(a) = slot.as_ref() {
                return Ok(a.clone());
            }
            if let Some(json) = self.store.acme_account(&self.config.directory).await? {
                if let Ok(creds) = serde_json::from_str::<AccountCredentials>(&json) {
                    let a = self
                        .builder()?
                        .from_credentials(creds)
                        .await
                        .map_err(|e| AcmeError::from_acme(&self.config.directory, e))?;
                    let a = Arc::new(a);
                    *slot = Some(a.clone());
                    return Ok(a);
                }
            }
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, creds) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(|e| AcmeError::from_acme(&self.config.directory, e))?;
        let json = serde_json::to_string(&creds).map_err(|e| AcmeError::Order(e.to_string()))?;
        self.store
            .put_acme_account(&self.config.directory, &json, now())
            .await?;
        tracing::info!(directory = %self.config.directory, account = account.id(), "ACME account created");
        let a = Arc::new(account);
        *slot = Some(a.clone());
        Ok(a)
    }

    /// Waits until a new order keeps within `orders_per_minute` over any 60 s window.
    async fn rate_limit(&self, host: &str) {
        let window = Duration::from_secs(60);
        let max = self.config.orders_per_minute.max(1) as usize;
        loop {
            let wait = {
                let mut recent = self.recent_orders.lock().await;
                let now = Instant::now();
                while recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= window)
                {
                    recent.pop_front();
                }
                if recent.len() < max {
                    recent.push_back(now);
                    return;
                }
                window - now.duration_since(recent[0])
            };
            tracing::info!(
                hostname = host,
                wait_secs = wait.as_secs(),
                "ACME: order rate limit reached; waiting"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Orders a certificate for `host`, answering HTTP-01 through `answers`.
    pub async fn issue(
        &self,
        host: &str,
        answers: &DashMap<String, String>,
    ) -> Result<Issued, AcmeError> {
        self.rate_limit(host).await;
        let mut published = Vec::new();
        let result = self.issue_once(host, answers, &mut published).await;
        // Withdrawn from the other nodes whatever the outcome (a cancelled order's answers
        // expire on their own).
        for token in published {
            if let Err(e) = self.store.delete_acme_challenge(&token).await {
                tracing::warn!(hostname = host, error = %e, "cannot withdraw an HTTP-01 answer");
            }
        }
        result
    }

    async fn issue_once(
        &self,
        host: &str,
        answers: &DashMap<String, String>,
        published: &mut Vec<String>,
    ) -> Result<Issued, AcmeError> {
        let account = self.account(false).await?;
        match self.order(&account, host, answers, published).await {
            Err(e) if e.account_gone() => {
                tracing::warn!(
                    hostname = host,
                    "ACME: the CA no longer knows our account; registering again"
                );
                let account = self.account(true).await?;
                self.order(&account, host, answers, published).await
            }
            r => r,
        }
    }

    /// One order; HTTP-01 answers go into `answers` (this node) and the store (every node,
    /// their tokens added to `published`).
    async fn order(
        &self,
        account: &Account,
        host: &str,
        answers: &DashMap<String, String>,
        published: &mut Vec<String>,
    ) -> Result<Issued, AcmeError> {
        let dir = &self.config.directory;
        tracing::info!(hostname = host, "ACME: ordering a certificate");
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| AcmeError::from_acme(dir, e))?;
        let mut guard = ChallengeGuard {
            answers,
            tokens: Vec::new(),
        };
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut authz = a.map_err(|e| AcmeError::from_acme(dir, e))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    s => return Err(AcmeError::Order(format!("authorization is {s:?}"))),
                }
                let mut ch = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                    AcmeError::Order("the CA offered no http-01 challenge".into())
                })?;
                let token = ch.token.clone();
                let key_authorization = ch.key_authorization().as_str().to_string();
                answers.insert(token.clone(), key_authorization.clone());
                guard.tokens.push(token.clone());
                // The CA may reach any node behind the routing CNAME.
                let until = crate::gateway::now() + CHALLENGE_TTL_SECS;
                self.store
                    .put_acme_challenge(&token, &key_authorization, until)
                    .await?;
                published.push(token);
                tracing::info!(hostname = host, "ACME: answering the HTTP-01 challenge");
                ch.set_ready()
                    .await
                    .map_err(|e| AcmeError::from_acme(dir, e))?;
            }
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(90));
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(|e| AcmeError::from_acme(dir, e))?;
        if status != OrderStatus::Ready {
            let mut detail = format!("order is {status:?}");
            let mut authzs = order.authorizations();
            while let Some(Ok(a)) = authzs.next().await {
                if let Some(p) = a.challenges.iter().find_map(|c| c.error.as_ref()) {
                    detail = p.to_string();
                }
            }
            return Err(AcmeError::Validation {
                host: host.to_string(),
                detail,
            });
        }
        tracing::info!(
            hostname = host,
            "ACME: challenge validated; finalizing with a new P-256 key"
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| AcmeError::from_acme(dir, e))?;
        let chain_pem = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| AcmeError::from_acme(dir, e))?;
        drop(guard);
        let key_pem = key.serialize_pem();
        let loaded = certified_key_from_pem(chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| AcmeError::BadCertificate(e.to_string()))?;
        if !loaded.covers(host) {
            return Err(AcmeError::BadCertificate(format!(
                "it does not cover {host}"
            )));
        }
        tracing::info!(hostname = host, not_after = %crate::admin::rfc3339(loaded.not_after), issuer = %loaded.issuer, "ACME: certificate issued");
        Ok(Issued {
            chain_pem,
            key_pem,
            loaded,
        })
    }

    /// The CA's suggested renewal time (ARI, RFC 9773) for `chain_pem`, when it offers one:
    /// a point inside the suggested window.
    pub async fn renewal_time(&self, chain_pem: &str) -> Option<i64> {
        let account = self.account(false).await.ok()?;
        let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()?
            .ok()?;
        let id = instant_acme::CertificateIdentifier::try_from(&leaf).ok()?;
        match account.renewal_info(&id).await {
            Ok((info, _)) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp();
                let span = (end - start).max(0);
                Some(
                    start
                        + if span > 0 {
                            rand::random::<i64>().rem_euclid(span)
                        } else {
                            0
                        },
                )
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::debug!(error = %e, "ARI lookup failed; using renew_before");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use std::path::PathBuf;

    fn config(directory: String, ca_file: Option<PathBuf>, per_minute: u32) -> AcmeConfig {
        AcmeConfig {
            enabled: true,
            directory,
            contact: vec![],
            ca_file,
            renew_before: Duration::from_secs(30 * 86_400),
            orders_per_minute: per_minute,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn new_orders_keep_to_the_per_minute_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let client = AcmeClient::new(config("https://ca.invalid/dir".into(), None, 3), store);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            client.rate_limit("a.test").await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a burst up to the limit passes"
        );
        client.rate_limit("a.test").await;
        assert!(
            start.elapsed() >= Duration::from_secs(60),
            "the fourth order in a minute waits for the window"
        );
    }

    /// A minimal HTTPS ACME directory offering ARI, served by a real TLS listener.
    async fn ari_server(ca_dir: &std::path::Path) -> (String, PathBuf) {
        use http_body_util::Full;
        use hyper::service::service_fn;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let ca_file = ca_dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let server_cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let b = base.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let b = b.clone();
                        async move {
                            let (status, retry, body) = if req.uri().path() == "/dir" {
                                (
                                    200,
                                    false,
                                    serde_json::json!({
                                        "newNonce": format!("{b}/nonce"),
                                        "newAccount": format!("{b}/account"),
                                        "newOrder": format!("{b}/order"),
                                        "renewalInfo": format!("{b}/ari"),
                                    })
                                    .to_string(),
                                )
                            } else if req.uri().path().starts_with("/ari/") {
                                (200, true, r#"{"suggestedWindow":{"start":"2030-01-01T00:00:00Z","end":"2030-01-02T00:00:00Z"}}"#.to_string())
                            } else {
                                (404, false, String::new())
                            };
                            let mut resp = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json");
                            if retry {
                                resp = resp.header("retry-after", "21600");
                            }
                            Ok::<_, std::convert::Infallible>(
                                resp.body(Full::new(bytes::Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (base, ca_file)
    }

    #[tokio::test]
    async fn ari_window_is_used_when_the_ca_offers_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (base, ca_file) = ari_server(dir.path()).await;
        let directory = format!("{base}/dir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        // A stored account: loading it needs only the directory, no registration.
        let account_key = rcgen::KeyPair::generate().unwrap();
        let creds = serde_json::json!({
            "id": format!("{base}/account/1"),
            "key_pkcs8": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, account_key.serialize_der()),
            "directory": directory,
        });
        store
            .put_acme_account(&directory, &creds.to_string(), 0)
            .await
            .unwrap();
        let client = AcmeClient::new(config(directory, Some(ca_file), 10), store);
        // A certificate with an authority key identifier, as CAs issue them.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["links.example.test".to_string()]).unwrap();
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        let at = client.renewal_time(&leaf.pem()).await.expect("ARI offered");
        let (start, end) = (1_893_456_000, 1_893_542_400); // 2030-01-01 .. 2030-01-02
        assert!(
            (start..end).contains(&at),
            "{at} inside the suggested window"
        );
    }
}
