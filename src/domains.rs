//! Custom domains: the state machine of the contract's section 5 and its scheduler.
//!
//! `pending_ownership → pending_routing → issuing → active`, with `failed` (ACME attempt
//! failed; retried with exponential backoff) and `moved` (routing CNAME gone for several
//! checks: no renewal, still served until expiry). Every state change is written to the store
//! before it takes effect; certificates are published to the SNI map without restart.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use serde_json::{json, Value};

use crate::acme::{AcmeClient, Issued};
use crate::admin::rfc3339;
use crate::config::Config;
use crate::dns::{DnsChecker, DomainDns, RecordCheck, RecordStatus};
use crate::gateway::{now, Gateway, HostRoute};
use crate::metrics::DOMAIN_STATES;
use crate::store::{DomainRow, StoreError};
use crate::tls::certified_key_from_pem;

/// Consecutive checks without the routing CNAME before an active domain is `moved`.
const MOVED_AFTER: i64 = 3;
/// Longest retry backoff after failed orders.
const MAX_BACKOFF: i64 = 3600;
/// A renewed certificate is not renewed again for this long (seconds).
const MIN_RENEW_INTERVAL: i64 = 3600;
/// How long one node holds a hostname's issuance lock (seconds).
const LOCK_SECS: i64 = 600;

/// Why a domain request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    InvalidHostname(String),
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    #[error("`{0}` is already registered")]
    Taken(String),
    #[error("no domain `{0}`")]
    NotFound(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Owns custom domains: API operations, DNS checks, ACME orders, renewal.
pub struct DomainManager {
    gw: Arc<Gateway>,
    dns: DnsChecker,
    acme: AcmeClient,
    /// Identifies this process in the store's per-hostname lock.
    node: String,
    /// Hostnames with an order running in this process.
    issuing: DashMap<String, ()>,
    /// Hostnames with a check running in this process.
    checking: DashMap<String, ()>,
    check_interval: i64,
    renew_before: i64,
    /// The runtime of the scheduler, where orders run.
    runtime: OnceLock<tokio::runtime::Handle>,
}

fn jitter(secs: i64) -> i64 {
    let spread = (secs / 5).max(1);
    secs - spread + rand::random::<i64>().rem_euclid(2 * spread + 1)
}

/// Seconds between checks of a domain pending for `age` seconds: `check_interval`, ×4 after
/// an hour, ×16 after a day, at most hourly.
fn pending_interval(check_interval: i64, age: i64) -> i64 {
    let factor = if age > 86_400 {
        16
    } else if age > 3_600 {
        4
    } else {
        1
    };
    (check_interval * factor).min(3_600)
}

/// A customer hostname as stored: IDNA names to punycode, lower case, no trailing dot; no
/// wildcards, IP literals, `localhost`, nor the operator's own `edge_target` / `verify_zone`.
pub fn customer_hostname(
    raw: &str,
    edge_target: &str,
    verify_zone: &str,
) -> Result<String, DomainError> {
    if raw.len() > 253 {
        return Err(DomainError::InvalidHostname("hostname too long".into()));
    }
    let ascii = idna::domain_to_ascii(raw.trim())
        .map_err(|_| DomainError::InvalidHostname(format!("`{raw}` is not a valid hostname")))?;
    let h = crate::config::normalize_hostname(&ascii).map_err(DomainError::InvalidHostname)?;
    if h == "localhost" || h.ends_with(".localhost") {
        return Err(DomainError::InvalidHostname(format!(
            "`{h}` cannot be served"
        )));
    }
    if h == edge_target || h == verify_zone || h.ends_with(&format!(".{verify_zone}")) {
        return Err(DomainError::InvalidHostname(format!(
            "`{h}` belongs to the gateway operator"
        )));
    }
    Ok(h)
}

/// The stored form of a hostname taken from an API path (`/v1/domains/{hostname}`): percent-
/// decoded, then normalised like [`customer_hostname`], so a trailing dot, upper case or an
/// IDNA name find the domain registered as punycode. None for a name that cannot be stored.
pub fn path_hostname(raw: &str, edge_target: &str, verify_zone: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    customer_hostname(&decoded, edge_target, verify_zone).ok()
}

fn dns_result(c: &RecordCheck) -> &'static str {
    if c.error.is_some() {
        "error"
    } else {
        c.status.label()
    }
}

impl DomainManager {
    /// A manager for `config`'s `[acme]` and `[dns]` settings.
    pub fn new(gw: Arc<Gateway>, config: &Config) -> anyhow::Result<Self> {
        let dns = DnsChecker::new(
            &config.dns.nameservers,
            &config.dns.edge_target,
            &config.dns.verify_zone,
        )?;
        let acme = AcmeClient::new(config.acme.clone(), gw.store.clone());
        Ok(Self {
            gw,
            dns,
            acme,
            node: format!("{}-{:x}", std::process::id(), rand::random::<u32>()),
            issuing: DashMap::new(),
            checking: DashMap::new(),
            check_interval: config.dns.check_interval.as_secs().max(1) as i64,
            renew_before: config.acme.renew_before.as_secs() as i64,
            runtime: OnceLock::new(),
        })
    }

    /// The admin API's domain object.
    pub fn view(&self, d: &DomainRow) -> Value {
        let records: Value = serde_json::from_str(&d.records).unwrap_or_else(|_| json!([]));
        let certificate = match (d.not_before, d.not_after, &d.issuer) {
            (Some(nb), Some(na), Some(issuer)) if d.cert_pem.is_some() => json!({
                "not_before": rfc3339(nb),
                "not_after": rfc3339(na),
                "issuer": issuer,
            }),
            _ => Value::Null,
        };
        json!({
            "hostname": d.hostname,
            "tenant": d.tenant,
            "state": d.state,
            "records": records,
            "last_checked_at": d.last_checked_at.map(rfc3339),
            "last_error": d.last_error,
            "certificate": certificate,
        })
    }

    /// Webhook deliveries for a domain event (`data`: tenant, hostname, state, last_error,
    /// certificate).
    fn domain_events(&self, d: &DomainRow, event: &str) -> Vec<crate::store::NewDelivery> {
        let v = self.view(d);
        let data = json!({
            "tenant": d.tenant,
            "hostname": d.hostname,
            "state": d.state,
            "last_error": d.last_error,
            "certificate": v["certificate"],
        });
        crate::webhooks::events_for(&self.gw.config.load(), &d.tenant, event, data)
    }

    /// Checks and normalises a hostname a tenant asks for.
    pub fn validate_hostname(&self, raw: &str) -> Result<String, DomainError> {
        customer_hostname(raw, self.dns.edge_target(), self.dns.verify_zone())
    }

    /// A new domain in `pending_ownership` with a fresh ownership token.
    fn pending_row(&self, hostname: &str, tenant: &str, now: i64) -> DomainRow {
        let token: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        DomainRow {
            records: serde_json::to_string(&self.dns.views(hostname, &token, None))
                .unwrap_or_default(),
            hostname: hostname.to_string(),
            tenant: tenant.to_string(),
            token,
            state: "pending_ownership".into(),
            last_checked_at: None,
            last_error: None,
            cert_pem: None,
            key_pem: None,
            not_before: None,
            not_after: None,
            issuer: None,
            failures: 0,
            routing_misses: 0,
            next_check_at: now,
            renew_after: None,
            created_at: now,
            version: 0,
        }
    }

    /// Registers `hostname` for `tenant` in `pending_ownership`.
    pub async fn create(
        self: &Arc<Self>,
        hostname: &str,
        tenant: &str,
    ) -> Result<DomainRow, DomainError> {
        let h = self.validate_hostname(hostname)?;
        let config = self.gw.config.load();
        if config.tenant(tenant).is_none() {
            return Err(DomainError::UnknownTenant(tenant.to_string()));
        }
        if config.domains.iter().any(|d| d.hostname == h)
            || config.certificates.iter().any(|c| c.hostnames.contains(&h))
        {
            return Err(DomainError::Taken(h));
        }
        let row = self.pending_row(&h, tenant, now());
        if !self.gw.store.insert_domain(&row).await? {
            return Err(DomainError::Taken(h));
        }
        tracing::info!(hostname = %h, tenant, "domain registered; waiting for the ownership CNAME");
        self.refresh_gauge().await;
        Ok(row)
    }

    /// The stored form of a hostname from an API path; see [`path_hostname`].
    fn stored_name(&self, raw: &str) -> Option<String> {
        path_hostname(raw, self.dns.edge_target(), self.dns.verify_zone())
    }

    /// One domain, by any spelling of its name (see [`path_hostname`]).
    pub async fn get(&self, hostname: &str) -> Result<Option<DomainRow>, DomainError> {
        let Some(h) = self.stored_name(hostname) else {
            return Ok(None);
        };
        Ok(self.gw.store.domain(&h).await?)
    }

    /// Every stored domain.
    pub async fn list(&self) -> Result<Vec<DomainRow>, DomainError> {
        Ok(self.gw.store.domains().await?)
    }

    /// Deletes a domain and stops serving it at once.
    pub async fn delete(&self, hostname: &str) -> Result<(), DomainError> {
        let h = self
            .stored_name(hostname)
            .ok_or_else(|| DomainError::NotFound(hostname.to_string()))?;
        if !self.gw.store.delete_domain(&h).await? {
            return Err(DomainError::NotFound(h));
        }
        self.unpublish(&h);
        tracing::info!(hostname = %h, "domain deleted; no longer served");
        self.refresh_gauge().await;
        Ok(())
    }

    /// Runs a check now and returns the domain after it.
    pub async fn check_now(self: &Arc<Self>, hostname: &str) -> Result<DomainRow, DomainError> {
        let h = self
            .stored_name(hostname)
            .ok_or_else(|| DomainError::NotFound(hostname.to_string()))?;
        let row = self
            .gw
            .store
            .domain(&h)
            .await?
            .ok_or_else(|| DomainError::NotFound(h.clone()))?;
        self.process(row, true)
            .await
            .ok_or(DomainError::NotFound(h))
    }

    fn unpublish(&self, hostname: &str) {
        self.gw.certs.remove(hostname);
        self.gw.hosts.remove(hostname);
        let _ = self
            .gw
            .metrics
            .certificate_expiry
            .remove_label_values(&[hostname]);
    }

    /// Publishes a stored certificate for SNI and routing. At start-up (`deferred`) the chain
    /// is parsed on its first handshake; it was checked before it was stored.
    fn publish(&self, d: &DomainRow, deferred: bool) -> bool {
        let (Some(cert), Some(key), Some(not_after)) = (&d.cert_pem, &d.key_pem, d.not_after)
        else {
            return false;
        };
        if deferred {
            self.gw.certs.insert_deferred(&d.hostname, cert, key);
        } else {
            match certified_key_from_pem(cert.as_bytes(), key.as_bytes()) {
                Ok(loaded) => {
                    if let Err(e) = self.gw.certs.insert(&d.hostname, Arc::new(loaded)) {
                        tracing::error!(hostname = %d.hostname, error = %e, "certificate refused");
                        return false;
                    }
                }
                Err(e) => {
                    tracing::error!(hostname = %d.hostname, error = %e, "certificate unusable");
                    return false;
                }
            }
        }
        self.gw
            .hosts
            .insert(d.hostname.clone(), HostRoute::new(&d.hostname, &d.tenant));
        self.gw
            .metrics
            .certificate_expiry
            .with_label_values(&[&d.hostname])
            .set(not_after);
        true
    }

    /// Loads every stored certificate into the SNI map (before the listeners accept), and
    /// registers `[[domains]]` entries that have no static certificate.
    pub async fn load(&self) -> anyhow::Result<usize> {
        self.onboard_config_domains(&self.gw.config.load()).await?;
        let rows = self.gw.store.domains().await?;
        let served = rows.iter().filter(|d| self.publish(d, true)).count();
        self.refresh_gauge().await;
        Ok(served)
    }

    /// Stores a pending domain for each `[[domains]]` entry of `config` that no static
    /// certificate covers; rows already stored are kept as they are.
    async fn onboard_config_domains(&self, config: &Config) -> anyhow::Result<()> {
        let now = now();
        for d in &config.domains {
            if self.gw.certs.contains(&d.hostname) {
                continue;
            }
            let row = self.pending_row(&d.hostname, &d.tenant, now);
            self.gw.store.insert_domain(&row).await?;
        }
        Ok(())
    }

    /// Brings the stored domains in line with a reloaded config: a `[[domains]]` entry that
    /// went through ACME and is no longer listed (or is listed for another tenant) is deleted
    /// and stops being served, unless a static certificate now covers it; entries the new
    /// config adds (or moves to another tenant) are onboarded, DNS checks included.
    async fn apply_config_domains(&self, old: &Config, new: &Config) -> anyhow::Result<()> {
        for d in &old.domains {
            let listed = |c: &Config| c.domains.contains(d);
            let is_static = |c: &Config| c.static_domains().any(|s| s.hostname == d.hostname);
            if is_static(old) || listed(new) {
                continue;
            }
            match self.gw.store.domain(&d.hostname).await? {
                Some(row) if row.tenant == d.tenant => {
                    self.gw.store.delete_domain(&d.hostname).await?;
                    if !is_static(new) {
                        self.unpublish(&d.hostname);
                    }
                    tracing::info!(hostname = %d.hostname, tenant = %d.tenant, "no longer a [[domains]] entry for this tenant; deleted");
                }
                _ => {}
            }
        }
        self.onboard_config_domains(new).await
    }

    /// A stored certificate failed to parse at its first handshake (a damaged store row, say):
    /// the domain is not served, so it is due for a new order at once, with `last_error`
    /// saying why. The order still needs the routing record, as a renewal does.
    async fn reorder_unusable(&self, hostname: &str, why: &str) {
        let now = now();
        let Ok(Some(mut d)) = self.gw.store.domain(hostname).await else {
            return;
        };
        if d.state != "active" {
            return;
        }
        d.last_error = Some(format!(
            "the stored certificate is unusable ({why}); ordering a new one"
        ));
        d.renew_after = Some(now);
        d.next_check_at = now;
        match self.gw.store.update_domain(&d, &[]).await {
            Ok(true) => {
                self.unpublish(hostname);
                tracing::warn!(hostname, error = %why, "stored certificate unusable; ordering a new one");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(hostname, error = %e, "cannot mark the domain for a new order")
            }
        }
    }

    async fn refresh_gauge(&self) {
        let Ok(counts) = self.gw.store.domain_state_counts().await else {
            return;
        };
        let config = self.gw.config.load();
        let static_active = config.static_domains().count() as i64;
        for s in DOMAIN_STATES {
            let n = counts
                .iter()
                .find(|(state, _)| state == s)
                .map_or(0, |(_, n)| *n);
            let n = if s == "active" { n + static_active } else { n };
            self.gw.metrics.domains.with_label_values(&[s]).set(n);
        }
    }

    fn pending_interval(&self, d: &DomainRow, now: i64) -> i64 {
        jitter(pending_interval(self.check_interval, now - d.created_at))
    }

    fn count_dns(&self, dns: &DomainDns) {
        let m = &self.gw.metrics.dns_checks;
        m.with_label_values(&["ownership", dns_result(&dns.ownership)])
            .inc();
        m.with_label_values(&["routing", dns_result(&dns.routing)])
            .inc();
    }

    /// Checks DNS and moves the domain along; starts an order when it is due. Returns the
    /// domain as stored afterwards (None when it was deleted meanwhile). The result is
    /// written only over the row it was computed from: when an order or another check
    /// changed the domain during the DNS queries, their row stands and is returned.
    async fn process(self: &Arc<Self>, mut d: DomainRow, forced: bool) -> Option<DomainRow> {
        if self.issuing.contains_key(&d.hostname) {
            // The running order owns the row until it ends.
            return Some(d);
        }
        let now = now();
        let dns = self.dns.check(&d.hostname, &d.token).await;
        self.count_dns(&dns);
        d.records = serde_json::to_string(&self.dns.views(&d.hostname, &d.token, Some(&dns)))
            .unwrap_or_default();
        d.last_checked_at = Some(now);
        let explanation = self.dns.explain(&d.hostname, &d.token, &dns);
        let before = d.state.clone();
        let mut start_order = false;
        match d.state.as_str() {
            "pending_ownership" | "pending_routing" | "issuing" | "failed" => {
                if dns.ownership.status != RecordStatus::Ok {
                    d.state = "pending_ownership".into();
                    d.last_error = explanation;
                    d.next_check_at = now + self.pending_interval(&d, now);
                } else if dns.routing.status != RecordStatus::Ok {
                    d.state = "pending_routing".into();
                    d.last_error = explanation;
                    d.next_check_at = now + self.pending_interval(&d, now);
                } else if d.state == "failed" && now < d.next_check_at && !forced {
                    // Backing off after a failed order.
                } else {
                    if d.state != "issuing" {
                        d.last_error = None;
                    }
                    d.state = "issuing".into();
                    d.next_check_at = now + jitter(self.check_interval * 5);
                    start_order = true;
                }
            }
            "active" | "moved" => {
                if dns.routing.status == RecordStatus::Ok {
                    d.routing_misses = 0;
                    if d.state == "moved" {
                        tracing::info!(hostname = %d.hostname, "routing CNAME is back; domain active again");
                    }
                    d.state = "active".into();
                    // Ownership was proven once (the token is kept): renewal needs only the
                    // routing record, which the CA's HTTP-01 request follows.
                    if d.renew_after.is_some_and(|r| now >= r) {
                        start_order = true;
                    }
                } else {
                    d.routing_misses += 1;
                    if d.routing_misses >= MOVED_AFTER && d.state != "moved" {
                        tracing::warn!(hostname = %d.hostname, "routing CNAME gone for {MOVED_AFTER} checks: domain moved; no renewal, served until expiry");
                        d.state = "moved".into();
                        d.last_error = explanation;
                    }
                }
                d.next_check_at = now + jitter(self.check_interval * 5);
            }
            _ => {}
        }
        if before != d.state {
            tracing::info!(hostname = %d.hostname, from = %before, to = %d.state, reason = d.last_error.as_deref().unwrap_or("-"), "domain state changed");
        }
        match self.gw.store.update_domain(&d, &[]).await {
            Ok(true) => d.version += 1,
            Ok(false) => {
                // Deleted, re-registered or changed (by an order) meanwhile: this check's
                // result is stale; the stored row stands.
                tracing::debug!(hostname = %d.hostname, "domain changed during its check; result dropped");
                return match self.gw.store.domain(&d.hostname).await {
                    Ok(now_stored) => now_stored,
                    Err(_) => Some(d),
                };
            }
            Err(e) => {
                tracing::error!(hostname = %d.hostname, error = %e, "cannot store the domain check");
                return Some(d);
            }
        }
        if before != d.state {
            self.refresh_gauge().await;
        }
        if start_order {
            self.spawn_order(&d);
        }
        Some(d)
    }

    /// Starts an order for the registration `d` (its tenant and ownership token): the
    /// certificate is installed only if that registration still exists when it arrives.
    fn spawn_order(self: &Arc<Self>, d: &DomainRow) {
        if self.issuing.insert(d.hostname.clone(), ()).is_some() {
            return;
        }
        let me = self.clone();
        let (hostname, tenant, token) = (d.hostname.clone(), d.tenant.clone(), d.token.clone());
        let task = async move {
            me.order(&hostname, &tenant, &token).await;
            me.issuing.remove(&hostname);
        };
        match self.runtime.get() {
            Some(h) => {
                h.spawn(task);
            }
            None => {
                tokio::spawn(task);
            }
        }
    }

    /// Orders (or renews) the certificate of `hostname` under the store lock, for the
    /// registration of `tenant` with ownership `token`. If the domain was deleted or
    /// registered again (new token) while the order ran, the result is discarded.
    async fn order(self: &Arc<Self>, hostname: &str, tenant: &str, token: &str) {
        let store = &self.gw.store;
        let now = now();
        match store
            .lock_domain(hostname, &self.node, now + LOCK_SECS, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(hostname, "another node is ordering this certificate");
                return;
            }
            Err(e) => {
                tracing::error!(hostname, error = %e, "cannot take the issuance lock");
                return;
            }
        }
        let result = self.acme.issue(hostname, &self.gw.acme_challenges).await;
        let _ = store.unlock_domain(hostname, &self.node).await;
        match &result {
            Ok(_) => self.gw.metrics.acme_orders.with_label_values(&["ok"]).inc(),
            Err(_) => self
                .gw
                .metrics
                .acme_orders
                .with_label_values(&["error"])
                .inc(),
        }
        let ari = match &result {
            Ok(issued) => self.acme.renewal_time(&issued.chain_pem).await,
            Err(_) => None,
        };
        // A check can change the row while this one is written (optimistic concurrency);
        // read it again and retry, a few times at most.
        for _ in 0..5 {
            let mut d = match store.domain(hostname).await {
                Ok(Some(d)) if d.tenant == tenant && d.token == token => d,
                Ok(Some(_)) => {
                    tracing::warn!(
                        hostname,
                        tenant,
                        "domain registered again while ordering; result discarded"
                    );
                    return;
                }
                Ok(None) => {
                    tracing::info!(hostname, "domain deleted while ordering; result discarded");
                    return;
                }
                Err(e) => {
                    tracing::error!(hostname, error = %e, "cannot read the domain after its order");
                    return;
                }
            };
            let renewal = d.cert_pem.is_some();
            let (events, installed) = self.apply_order(&mut d, &result, ari);
            match store.update_domain(&d, &events).await {
                Ok(true) => {
                    if installed && self.publish(&d, false) {
                        // A DELETE between the write and the publish must not be undone.
                        match store.domain(hostname).await {
                            Ok(Some(row)) if row.token == token => {}
                            Ok(_) => self.unpublish(hostname),
                            Err(_) => {}
                        }
                        let renew_after = d.renew_after.map(rfc3339).unwrap_or_default();
                        tracing::info!(hostname, renewal, %renew_after, "certificate installed; domain active");
                    }
                    self.refresh_gauge().await;
                    return;
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(hostname, error = %e, "cannot store the order's result");
                    return;
                }
            }
        }
        tracing::error!(
            hostname,
            "domain kept changing; the order's result was not stored"
        );
    }

    /// Writes an order's outcome into `d`; returns the webhook deliveries to queue with it and
    /// whether a certificate was installed.
    fn apply_order(
        &self,
        d: &mut DomainRow,
        result: &Result<Issued, crate::acme::AcmeError>,
        ari: Option<i64>,
    ) -> (Vec<crate::store::NewDelivery>, bool) {
        let now = now();
        let renewal = d.cert_pem.is_some();
        match result {
            Ok(Issued {
                chain_pem,
                key_pem,
                loaded,
            }) => {
                let mut renew_after = ari.unwrap_or(loaded.not_after - self.renew_before);
                if renewal {
                    renew_after = renew_after.max(now + MIN_RENEW_INTERVAL);
                }
                d.cert_pem = Some(chain_pem.clone());
                d.key_pem = Some(key_pem.clone());
                d.not_before = Some(loaded.not_before);
                d.not_after = Some(loaded.not_after);
                d.issuer = Some(loaded.issuer.clone());
                d.renew_after = Some(renew_after);
                d.failures = 0;
                d.last_error = None;
                d.state = "active".into();
                d.next_check_at = now + jitter(self.check_interval * 5);
                let event = if renewal {
                    "certificate.renewed"
                } else {
                    "domain.active"
                };
                (self.domain_events(d, event), true)
            }
            Err(e) => {
                d.failures += 1;
                let backoff = (5i64 << (d.failures - 1).min(20)).min(MAX_BACKOFF);
                d.next_check_at = now + backoff;
                if renewal {
                    d.last_error = Some(format!("renewal failed: {e}; retrying in {backoff} s"));
                    d.renew_after = Some(now + backoff);
                } else {
                    d.state = "failed".into();
                    d.last_error = Some(format!("{e}; retrying in {backoff} s"));
                }
                tracing::warn!(hostname = %d.hostname, error = %e, retry_in_secs = backoff, "ACME order failed");
                let events = if renewal || d.failures > 1 {
                    Vec::new()
                } else {
                    self.domain_events(d, "domain.failed")
                };
                (events, false)
            }
        }
    }

    /// The scheduler: every second, processes the domains whose check is due.
    pub async fn run(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let limit = Arc::new(tokio::sync::Semaphore::new(32));
        let mut config = self.gw.config.load_full();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            // A reload (SIGHUP) may have added, dropped or moved `[[domains]]` entries.
            let current = self.gw.config.load_full();
            if !Arc::ptr_eq(&current, &config) {
                match self.apply_config_domains(&config, &current).await {
                    Ok(()) => {
                        config = current;
                        self.refresh_gauge().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot store domains of the reloaded config")
                    }
                }
            }
            for (hostname, why) in self.gw.certs.take_unusable() {
                self.reorder_unusable(&hostname, &why).await;
            }
            let due = match self.gw.store.due_domains(now(), 256).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read due domains");
                    continue;
                }
            };
            for d in due {
                if self.issuing.contains_key(&d.hostname)
                    || self.checking.insert(d.hostname.clone(), ()).is_some()
                {
                    continue;
                }
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let host = d.hostname.clone();
                    me.process(d, false).await;
                    me.checking.remove(&host);
                    drop(permit);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_hostnames() {
        let ok = |h: &str| customer_hostname(h, "edge.gw.test", "verify.gw.test");
        assert_eq!(ok("Links.Example.COM.").unwrap(), "links.example.com");
        assert_eq!(ok("bücher.example").unwrap(), "xn--bcher-kva.example");
        for bad in [
            "*.example.com",
            "10.0.0.1",
            "[::1]",
            "bad_name!.example",
            "localhost",
            "edge.gw.test",
            "abc.verify.gw.test",
            "-lead.example.test",
            "a..b.test",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_hostnames_find_the_stored_name() {
        let p = |h: &str| path_hostname(h, "edge.gw.test", "verify.gw.test");
        for spelling in [
            "links.example.com",
            "links.example.com.",
            "LINKS.Example.com.",
        ] {
            assert_eq!(
                p(spelling).as_deref(),
                Some("links.example.com"),
                "{spelling}"
            );
        }
        for spelling in [
            "bücher.example",
            "b%C3%BCcher.example",
            "b%c3%bccher.example.",
            "XN--BCHER-KVA.example",
        ] {
            assert_eq!(
                p(spelling).as_deref(),
                Some("xn--bcher-kva.example"),
                "{spelling}"
            );
        }
        for bad in [
            "",
            "%",
            "%ff.example",
            "a%2fb.example",
            "*.example",
            "edge.gw.test",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pending_checks_back_off_and_jitter() {
        assert_eq!(pending_interval(30, 10), 30);
        assert_eq!(pending_interval(30, 7_200), 120);
        assert_eq!(pending_interval(30, 2 * 86_400), 480);
        assert_eq!(pending_interval(600, 2 * 86_400), 3_600);
        for _ in 0..200 {
            let j = jitter(100);
            assert!((80..=120).contains(&j), "{j}");
        }
    }
}
