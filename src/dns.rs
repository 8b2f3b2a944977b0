//! The two-CNAME checks: `_linkgate.<host> CNAME <token>.<verify_zone>` proves ownership,
//! `<host> CNAME <edge_target>` routes traffic. Queries go to the configured resolver with
//! caching off (a cached "missing" is never replayed), CNAME chains are followed, names are
//! compared case-insensitively, and every answer is explained in words.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use serde::Serialize;

/// Longest CNAME chain followed.
const MAX_CHAIN: usize = 8;

/// The resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct DnsSetupError(String);

/// What a check found for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    Missing,
    WrongValue,
    Ok,
}

impl RecordStatus {
    /// The metric label of this status.
    pub fn label(self) -> &'static str {
        match self {
            RecordStatus::Missing => "missing",
            RecordStatus::WrongValue => "wrong_value",
            RecordStatus::Ok => "ok",
        }
    }
}

/// One record of the admin API's domain object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecordView {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub value: String,
    pub status: String,
    pub seen: Option<String>,
}

/// The result of checking one CNAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordCheck {
    pub status: RecordStatus,
    /// The first CNAME target found (lower-case, no trailing dot).
    pub seen: Option<String>,
    /// The name has A/AAAA answers but no CNAME (looks proxied).
    pub addresses_without_cname: bool,
    /// A lookup failed (timeout, SERVFAIL), as opposed to "no record".
    pub error: Option<String>,
}

/// Both checks of a domain.
#[derive(Debug, Clone)]
pub struct DomainDns {
    pub ownership: RecordCheck,
    pub routing: RecordCheck,
}

/// Uncached DNS checks against the configured nameservers.
pub struct DnsChecker {
    resolver: TokioResolver,
    edge_target: String,
    verify_zone: String,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsChecker {
    /// A checker using `nameservers` (the system resolver when empty).
    pub fn new(
        nameservers: &[SocketAddr],
        edge_target: &str,
        verify_zone: &str,
    ) -> Result<Self, DnsSetupError> {
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.case_randomization = false;
        opts.preserve_intermediates = true;
        opts.ndots = 0;
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsSetupError(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    ns.connections = vec![udp, tcp];
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder
            .with_options(opts)
            .build()
            .map_err(|e| DnsSetupError(e.to_string()))?;
        Ok(Self {
            resolver,
            edge_target: normalize(edge_target),
            verify_zone: normalize(verify_zone),
        })
    }

    /// The ownership CNAME's target for `token`.
    pub fn ownership_target(&self, token: &str) -> String {
        format!("{token}.{}", self.verify_zone)
    }

    /// The routing CNAME's target.
    pub fn edge_target(&self) -> &str {
        &self.edge_target
    }

    /// The verify zone (hostnames inside it are refused).
    pub fn verify_zone(&self) -> &str {
        &self.verify_zone
    }

    /// Follows the CNAME chain from `name`; empty when `name` has no CNAME.
    async fn cname_chain(&self, name: &str) -> Result<Vec<String>, String> {
        let mut chain = Vec::new();
        let mut current = format!("{}.", normalize(name));
        for _ in 0..MAX_CHAIN {
            let lookup = match self
                .resolver
                .lookup(current.as_str(), RecordType::CNAME)
                .await
            {
                Ok(l) => l,
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => break,
                Err(e) => return Err(e.to_string()),
            };
            let next = lookup.answers().iter().find_map(|r| match &r.data {
                RData::CNAME(c) => Some(normalize(&c.0.to_ascii())),
                _ => None,
            });
            match next {
                Some(t) if !chain.contains(&t) => {
                    current = format!("{t}.");
                    chain.push(t);
                }
                _ => break,
            }
        }
        Ok(chain)
    }

    async fn has_addresses(&self, name: &str) -> bool {
        let fqdn = format!("{}.", normalize(name));
        for t in [RecordType::A, RecordType::AAAA] {
            if let Ok(l) = self.resolver.lookup(fqdn.as_str(), t).await {
                if l.answers()
                    .iter()
                    .any(|r| matches!(&r.data, RData::A(_) | RData::AAAA(_)))
                {
                    return true;
                }
            }
        }
        false
    }

    async fn check_one(&self, name: &str, expected: &str) -> RecordCheck {
        match self.cname_chain(name).await {
            Ok(chain) if chain.iter().any(|t| t == expected) => RecordCheck {
                status: RecordStatus::Ok,
                seen: chain.first().cloned(),
                addresses_without_cname: false,
                error: None,
            },
            Ok(chain) if chain.is_empty() => RecordCheck {
                status: RecordStatus::Missing,
                seen: None,
                addresses_without_cname: self.has_addresses(name).await,
                error: None,
            },
            Ok(chain) => RecordCheck {
                status: RecordStatus::WrongValue,
                seen: chain.first().cloned(),
                addresses_without_cname: false,
                error: None,
            },
            Err(e) => RecordCheck {
                status: RecordStatus::Missing,
                seen: None,
                addresses_without_cname: false,
                error: Some(e),
            },
        }
    }

    /// Checks both records of `hostname` with ownership `token`.
    pub async fn check(&self, hostname: &str, token: &str) -> DomainDns {
        let ownership_name = format!("_linkgate.{hostname}");
        let ownership_target = self.ownership_target(token);
        let (ownership, routing) = tokio::join!(
            self.check_one(&ownership_name, &ownership_target),
            self.check_one(hostname, &self.edge_target),
        );
        DomainDns { ownership, routing }
    }

    /// The records as the admin API shows them.
    pub fn views(&self, hostname: &str, token: &str, dns: Option<&DomainDns>) -> Vec<RecordView> {
        let view = |name: String, value: String, c: Option<&RecordCheck>| RecordView {
            kind: "CNAME".into(),
            name,
            value,
            status: c.map_or("missing", |c| c.status.label()).into(),
            seen: c.and_then(|c| c.seen.clone()),
        };
        vec![
            view(
                format!("_linkgate.{hostname}"),
                self.ownership_target(token),
                dns.map(|d| &d.ownership),
            ),
            view(
                hostname.to_string(),
                self.edge_target.clone(),
                dns.map(|d| &d.routing),
            ),
        ]
    }

    /// What the customer should do, in words; `None` when both records are right.
    pub fn explain(&self, hostname: &str, token: &str, dns: &DomainDns) -> Option<String> {
        let o = &dns.ownership;
        let r = &dns.routing;
        if let Some(e) = o.error.as_ref().or(r.error.as_ref()) {
            return Some(format!(
                "DNS lookup for {hostname} failed ({e}); will retry"
            ));
        }
        let target = self.ownership_target(token);
        match o.status {
            RecordStatus::Missing => {
                return Some(format!(
                    "add CNAME _linkgate.{hostname} → {target} at your DNS provider"
                ))
            }
            RecordStatus::WrongValue => {
                return Some(format!(
                    "_linkgate.{hostname} points to {} but must be a CNAME to {target}",
                    o.seen.as_deref().unwrap_or("?")
                ))
            }
            RecordStatus::Ok => {}
        }
        match r.status {
            RecordStatus::Ok => None,
            RecordStatus::Missing if r.addresses_without_cname => Some(format!(
                "{hostname} answers with A/AAAA records but no CNAME: it looks proxied (e.g. a CDN's proxy mode); turn proxying off and add CNAME {hostname} → {}",
                self.edge_target
            )),
            RecordStatus::Missing => Some(format!(
                "add CNAME {hostname} → {} at your DNS provider",
                self.edge_target
            )),
            RecordStatus::WrongValue => Some(format!(
                "{hostname} points to {} but must be a CNAME to {}",
                r.seen.as_deref().unwrap_or("?"),
                self.edge_target
            )),
        }
    }
}
