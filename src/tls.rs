//! TLS termination: the certificate store (SNI -> certificate), the rustls resolver that reads
//! it at every handshake, and the checks a chain passes before it is published.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::metrics::Metrics;

/// Why a certificate chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate found in the PEM text")]
    NoCertificate,
    #[error("no private key found in the PEM text")]
    NoKey,
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the private key is not usable: {0}")]
    Key(String),
    #[error("the private key does not match the certificate")]
    Mismatch,
    #[error("the certificate does not cover `{0}`")]
    NotCovering(String),
}

/// A parsed chain ready to serve, plus the facts about its leaf we report.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// Leaf validity end, Unix seconds.
    pub not_after: i64,
    /// Leaf validity start, Unix seconds.
    pub not_before: i64,
    /// Leaf issuer, as a distinguished-name string.
    pub issuer: String,
    /// DNS names in the leaf's subjectAltName.
    pub dns_names: Vec<String>,
}

impl LoadedCert {
    /// True when the leaf's names cover `hostname` (exact, or a one-label wildcard).
    pub fn covers(&self, hostname: &str) -> bool {
        self.dns_names.iter().any(|n| {
            n == hostname
                || n.strip_prefix("*.").is_some_and(|suffix| {
                    hostname
                        .split_once('.')
                        .is_some_and(|(_, rest)| rest == suffix)
                })
        })
    }
}

/// Parses a PEM chain and key, checks they match, and reads the leaf's facts.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCert, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let leaf = certs.first().ok_or(CertError::NoCertificate)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| CertError::NoKey)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let (not_before, not_after, issuer, dns_names) = leaf_facts(leaf)?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) => {}
        // Some key types cannot report their public key; accept those.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(CertError::Mismatch),
    }
    Ok(LoadedCert {
        key: Arc::new(ck),
        not_after,
        not_before,
        issuer,
        dns_names,
    })
}

fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(i64, i64, String, Vec<String>), CertError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| CertError::Parse(e.to_string()))?;
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
        cert.issuer().to_string(),
        names,
    ))
}

/// A certificate as held by the store: parsed, or (loaded from the database at start-up)
/// kept as PEM until its first handshake, so start-up with many domains parses nothing.
enum Slot {
    Ready(Arc<LoadedCert>),
    /// Behind an `Arc` so that a parse can tell whether the slot was replaced meanwhile.
    Deferred(Arc<DeferredPem>),
}

/// A stored chain and key not parsed yet.
struct DeferredPem {
    chain: Box<str>,
    key: Box<str>,
}

/// Certificates served by SNI. Readers take an `Arc` clone per handshake; writers replace
/// entries while the server runs.
#[derive(Default)]
pub struct CertStore {
    by_host: DashMap<String, Slot>,
    /// Stored certificates that failed to parse at their first handshake (hostname -> why),
    /// until the domain manager takes them to order new ones.
    unusable: DashMap<String, String>,
}

impl CertStore {
    /// Publishes `cert` for `hostname`, after checking it covers the name.
    pub fn insert(&self, hostname: &str, cert: Arc<LoadedCert>) -> Result<(), CertError> {
        if !cert.covers(hostname) {
            return Err(CertError::NotCovering(hostname.to_string()));
        }
        self.by_host.insert(hostname.to_string(), Slot::Ready(cert));
        Ok(())
    }

    /// Publishes a chain that was checked when it was issued and stored, parsing it on its
    /// first use. A chain that no longer parses is dropped then (and logged).
    pub fn insert_deferred(&self, hostname: &str, chain_pem: &str, key_pem: &str) {
        self.by_host.insert(
            hostname.to_string(),
            Slot::Deferred(Arc::new(DeferredPem {
                chain: chain_pem.into(),
                key: key_pem.into(),
            })),
        );
    }

    /// Stops serving `hostname`; the next handshake for it fails.
    pub fn remove(&self, hostname: &str) {
        self.by_host.remove(hostname);
    }

    /// The certificate for `hostname` (lower-case), if any; parses a deferred one (outside
    /// the map's lock).
    pub fn get(&self, hostname: &str) -> Option<Arc<LoadedCert>> {
        let pem = match &*self.by_host.get(hostname)? {
            Slot::Ready(c) => return Some(c.clone()),
            Slot::Deferred(p) => p.clone(),
        };
        let parsed = certified_key_from_pem(pem.chain.as_bytes(), pem.key.as_bytes());
        self.settle(hostname, &pem, parsed)
    }

    /// Stores the outcome of parsing `pem`, unless the slot no longer holds `pem` (replaced by
    /// a renewal or removed by a delete while it was parsed): then that newer state stands.
    fn settle(
        &self,
        hostname: &str,
        pem: &Arc<DeferredPem>,
        parsed: Result<LoadedCert, CertError>,
    ) -> Option<Arc<LoadedCert>> {
        let same = |slot: &Slot| matches!(slot, Slot::Deferred(p) if Arc::ptr_eq(p, pem));
        match parsed {
            Ok(c) if c.covers(hostname) => {
                let c = Arc::new(c);
                let mut slot = self.by_host.get_mut(hostname)?;
                if same(&slot) {
                    *slot = Slot::Ready(c.clone());
                    return Some(c);
                }
            }
            other => {
                let why = other
                    .err()
                    .map_or("does not cover the name".to_string(), |e| e.to_string());
                if self
                    .by_host
                    .remove_if(hostname, |_, slot| same(slot))
                    .is_some()
                {
                    tracing::error!(hostname, error = %why, "stored certificate unusable; not served");
                    self.unusable.insert(hostname.to_string(), why);
                    return None;
                }
            }
        }
        // Replaced while parsing: serve what is there now.
        self.get(hostname)
    }

    /// Hostnames whose stored certificate turned out unusable since the last call, and why.
    pub fn take_unusable(&self) -> Vec<(String, String)> {
        let hosts: Vec<String> = self.unusable.iter().map(|e| e.key().clone()).collect();
        hosts
            .into_iter()
            .filter_map(|h| self.unusable.remove(&h))
            .collect()
    }

    /// True when a certificate is published for `hostname`.
    pub fn contains(&self, hostname: &str) -> bool {
        self.by_host.contains_key(hostname)
    }

    /// Number of names served.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// True when nothing is served.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// The rustls resolver: picks the certificate by SNI from the [`CertStore`]; no SNI or an
/// unknown one aborts the handshake.
pub struct SniResolver {
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
}

impl SniResolver {
    /// A resolver reading `store`.
    pub fn new(store: Arc<CertStore>, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SniResolver({} names)", self.store.len())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = hello.server_name().and_then(|name| {
            if let Some(slot) = self.store.by_host.get(name) {
                if let Slot::Ready(c) = &*slot {
                    return Some(c.key.clone());
                }
            }
            // Deferred (parsed now, once) or a name sent in upper case.
            self.store
                .get(&name.to_ascii_lowercase())
                .map(|c| c.key.clone())
        });
        if found.is_none() {
            self.metrics.tls_unknown_sni.inc();
        }
        found
    }
}

/// The SNI a connection's handshake carried, attached to the connection's TLS digest.
#[derive(Debug)]
pub struct HandshakeSni(pub Box<str>);

/// Records the SNI of each completed handshake so the proxy can compare it with `Host`.
pub struct HandshakeCallbacks {
    metrics: Arc<Metrics>,
}

impl HandshakeCallbacks {
    /// Callbacks counting handshakes into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

#[async_trait]
impl TlsAccept for HandshakeCallbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        self.metrics.tls_ok.inc();
        let name = tls.server_name()?;
        Some(Arc::new(HandshakeSni(name.to_ascii_lowercase().into())))
    }
}

/// Makes (once) a self-signed development certificate for `localhost` in `dir`, returning
/// the certificate and key paths.
pub fn ensure_dev_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("localhost.pem");
    let key_path = dir.join("localhost-key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "linkgate development");
    let cert = params.self_signed(&key)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())?;
    Ok((cert_path, key_path))
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_and_checks_cover() {
        let (c, k) = self_signed(&["links.acme.test", "*.wild.test"]);
        let lc = certified_key_from_pem(c.as_bytes(), k.as_bytes()).unwrap();
        assert!(lc.covers("links.acme.test"));
        assert!(lc.covers("a.wild.test"));
        assert!(!lc.covers("a.b.wild.test"));
        assert!(!lc.covers("other.test"));
        let store = CertStore::default();
        assert!(store.insert("other.test", Arc::new(lc.clone())).is_err());
        store.insert("links.acme.test", Arc::new(lc)).unwrap();
        assert!(store.contains("links.acme.test"));
        store.remove("links.acme.test");
        assert!(store.is_empty());
    }

    #[test]
    fn deferred_certificates_parse_on_first_use() {
        let (c, k) = self_signed(&["late.test"]);
        let store = CertStore::default();
        store.insert_deferred("late.test", &c, &k);
        assert!(store.contains("late.test"));
        let first = store.get("late.test").expect("parses");
        assert!(
            Arc::ptr_eq(&first, &store.get("late.test").unwrap()),
            "parsed once"
        );
        store.insert_deferred("wrong.test", &c, &k);
        assert!(
            store.get("wrong.test").is_none(),
            "a chain not covering the name is dropped"
        );
        assert!(!store.contains("wrong.test"));
    }

    #[test]
    fn mismatched_key_refused() {
        let (c, _) = self_signed(&["a.test"]);
        let (_, k2) = self_signed(&["a.test"]);
        assert!(matches!(
            certified_key_from_pem(c.as_bytes(), k2.as_bytes()),
            Err(CertError::Mismatch)
        ));
        assert!(certified_key_from_pem(b"garbage", b"garbage").is_err());
    }

    /// The deferred entry a `get` would parse for `hostname`.
    fn deferred(store: &CertStore, hostname: &str) -> Arc<DeferredPem> {
        match &*store.by_host.get(hostname).unwrap() {
            Slot::Deferred(p) => p.clone(),
            Slot::Ready(_) => panic!("not deferred"),
        }
    }

    #[test]
    fn deferred_parse_does_not_undo_a_concurrent_change() {
        let h = "race.test";
        let (old_c, old_k) = self_signed(&[h]);
        let (new_c, new_k) = self_signed(&[h]);
        let renewed = Arc::new(certified_key_from_pem(new_c.as_bytes(), new_k.as_bytes()).unwrap());
        let parse_old = || certified_key_from_pem(old_c.as_bytes(), old_k.as_bytes());

        // A renewal is published while the stored chain is parsed: the renewal stays.
        let store = CertStore::default();
        store.insert_deferred(h, &old_c, &old_k);
        let pem = deferred(&store, h);
        store.insert(h, renewed.clone()).unwrap();
        let served = store.settle(h, &pem, parse_old()).unwrap();
        assert!(Arc::ptr_eq(&served, &renewed), "the old chain was served");
        assert!(
            Arc::ptr_eq(&store.get(h).unwrap(), &renewed),
            "renewal overwritten"
        );

        // The domain is deleted while its chain is parsed: it stays deleted.
        let store = CertStore::default();
        store.insert_deferred(h, &old_c, &old_k);
        let pem = deferred(&store, h);
        store.remove(h);
        assert!(store.settle(h, &pem, parse_old()).is_none());
        assert!(!store.contains(h), "deleted domain served again");

        // Stored again (deferred) while the previous entry was parsed: the new one is used.
        let store = CertStore::default();
        store.insert_deferred(h, &old_c, &old_k);
        let pem = deferred(&store, h);
        store.insert_deferred(h, &new_c, &new_k);
        let served = store.settle(h, &pem, parse_old()).unwrap();
        assert_eq!(served.key.cert, renewed.key.cert);

        // A chain that fails to parse removes only itself, not a renewal published meanwhile.
        let store = CertStore::default();
        store.insert_deferred(h, "garbage", "garbage");
        let pem = deferred(&store, h);
        store.insert(h, renewed.clone()).unwrap();
        let failed = certified_key_from_pem(b"garbage", b"garbage");
        assert!(Arc::ptr_eq(
            &store.settle(h, &pem, failed).unwrap(),
            &renewed
        ));
        assert!(store.contains(h), "renewal removed by a failed parse");
        assert!(
            store.take_unusable().is_empty(),
            "a replaced entry is not unusable"
        );

        // A stored chain that fails to parse is reported once, for a new order.
        let store = CertStore::default();
        store.insert_deferred(h, "garbage", "garbage");
        assert!(store.get(h).is_none());
        let bad = store.take_unusable();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, h);
        assert!(store.take_unusable().is_empty());
    }
}
