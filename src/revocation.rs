//! Revocations held in memory for the hot path: by `jti`, by subject and tenant-wide, each
//! with a `before` cut-off compared with the link's `iat`. Lookups take no global lock and
//! allocate nothing.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// One revocation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revocation {
    /// One link (and its sessions) by `jti`.
    Jti { jti: String },
    /// Every link and session of `sub` issued at or before `before` (Unix seconds).
    Subject {
        tenant: String,
        sub: String,
        before: i64,
    },
    /// Every link and session of the tenant issued at or before `before`.
    Tenant { tenant: String, before: i64 },
}

#[derive(Default)]
struct TenantRevocations {
    /// Tenant-wide cut-off; `i64::MIN` when none.
    all_before: AtomicI64,
    by_subject: DashMap<String, i64>,
}

/// The in-memory revocation set.
#[derive(Default)]
pub struct Revocations {
    jtis: DashMap<String, ()>,
    tenants: DashMap<String, TenantRevocations>,
    /// Set once anything is revoked: the common "nothing revoked" case then costs one load
    /// (`DashMap::is_empty` would visit every shard).
    any_jti: AtomicBool,
    any_tenant: AtomicBool,
}

impl Revocations {
    /// Adds `r`; later cut-offs replace earlier ones.
    pub fn apply(&self, r: &Revocation) {
        match r {
            Revocation::Jti { jti } => {
                self.jtis.insert(jti.clone(), ());
                self.any_jti.store(true, Ordering::Release);
            }
            Revocation::Subject {
                tenant,
                sub,
                before,
            } => {
                let t = self
                    .tenants
                    .entry(tenant.clone())
                    .or_insert_with(|| TenantRevocations {
                        all_before: AtomicI64::new(i64::MIN),
                        by_subject: DashMap::new(),
                    });
                let mut e = t.by_subject.entry(sub.clone()).or_insert(i64::MIN);
                *e = (*e).max(*before);
                self.any_tenant.store(true, Ordering::Release);
            }
            Revocation::Tenant { tenant, before } => {
                let t = self
                    .tenants
                    .entry(tenant.clone())
                    .or_insert_with(|| TenantRevocations {
                        all_before: AtomicI64::new(i64::MIN),
                        by_subject: DashMap::new(),
                    });
                t.all_before.fetch_max(*before, Ordering::Relaxed);
                self.any_tenant.store(true, Ordering::Release);
            }
        }
    }

    /// True when a link or session (tenant, subject, jti, iat) is covered by a revocation.
    pub fn is_revoked(&self, tenant: &str, sub: &str, jti: Option<&str>, iat: i64) -> bool {
        if let Some(j) = jti {
            if self.any_jti.load(Ordering::Acquire) && self.jtis.contains_key(j) {
                return true;
            }
        }
        if !self.any_tenant.load(Ordering::Acquire) {
            return false;
        }
        let Some(t) = self.tenants.get(tenant) else {
            return false;
        };
        if iat <= t.all_before.load(Ordering::Relaxed) {
            return true;
        }
        t.by_subject.get(sub).is_some_and(|b| iat <= *b)
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.jtis.len()
            + self
                .tenants
                .iter()
                .map(|t| t.by_subject.len() + 1)
                .sum::<usize>()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.jtis.is_empty() && self.tenants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs() {
        let r = Revocations::default();
        assert!(!r.is_revoked("a", "u", Some("j"), 5));
        r.apply(&Revocation::Tenant {
            tenant: "a".into(),
            before: 10,
        });
        assert!(r.is_revoked("a", "u", None, 10));
        assert!(!r.is_revoked("a", "u", None, 11));
        assert!(!r.is_revoked("b", "u", None, 0));
        r.apply(&Revocation::Subject {
            tenant: "b".into(),
            sub: "u".into(),
            before: 20,
        });
        assert!(r.is_revoked("b", "u", None, 0));
        assert!(!r.is_revoked("b", "v", None, 0));
        r.apply(&Revocation::Jti { jti: "j".into() });
        assert!(r.is_revoked("c", "x", Some("j"), 100));
    }
}
