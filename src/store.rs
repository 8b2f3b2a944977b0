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

/// The operations the gateway needs from durable storage.
#[async_trait]
pub trait Store: Send + Sync {
    /// Marks `jti` redeemed; true only for the first caller on any node.
    async fn redeem_once(
        &self,
        jti: &str,
        tenant: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError>;
    /// True when `jti` was redeemed before.
    async fn is_redeemed(&self, jti: &str) -> Result<bool, StoreError>;
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
}

/// The embedded SQLite store (one file, WAL mode).
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS redeemed_links (
    jti TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    expires_at INTEGER NOT NULL
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
CREATE TABLE IF NOT EXISTS signing_keys (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    kid TEXT NOT NULL,
    pkcs8 BLOB NOT NULL
);
";

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
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
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
    ) -> Result<bool, StoreError> {
        let (jti, tenant) = (jti.to_string(), tenant.to_string());
        self.with(move |c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO redeemed_links (jti, tenant, expires_at) VALUES (?1, ?2, ?3)",
                params![jti, tenant, expires_at],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn is_redeemed(&self, jti: &str) -> Result<bool, StoreError> {
        let jti = jti.to_string();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT 1 FROM redeemed_links WHERE jti = ?1",
                params![jti],
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
        let id = id.to_string();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT claims FROM session_claims WHERE id = ?1 AND expires_at > ?2",
                params![id, now],
                |r| r.get(0),
            )
            .optional()?)
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
                "DELETE FROM redeemed_links WHERE expires_at < ?1",
                params![now - 86_400],
            )?;
            c.execute(
                "DELETE FROM session_claims WHERE expires_at < ?1",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redeem_is_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/linkgate.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert!(s.redeem_once("j1", "acme", 100).await.unwrap());
            assert!(!s.redeem_once("j1", "acme", 100).await.unwrap());
            assert!(s.is_redeemed("j1").await.unwrap());
            let id = s
                .add_revocation(&Revocation::Jti { jti: "x".into() }, 5)
                .await
                .unwrap();
            assert!(id > 0);
            let (kid, key) = s.signing_key("a", b"first").await.unwrap();
            assert_eq!((kid.as_str(), key.as_slice()), ("a", &b"first"[..]));
        }
        let s = SqliteStore::open(&path).unwrap();
        assert!(!s.redeem_once("j1", "acme", 100).await.unwrap());
        let revs = s.revocations_since(0).await.unwrap();
        assert_eq!(revs[0].1, Revocation::Jti { jti: "x".into() });
        let (kid, key) = s.signing_key("b", b"second").await.unwrap();
        assert_eq!(
            (kid.as_str(), key.as_slice()),
            ("a", &b"first"[..]),
            "first key kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "database not readable by others");
    }
}
