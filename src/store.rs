//! Durable state: redeemed one-time links, revocations, server-side session claims and the
//! gateway's signing key. [`Store`] is the narrow interface every caller uses; each operation
//! is atomic on its own (e.g. "redeem this jti once"), so another backend (PostgreSQL) can be
//! added without touching callers. [`SqliteStore`] is the embedded default.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use crate::revocation::Revocation;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// One custom domain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRow {
    pub hostname: String,
    pub tenant: String,
    /// Ownership token (the first label of the ownership CNAME's target).
    pub token: String,
    /// One of the contract's states.
    pub state: String,
    /// The last DNS check's records, as the admin API's JSON array.
    pub records: String,
    pub last_checked_at: Option<i64>,
    pub last_error: Option<String>,
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub issuer: Option<String>,
    /// Consecutive failed ACME attempts.
    pub failures: i64,
    /// Consecutive checks that did not see the routing CNAME.
    pub routing_misses: i64,
    /// When the scheduler looks at this domain next (Unix seconds).
    pub next_check_at: i64,
    /// When renewal is due (Unix seconds).
    pub renew_after: Option<i64>,
    pub created_at: i64,
    /// Bumped by every [`Store::update_domain`]; an update is written only over the version
    /// it was read at.
    pub version: i64,
}

const DOMAIN_COLUMNS: &str =
    "hostname, tenant, token, state, records, last_checked_at, last_error, \
    cert_pem, key_pem, not_before, not_after, issuer, failures, routing_misses, next_check_at, \
    renew_after, created_at, version";

fn domain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DomainRow> {
    Ok(DomainRow {
        hostname: r.get(0)?,
        tenant: r.get(1)?,
        token: r.get(2)?,
        state: r.get(3)?,
        records: r.get(4)?,
        last_checked_at: r.get(5)?,
        last_error: r.get(6)?,
        cert_pem: r.get(7)?,
        key_pem: r.get(8)?,
        not_before: r.get(9)?,
        not_after: r.get(10)?,
        issuer: r.get(11)?,
        failures: r.get(12)?,
        routing_misses: r.get(13)?,
        next_check_at: r.get(14)?,
        renew_after: r.get(15)?,
        created_at: r.get(16)?,
        version: r.get(17)?,
    })
}

/// A webhook delivery to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// `webhook-id`: stable across retries.
    pub msg_id: String,
    pub tenant: String,
    pub url: String,
    pub event: String,
    pub body: String,
}

/// A queued webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub msg: NewDelivery,
    pub attempts: i64,
    pub created_at: i64,
}

fn enqueue(
    tx: &rusqlite::Transaction<'_>,
    events: &[NewDelivery],
    now: i64,
) -> rusqlite::Result<()> {
    for e in events {
        tx.execute(
            "INSERT INTO webhook_outbox (msg_id, tenant, url, event, body, next_attempt_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![e.msg_id, e.tenant, e.url, e.event, e.body, now],
        )?;
    }
    Ok(())
}

/// The operations the gateway needs from durable storage.
#[async_trait]
pub trait Store: Send + Sync {
    /// Marks `tenant`'s `jti` redeemed; true only for the first caller on any node (`jti`s are
    /// the tenant's own: another tenant's equal `jti` is another link). `events` are queued
    /// in the same transaction, only when this call redeems.
    async fn redeem_once(
        &self,
        jti: &str,
        tenant: &str,
        expires_at: i64,
        events: &[NewDelivery],
    ) -> Result<bool, StoreError>;
    /// Queues webhook deliveries.
    async fn enqueue_webhooks(&self, events: &[NewDelivery]) -> Result<(), StoreError>;
    /// Up to `limit` deliveries whose attempt time has come.
    async fn due_deliveries(&self, now: i64, limit: usize) -> Result<Vec<Delivery>, StoreError>;
    /// Removes a delivered (or abandoned) delivery.
    async fn finish_delivery(&self, id: i64) -> Result<(), StoreError>;
    /// Records a failed attempt and when to try again.
    async fn retry_delivery(
        &self,
        id: i64,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), StoreError>;
    /// True when `tenant`'s `jti` was redeemed before.
    async fn is_redeemed(&self, jti: &str, tenant: &str) -> Result<bool, StoreError>;
    /// Records a revocation; returns its sequence number.
    async fn add_revocation(&self, r: &Revocation, now: i64) -> Result<i64, StoreError>;
    /// Revocations with a sequence number above `after`, oldest first.
    async fn revocations_since(&self, after: i64) -> Result<Vec<(i64, Revocation)>, StoreError>;
    /// Keeps a session's claims server-side (too large for the cookie).
    async fn put_session_claims(
        &self,
        id: &str,
        tenant: &str,
        claims_json: &str,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// Claims stored by [`Store::put_session_claims`], if present and not expired.
    async fn session_claims(&self, id: &str, now: i64) -> Result<Option<String>, StoreError>;
    /// Publishes an ACME HTTP-01 answer to every node (the CA may ask any of them), until
    /// `expires_at` or [`Store::delete_acme_challenge`].
    async fn put_acme_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// The answer for an HTTP-01 `token`, if published and not expired.
    async fn acme_challenge(&self, token: &str, now: i64) -> Result<Option<String>, StoreError>;
    /// Withdraws an HTTP-01 answer (its order ended).
    async fn delete_acme_challenge(&self, token: &str) -> Result<(), StoreError>;
    /// The gateway's assertion signing key: `candidate` is stored if none exists yet, and the
    /// stored key (the same on every node) is returned as (kid, PKCS#8 DER).
    async fn signing_key(
        &self,
        kid: &str,
        candidate: &[u8],
    ) -> Result<(String, Vec<u8>), StoreError>;
    /// Deletes rows that can no longer matter.
    async fn prune(&self, now: i64) -> Result<(), StoreError>;
    /// True when the store answers.
    async fn ping(&self) -> bool;
    /// Adds a domain; false when the hostname is taken.
    async fn insert_domain(&self, d: &DomainRow) -> Result<bool, StoreError>;
    /// Replaces the row `d` was read from and queues `events` in the same transaction, only
    /// when that row is still there unchanged: same hostname, tenant, token and version. The
    /// stored version becomes `d.version + 1`. False (nothing written) when the domain was
    /// deleted, re-registered (new token) or updated by another writer since it was read.
    async fn update_domain(
        &self,
        d: &DomainRow,
        events: &[NewDelivery],
    ) -> Result<bool, StoreError>;
    /// Removes a domain; false when there was none.
    async fn delete_domain(&self, hostname: &str) -> Result<bool, StoreError>;
    /// One domain.
    async fn domain(&self, hostname: &str) -> Result<Option<DomainRow>, StoreError>;
    /// Every domain, by hostname.
    async fn domains(&self) -> Result<Vec<DomainRow>, StoreError>;
    /// Number of domains in each state.
    async fn domain_state_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Up to `limit` domains whose `next_check_at` has come.
    async fn due_domains(&self, now: i64, limit: usize) -> Result<Vec<DomainRow>, StoreError>;
    /// Takes the per-hostname issuance lock for `owner` until `until`; false when another
    /// node holds it.
    async fn lock_domain(
        &self,
        hostname: &str,
        owner: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Releases the lock if `owner` holds it.
    async fn unlock_domain(&self, hostname: &str, owner: &str) -> Result<(), StoreError>;
    /// Stored ACME account credentials (JSON) for a directory URL.
    async fn acme_account(&self, directory: &str) -> Result<Option<String>, StoreError>;
    /// Stores (replacing) ACME account credentials for a directory URL.
    async fn put_acme_account(
        &self,
        directory: &str,
        credentials: &str,
        now: i64,
    ) -> Result<(), StoreError>;
}

/// The embedded SQLite store (one file, WAL mode).
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS redeemed_jtis (
    tenant TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, jti)
);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS session_claims (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    claims TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS domains (
    hostname TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    records TEXT NOT NULL,
    last_checked_at INTEGER,
    last_error TEXT,
    cert_pem TEXT,
    key_pem TEXT,
    not_before INTEGER,
    not_after INTEGER,
    issuer TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    routing_misses INTEGER NOT NULL DEFAULT 0,
    next_check_at INTEGER NOT NULL DEFAULT 0,
    renew_after INTEGER,
    created_at INTEGER NOT NULL,
    lock_owner TEXT,
    lock_until INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS domains_due ON domains (next_check_at);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_attempt_at);
CREATE TABLE IF NOT EXISTS acme_accounts (
    directory TEXT PRIMARY KEY,
    credentials TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acme_challenges (
    token TEXT PRIMARY KEY,
    key_authorization TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    kid TEXT NOT NULL,
    pkcs8 BLOB NOT NULL
);
";

/// Brings a database made by an older version up to [`SCHEMA`]; each step is a no-op once
/// done.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_version: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('domains') WHERE name = 'version'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_version {
        conn.execute_batch("ALTER TABLE domains ADD COLUMN version INTEGER NOT NULL DEFAULT 0")?;
    }
    // `redeemed_links` keyed one-time `jti`s without their tenant, so one tenant's link could
    // use up another's with the same `jti`: its rows move to `redeemed_jtis`.
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS redeemed_links (jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, \
         expires_at INTEGER NOT NULL);
         INSERT OR IGNORE INTO redeemed_jtis (tenant, jti, expires_at)
             SELECT tenant, jti, expires_at FROM redeemed_links;
         DROP TABLE redeemed_links;
         COMMIT;",
    )?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating when absent, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        if !path.exists() {
            crate::tls::write_private(path, b"").map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The text `sql` selects for `key` (`?1`) from a row not expired at `now` (`?2`).
    async fn unexpired_text(
        &self,
        sql: &'static str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.with(move |c| {
            Ok(c.query_row(sql, params![key, now], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn redeem_once(
        &self,
        jti: &str,
        tenant: &str,
        expires_at: i64,
        events: &[NewDelivery],
    ) -> Result<bool, StoreError> {
        let (jti, tenant, events) = (jti.to_string(), tenant.to_string(), events.to_vec());
        self.with(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO redeemed_jtis (jti, tenant, expires_at) VALUES (?1, ?2, ?3)",
                params![jti, tenant, expires_at],
            )?;
            if n == 1 {
                enqueue(&tx, &events, crate::gateway::now())?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    async fn enqueue_webhooks(&self, events: &[NewDelivery]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            enqueue(&tx, &events, crate::gateway::now())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn due_deliveries(&self, now: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, msg_id, tenant, url, event, body, attempts, created_at FROM webhook_outbox \
                 WHERE next_attempt_at <= ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, limit as i64], |r| {
                Ok(Delivery {
                    id: r.get(0)?,
                    msg: NewDelivery {
                        msg_id: r.get(1)?,
                        tenant: r.get(2)?,
                        url: r.get(3)?,
                        event: r.get(4)?,
                        body: r.get(5)?,
                    },
                    attempts: r.get(6)?,
                    created_at: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn finish_delivery(&self, id: i64) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute("DELETE FROM webhook_outbox WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    async fn retry_delivery(
        &self,
        id: i64,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let error = error.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3 WHERE id = ?1",
                params![id, next_attempt_at, error],
            )?;
            Ok(())
        })
        .await
    }

    async fn is_redeemed(&self, jti: &str, tenant: &str) -> Result<bool, StoreError> {
        let (jti, tenant) = (jti.to_string(), tenant.to_string());
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT 1 FROM redeemed_jtis WHERE tenant = ?1 AND jti = ?2",
                params![tenant, jti],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
        .await
    }

    async fn add_revocation(&self, r: &Revocation, now: i64) -> Result<i64, StoreError> {
        let body = serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO revocations (body, created_at) VALUES (?1, ?2)",
                params![body, now],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn revocations_since(&self, after: i64) -> Result<Vec<(i64, Revocation)>, StoreError> {
        self.with(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT id, body FROM revocations WHERE id > ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![after], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, body) = row?;
                let rev = serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("revocation {id}: {e}")))?;
                out.push((id, rev));
            }
            Ok(out)
        })
        .await
    }

    async fn put_session_claims(
        &self,
        id: &str,
        tenant: &str,
        claims_json: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let (id, tenant, claims) = (id.to_string(), tenant.to_string(), claims_json.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO session_claims (id, tenant, claims, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, tenant, claims, expires_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn session_claims(&self, id: &str, now: i64) -> Result<Option<String>, StoreError> {
        self.unexpired_text(
            "SELECT claims FROM session_claims WHERE id = ?1 AND expires_at > ?2",
            id,
            now,
        )
        .await
    }

    async fn put_acme_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let (token, ka) = (token.to_string(), key_authorization.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO acme_challenges (token, key_authorization, expires_at) VALUES (?1, ?2, ?3)",
                params![token, ka, expires_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn acme_challenge(&self, token: &str, now: i64) -> Result<Option<String>, StoreError> {
        self.unexpired_text(
            "SELECT key_authorization FROM acme_challenges WHERE token = ?1 AND expires_at > ?2",
            token,
            now,
        )
        .await
    }

    async fn delete_acme_challenge(&self, token: &str) -> Result<(), StoreError> {
        let token = token.to_string();
        self.with(move |c| {
            c.execute(
                "DELETE FROM acme_challenges WHERE token = ?1",
                params![token],
            )?;
            Ok(())
        })
        .await
    }

    async fn signing_key(
        &self,
        kid: &str,
        candidate: &[u8],
    ) -> Result<(String, Vec<u8>), StoreError> {
        let (kid, candidate) = (kid.to_string(), candidate.to_vec());
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO signing_keys (slot, kid, pkcs8) VALUES (1, ?1, ?2)",
                params![kid, candidate],
            )?;
            let row = tx.query_row(
                "SELECT kid, pkcs8 FROM signing_keys WHERE slot = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn prune(&self, now: i64) -> Result<(), StoreError> {
        self.with(move |c| {
            // One-time links stay recorded well past their expiry (clock skew, leeway).
            c.execute(
                "DELETE FROM redeemed_jtis WHERE expires_at < ?1",
                params![now - 86_400],
            )?;
            c.execute(
                "DELETE FROM session_claims WHERE expires_at < ?1",
                params![now],
            )?;
            c.execute(
                "DELETE FROM acme_challenges WHERE expires_at < ?1",
                params![now],
            )?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> bool {
        self.with(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
            .is_ok()
    }

    async fn insert_domain(&self, d: &DomainRow) -> Result<bool, StoreError> {
        let d = d.clone();
        self.with(move |c| {
            let n = c.execute(
                &format!("INSERT OR IGNORE INTO domains ({DOMAIN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"),
                params![d.hostname, d.tenant, d.token, d.state, d.records, d.last_checked_at, d.last_error,
                    d.cert_pem, d.key_pem, d.not_before, d.not_after, d.issuer, d.failures, d.routing_misses,
                    d.next_check_at, d.renew_after, d.created_at, d.version],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn update_domain(
        &self,
        d: &DomainRow,
        events: &[NewDelivery],
    ) -> Result<bool, StoreError> {
        let (d, events) = (d.clone(), events.to_vec());
        self.with(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE domains SET state = ?4, records = ?5, last_checked_at = ?6, \
                 last_error = ?7, cert_pem = ?8, key_pem = ?9, not_before = ?10, not_after = ?11, issuer = ?12, \
                 failures = ?13, routing_misses = ?14, next_check_at = ?15, renew_after = ?16, version = version + 1 \
                 WHERE hostname = ?1 AND tenant = ?2 AND token = ?3 AND version = ?17",
                params![d.hostname, d.tenant, d.token, d.state, d.records, d.last_checked_at, d.last_error,
                    d.cert_pem, d.key_pem, d.not_before, d.not_after, d.issuer, d.failures, d.routing_misses,
                    d.next_check_at, d.renew_after, d.version],
            )?;
            if n == 1 {
                enqueue(&tx, &events, crate::gateway::now())?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    async fn delete_domain(&self, hostname: &str) -> Result<bool, StoreError> {
        let h = hostname.to_string();
        self.with(move |c| {
            Ok(c.execute("DELETE FROM domains WHERE hostname = ?1", params![h])? == 1)
        })
        .await
    }

    async fn domain(&self, hostname: &str) -> Result<Option<DomainRow>, StoreError> {
        let h = hostname.to_string();
        self.with(move |c| {
            Ok(c.query_row(
                &format!("SELECT {DOMAIN_COLUMNS} FROM domains WHERE hostname = ?1"),
                params![h],
                domain_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn domains(&self) -> Result<Vec<DomainRow>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {DOMAIN_COLUMNS} FROM domains ORDER BY hostname"
            ))?;
            let rows = stmt.query_map([], domain_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn domain_state_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT state, COUNT(*) FROM domains GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn due_domains(&self, now: i64, limit: usize) -> Result<Vec<DomainRow>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {DOMAIN_COLUMNS} FROM domains WHERE next_check_at <= ?1 ORDER BY next_check_at LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![now, limit as i64], domain_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn lock_domain(
        &self,
        hostname: &str,
        owner: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (h, o) = (hostname.to_string(), owner.to_string());
        self.with(move |c| {
            let n = c.execute(
                "UPDATE domains SET lock_owner = ?2, lock_until = ?3 \
                 WHERE hostname = ?1 AND (lock_until < ?4 OR lock_owner = ?2 OR lock_owner IS NULL)",
                params![h, o, until, now],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn unlock_domain(&self, hostname: &str, owner: &str) -> Result<(), StoreError> {
        let (h, o) = (hostname.to_string(), owner.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE domains SET lock_owner = NULL, lock_until = 0 WHERE hostname = ?1 AND lock_owner = ?2",
                params![h, o],
            )?;
            Ok(())
        })
        .await
    }

    async fn acme_account(&self, directory: &str) -> Result<Option<String>, StoreError> {
        let d = directory.to_string();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT credentials FROM acme_accounts WHERE directory = ?1",
                params![d],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    async fn put_acme_account(
        &self,
        directory: &str,
        credentials: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (d, cr) = (directory.to_string(), credentials.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO acme_accounts (directory, credentials, created_at) VALUES (?1, ?2, ?3)",
                params![d, cr, now],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acme_challenges_are_shared_until_withdrawn_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let (a, b) = (
            SqliteStore::open(&path).unwrap(),
            SqliteStore::open(&path).unwrap(),
        );
        a.put_acme_challenge("tok", "tok.thumb", 100).await.unwrap();
        assert_eq!(
            b.acme_challenge("tok", 99).await.unwrap().as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(b.acme_challenge("tok", 100).await.unwrap(), None, "expired");
        assert_eq!(b.acme_challenge("other", 1).await.unwrap(), None);
        a.delete_acme_challenge("tok").await.unwrap();
        assert_eq!(b.acme_challenge("tok", 1).await.unwrap(), None, "withdrawn");
        a.put_acme_challenge("old", "x", 5).await.unwrap();
        a.prune(10).await.unwrap();
        assert_eq!(a.acme_challenge("old", 1).await.unwrap(), None, "pruned");
    }

    #[tokio::test]
    async fn redeemed_links_of_an_earlier_version_are_kept_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE redeemed_links (jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, \
                 expires_at INTEGER NOT NULL);
                 INSERT INTO redeemed_links VALUES ('j1', 'acme', 100);",
            )
            .unwrap();
        }
        for _ in 0..2 {
            let s = SqliteStore::open(&path).unwrap();
            assert!(s.is_redeemed("j1", "acme").await.unwrap());
            assert!(!s.is_redeemed("j1", "other").await.unwrap());
            assert!(!s.redeem_once("j1", "acme", 100, &[]).await.unwrap());
        }
    }

    #[tokio::test]
    async fn redeem_is_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/linkgate.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            let ev = NewDelivery {
                msg_id: "msg_1".into(),
                tenant: "acme".into(),
                url: "https://hooks.example/x".into(),
                event: "link.redeemed".into(),
                body: "{}".into(),
            };
            assert!(s
                .redeem_once("j1", "acme", 100, std::slice::from_ref(&ev))
                .await
                .unwrap());
            assert!(!s
                .redeem_once("j1", "acme", 100, std::slice::from_ref(&ev))
                .await
                .unwrap());
            let due = s.due_deliveries(i64::MAX, 10).await.unwrap();
            assert_eq!(due.len(), 1, "only the redeeming call queues its event");
            assert_eq!(due[0].msg, ev);
            s.retry_delivery(due[0].id, i64::MAX, "down").await.unwrap();
            assert!(s.due_deliveries(i64::MAX - 1, 10).await.unwrap().is_empty());
            assert!(s.is_redeemed("j1", "acme").await.unwrap());
            // The same jti is another tenant's own link.
            assert!(!s.is_redeemed("j1", "other").await.unwrap());
            assert!(s.redeem_once("j1", "other", 100, &[]).await.unwrap());
            let id = s
                .add_revocation(&Revocation::Jti { jti: "x".into() }, 5)
                .await
                .unwrap();
            assert!(id > 0);
            let (kid, key) = s.signing_key("a", b"first").await.unwrap();
            assert_eq!((kid.as_str(), key.as_slice()), ("a", &b"first"[..]));
        }
        let s = SqliteStore::open(&path).unwrap();
        assert!(!s.redeem_once("j1", "acme", 100, &[]).await.unwrap());
        assert_eq!(
            s.due_deliveries(i64::MAX, 10).await.unwrap().len(),
            1,
            "outbox survives reopen"
        );
        let revs = s.revocations_since(0).await.unwrap();
        assert_eq!(revs[0].1, Revocation::Jti { jti: "x".into() });
        let (kid, key) = s.signing_key("b", b"second").await.unwrap();
        assert_eq!(
            (kid.as_str(), key.as_slice()),
            ("a", &b"first"[..]),
            "first key kept"
        );
        let row = domain_row("links.example.test", "acme", "t");
        assert!(s.insert_domain(&row).await.unwrap());
        assert!(!s.insert_domain(&row).await.unwrap(), "hostname taken");
        assert!(s.lock_domain(&row.hostname, "a", 100, 10).await.unwrap());
        assert!(
            !s.lock_domain(&row.hostname, "b", 100, 10).await.unwrap(),
            "held by a"
        );
        assert!(
            s.lock_domain(&row.hostname, "b", 200, 101).await.unwrap(),
            "expired"
        );
        let mut changed = row.clone();
        changed.state = "active".into();
        assert!(s.update_domain(&changed, &[]).await.unwrap());
        assert_eq!(
            s.domain(&row.hostname).await.unwrap().unwrap().state,
            "active"
        );
        assert_eq!(s.due_domains(0, 10).await.unwrap().len(), 1);
        assert!(s.delete_domain(&row.hostname).await.unwrap());
        assert!(
            !s.update_domain(&changed, &[]).await.unwrap(),
            "deleted stays deleted"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "database not readable by others");
    }

    fn domain_row(hostname: &str, tenant: &str, token: &str) -> DomainRow {
        DomainRow {
            hostname: hostname.into(),
            tenant: tenant.into(),
            token: token.into(),
            state: "pending_ownership".into(),
            records: "[]".into(),
            last_checked_at: None,
            last_error: None,
            cert_pem: None,
            key_pem: None,
            not_before: None,
            not_after: None,
            issuer: None,
            failures: 0,
            routing_misses: 0,
            next_check_at: 0,
            renew_after: None,
            created_at: 1,
            version: 0,
        }
    }

    #[tokio::test]
    async fn stale_domain_writers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("d.db")).unwrap();
        let h = "links.stale.test";
        assert!(s.insert_domain(&domain_row(h, "acme", "t1")).await.unwrap());

        // Two writers read the same version; the second one to write loses.
        let mut order = s.domain(h).await.unwrap().unwrap();
        let mut check = order.clone();
        order.state = "active".into();
        order.cert_pem = Some("CERT".into());
        assert!(s.update_domain(&order, &[]).await.unwrap());
        check.state = "issuing".into();
        assert!(
            !s.update_domain(&check, &[]).await.unwrap(),
            "a writer holding an older version overwrote a newer row"
        );
        let stored = s.domain(h).await.unwrap().unwrap();
        assert_eq!(
            (stored.state.as_str(), stored.cert_pem.as_deref()),
            ("active", Some("CERT"))
        );
        assert_eq!(stored.version, order.version + 1);

        // Deleted and registered again (same version number, other tenant and token): a
        // writer of the old registration cannot touch the new one.
        let mut old = stored.clone();
        assert!(s.delete_domain(h).await.unwrap());
        let mut again = domain_row(h, "other", "t2");
        again.version = old.version;
        assert!(s.insert_domain(&again).await.unwrap());
        old.cert_pem = Some("OLD".into());
        assert!(!s.update_domain(&old, &[]).await.unwrap());
        old.tenant = "other".into();
        assert!(
            !s.update_domain(&old, &[]).await.unwrap(),
            "same tenant, other token"
        );
        let stored = s.domain(h).await.unwrap().unwrap();
        assert_eq!(stored, again, "the new registration was changed");
    }

    #[tokio::test]
    async fn domains_table_without_version_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE domains (hostname TEXT PRIMARY KEY, tenant TEXT NOT NULL, \
                 token TEXT NOT NULL, state TEXT NOT NULL, records TEXT NOT NULL, \
                 last_checked_at INTEGER, last_error TEXT, cert_pem TEXT, key_pem TEXT, \
                 not_before INTEGER, not_after INTEGER, issuer TEXT, \
                 failures INTEGER NOT NULL DEFAULT 0, routing_misses INTEGER NOT NULL DEFAULT 0, \
                 next_check_at INTEGER NOT NULL DEFAULT 0, renew_after INTEGER, \
                 created_at INTEGER NOT NULL, lock_owner TEXT, lock_until INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO domains (hostname, tenant, token, state, records, created_at) \
                 VALUES ('links.old.test', 'acme', 't', 'active', '[]', 1);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let mut d = s.domain("links.old.test").await.unwrap().unwrap();
        assert_eq!(d.version, 0);
        d.state = "moved".into();
        assert!(s.update_domain(&d, &[]).await.unwrap());
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.domain("links.old.test").await.unwrap().unwrap().version,
            1
        );
    }
}
