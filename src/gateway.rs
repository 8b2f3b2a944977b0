//! The gateway's shared state: tenants prepared for the hot path, the host map, certificates,
//! session sealer, revocations, store, assertion signer and metrics. Built once in `serve`
//! and shared by every service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde_json::{Map, Value};

use crate::assertion::AssertionSigner;
use crate::config::{Branding, Config, ConfirmMode, TenantConfig};
use crate::link::{KeyError, TenantKeys};
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::session::SessionSealer;
use crate::store::Store;
use crate::tls::CertStore;
use crate::upstream::UpstreamPool;

/// The hasher of the maps the hot path reads: hostnames, tenant ids, session nonces. Their
/// keys come through the config or the admin API or are random, and client input only looks
/// them up; foldhash is seeded per process, so colliding keys cannot be prepared in advance.
/// It costs a fraction of SipHash on these short keys.
pub type FastHasher = foldhash::fast::RandomState;

/// Bounds a cache whose entries carry their insertion number: when `map` holds `max` entries
/// or more, drops those inserted before the last `max - max / 8` (entry `seq` about to be
/// added). One pass every `max / 8` inserts: a constant cost per insert, and the entries in use
/// stay, where a wholesale clear would send every one of them back through the slow path at once.
pub fn drop_oldest<K, V, S>(
    map: &DashMap<K, V, S>,
    max: usize,
    seq: u64,
    seq_of: impl Fn(&V) -> u64,
) where
    K: Eq + std::hash::Hash,
    S: std::hash::BuildHasher + Clone,
{
    if map.len() >= max {
        let drop = (max / 8).max(1);
        let oldest_kept = seq.saturating_sub(max.saturating_sub(drop) as u64);
        map.retain(|_, v| seq_of(v) >= oldest_kept);
    }
}

/// Tenant id -> tenant.
pub type TenantMap = HashMap<String, Arc<Tenant>, FastHasher>;
/// Served hostname -> its route.
pub type HostMap = DashMap<String, Arc<HostRoute>, FastHasher>;

/// Where a served hostname goes, with what each request to it needs built once.
pub struct HostRoute {
    /// The hostname, lower-case.
    pub name: Box<str>,
    /// Id of the tenant serving it.
    pub tenant: Box<str>,
    /// `name` as the `X-Forwarded-Host` value.
    pub forwarded_host: http::HeaderValue,
}

impl HostRoute {
    /// The route of `name` (lower-case) to `tenant`.
    pub fn new(name: &str, tenant: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            tenant: tenant.into(),
            forwarded_host: http::HeaderValue::from_str(name)
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
        })
    }
}

/// A tenant as the hot path needs it: keys prepared, header names lower-cased.
pub struct Tenant {
    pub id: String,
    pub keys: TenantKeys,
    pub upstream: UpstreamPool,
    pub upstream_tls: bool,
    pub public_paths: Vec<String>,
    pub login_url: Option<String>,
    pub confirm: ConfirmMode,
    pub session_ttl: Duration,
    /// (claim, header name) pairs applied to forwarded requests.
    pub headers: Vec<(String, http::HeaderName)>,
    /// Lower-case, `-`-separated names of the `headers` map (for stripping).
    pub strip_names: Vec<String>,
    pub branding: Option<Branding>,
}

impl Tenant {
    /// Prepares `t`'s keys and upstream pool.
    pub fn new(t: &TenantConfig) -> Result<Self, KeyError> {
        let keys = TenantKeys::new(&t.keys)?;
        let headers = t
            .headers
            .iter()
            .filter_map(|(claim, h)| {
                http::HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(|n| (claim.clone(), n))
            })
            .collect::<Vec<_>>();
        let strip_names = headers
            .iter()
            .map(|(_, h)| h.as_str().replace('_', "-"))
            .collect();
        Ok(Self {
            id: t.id.clone(),
            keys,
            upstream: UpstreamPool::new(t.upstream.iter().copied()),
            upstream_tls: t.upstream_tls,
            public_paths: t.public_paths.clone(),
            login_url: t.login_url.clone(),
            confirm: t.confirm,
            session_ttl: t.session_ttl,
            headers,
            strip_names,
            branding: t.branding.clone(),
        })
    }

    /// For unit tests: tenant `id` forwarding to `upstream`, with one HS256 key (`kid` "k",
    /// all-zero secret) and the `headers` map given.
    #[cfg(test)]
    pub(crate) fn for_test(
        id: &str,
        upstream: std::net::SocketAddr,
        headers: &[(&str, &str)],
    ) -> Self {
        use crate::config::{KeyAlg, KeyConfig, KeyMaterial, Secret};
        Self::new(&TenantConfig {
            id: id.into(),
            upstream: vec![upstream],
            upstream_tls: false,
            public_paths: vec![],
            login_url: None,
            confirm: ConfirmMode::OneTime,
            session_ttl: Duration::from_secs(60),
            headers: headers
                .iter()
                .map(|(c, h)| (c.to_string(), h.to_string()))
                .collect(),
            keys: vec![KeyConfig {
                kid: "k".into(),
                alg: KeyAlg::HS256,
                material: KeyMaterial::Secret(Secret(vec![0; 32])),
            }],
            branding: None,
            webhooks: vec![],
        })
        .expect("an HS256 key of 32 bytes")
    }

    /// True when `path` (normalised) is under one of `public_paths`.
    pub fn is_public(&self, path: &str) -> bool {
        self.public_paths
            .iter()
            .any(|p| crate::paths::prefix_matches(p, path))
    }
}

/// Everything the services share.
pub struct Gateway {
    pub config: ArcSwap<Config>,
    pub cookie_name: String,
    pub sealer: SessionSealer,
    pub tenants: ArcSwap<TenantMap>,
    /// Served hostname -> route (tenant id).
    pub hosts: HostMap,
    pub certs: Arc<CertStore>,
    pub revocations: Revocations,
    /// Id of the last stored revocation applied to `revocations` at start-up: where the
    /// housekeeping loop goes on reading (rows other nodes add later have larger ids).
    pub revocations_applied: AtomicI64,
    pub store: Arc<dyn Store>,
    pub signer: AssertionSigner,
    pub metrics: Arc<Metrics>,
    /// Port of the HTTPS listener (for redirects and minted URLs).
    pub https_port: u16,
    /// ACME HTTP-01 token -> key authorization.
    pub acme_challenges: DashMap<String, String>,
    /// Server-side claims of sessions whose claims do not fit a cookie.
    /// Keyed by the random id the cookie carries; bounded like the session cache.
    pub claims_cache: crate::session::SessionCache<Arc<Map<String, Value>>>,
    /// Session cookies already opened.
    pub session_cache: crate::session::SessionCache<crate::proxy::OpenSession>,
    /// Requests being handled by the proxy (for draining on SIGTERM).
    pub in_flight: Arc<AtomicUsize>,
    /// Set on SIGTERM: responses stop offering keep-alive.
    pub draining: AtomicBool,
    /// Set once the listeners accept connections.
    pub ready: AtomicBool,
}

impl Gateway {
    /// The route of `host` (lower-case, no port) and the tenant serving it.
    pub fn route(&self, host: &str) -> Option<(Arc<HostRoute>, Arc<Tenant>)> {
        let route = self.hosts.get(host)?.clone();
        let tenant = self.tenants.load().get(&*route.tenant).cloned()?;
        Some((route, tenant))
    }

    /// The tenant with this id.
    pub fn tenant(&self, id: &str) -> Option<Arc<Tenant>> {
        self.tenants.load().get(id).cloned()
    }
}

/// Counts one in-flight request for as long as it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request in `counter`.
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Current Unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
