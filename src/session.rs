//! Session cookies: an authenticated encryption (XChaCha20-Poly1305) of the session's
//! tenant, subject, link `jti`/`iat`, expiry and claims under a key derived from
//! `[session].secret`. Only the gateway can produce or read one. Claims too large for a
//! cookie are kept server-side and the cookie carries their id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest cookie value the gateway sets (browsers drop cookies over 4 KiB in all).
pub const MAX_COOKIE_VALUE: usize = 3600;
const NONCE_LEN: usize = 24;
const AAD: &[u8] = b"linkgate session v1";

/// Why a cookie was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the session cookie is not one this gateway issued")]
    Invalid,
    #[error("the session has expired")]
    Expired,
}

/// What a session cookie binds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionData {
    /// Tenant id.
    #[serde(rename = "t")]
    pub tenant: String,
    /// Subject.
    #[serde(rename = "s")]
    pub subject: String,
    /// The link's `jti`.
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The link's `iat` (0 when absent).
    #[serde(rename = "i")]
    pub iat: i64,
    /// Session expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires_at: i64,
    /// The link's claims, when small enough to travel in the cookie.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Map<String, Value>>,
    /// Id of server-side claims, when too large for the cookie.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub claims_ref: Option<String>,
}

/// Seals and opens session cookies.
pub struct SessionSealer {
    cipher: XChaCha20Poly1305,
}

impl SessionSealer {
    /// Derives the cookie key from the session secret (HKDF-SHA256).
    pub fn new(secret: &[u8]) -> Self {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"linkgate"), secret);
        let mut key = [0u8; 32];
        hk.expand(b"session cookie v1", &mut key)
            .expect("32 bytes is a valid HKDF length");
        Self {
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// The cookie value for `data`.
    pub fn seal(&self, data: &SessionData) -> String {
        let plain = serde_json::to_vec(data).expect("session data serializes");
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = XNonce::from_slice(&nonce_bytes);
        let ct = self
            .cipher
            .encrypt(
                nonce,
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .expect("encryption of in-memory data cannot fail");
        let mut raw = Vec::with_capacity(NONCE_LEN + ct.len());
        raw.extend_from_slice(&nonce_bytes);
        raw.extend_from_slice(&ct);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Opens a cookie value, checking integrity and expiry at `now`. Also returns an id
    /// unique to this cookie (from its random nonce), for caches keyed by session.
    pub fn open(&self, value: &str, now: i64) -> Result<(SessionData, [u8; 16]), SessionError> {
        if value.len() > MAX_COOKIE_VALUE + 64 {
            return Err(SessionError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| SessionError::Invalid)?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(SessionError::Invalid);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: AAD })
            .map_err(|_| SessionError::Invalid)?;
        let data: SessionData =
            serde_json::from_slice(&plain).map_err(|_| SessionError::Invalid)?;
        if data.expires_at <= now {
            return Err(SessionError::Expired);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&nonce[..16]);
        Ok((data, id))
    }
}

/// Sessions already opened, keyed by the cookie's first characters (its random nonce) and
/// matched on the full cookie value, so a cookie is decrypted once and its later requests
/// cost a map lookup. Also holds claims kept in the store, keyed by their random id: any key
/// whose first 16 bytes are random works; a shorter key is never cached.
///
/// Bounded: at `max` entries the oldest-inserted eighth is dropped. A full cache is never
/// cleared wholesale, which would send every live session through decryption at once.
pub struct SessionCache<T> {
    map: DashMap<[u8; 16], Arc<Cached<T>>, crate::gateway::FastHasher>,
    max: usize,
    /// Entries inserted so far: each entry's `seq` is its place in that count.
    inserted: AtomicU64,
}

/// One cache entry: the exact cookie value and what was derived from it.
pub struct Cached<T> {
    cookie: Box<[u8]>,
    /// Insertion number, for dropping the oldest entries.
    seq: u64,
    /// The value derived from the cookie.
    pub value: T,
}

impl<T> SessionCache<T> {
    /// An empty cache holding at most `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            map: DashMap::default(),
            max,
            inserted: AtomicU64::new(0),
        }
    }

    /// The entry for exactly this cookie value.
    pub fn get(&self, cookie: &[u8]) -> Option<Arc<Cached<T>>> {
        let key = cache_key(cookie)?;
        let e = self.map.get(&key)?;
        (&*e.cookie == cookie).then(|| e.value().clone())
    }

    /// Remembers `value` for this cookie value.
    pub fn insert(&self, cookie: &[u8], value: T) -> Arc<Cached<T>> {
        let seq = self.inserted.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Cached {
            cookie: cookie.into(),
            seq,
            value,
        });
        if let Some(key) = cache_key(cookie) {
            crate::gateway::drop_oldest(&self.map, self.max, seq, |e| e.seq);
            self.map.insert(key, entry.clone());
        }
        entry
    }

    /// Forgets every session (their cookies stay valid and are opened again).
    pub fn clear(&self) {
        self.map.clear();
    }
}

/// The cache key of a cookie value: its first 16 characters, which encode 12 bytes of its
/// random nonce. Only a hint: an entry is used only when the whole value matches.
fn cache_key(value: &[u8]) -> Option<[u8; 16]> {
    value.get(..16)?.try_into().ok()
}

/// The `;`-separated pairs of a `Cookie` header, untrimmed. Found with SIMD `memchr`: the
/// session cookie alone is a few hundred bytes, scanned on every request. Bytes, not `str`:
/// a field may carry obs-text, and the cookie's name and value are ASCII either way.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(header);
    std::iter::from_fn(move || {
        let h = rest?;
        match memchr::memchr(b';', h) {
            Some(i) => {
                rest = Some(&h[i + 1..]);
                Some(&h[..i])
            }
            None => {
                rest = None;
                Some(h)
            }
        }
    })
}

/// The value of a trimmed cookie pair `name=value` (`None` for any other pair).
fn pair_value<'a>(pair: &'a [u8], name: &str) -> Option<&'a [u8]> {
    pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")
}

/// Whether a trimmed cookie pair is cookie `name`, with a value or without `=`.
fn is_named(pair: &[u8], name: &str) -> bool {
    pair == name.as_bytes() || pair_value(pair, name).is_some()
}

/// The value of cookie `name` in a `Cookie` header field, if present.
pub fn find_cookie<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if let Some(v) = alone(header, name) {
        return Some(v.trim_ascii());
    }
    cookie_pairs(header)
        .find_map(|pair| pair_value(pair.trim_ascii(), name).map(<[u8]>::trim_ascii))
}

/// The value of cookie `name` when `header` is that cookie alone, unpadded: the line every
/// request of a session sends unless the site sets cookies of its own. One SIMD scan decides.
fn alone<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    pair_value(header, name).filter(|v| memchr::memchr(b';', v).is_none())
}

/// A `Cookie` header field after taking one cookie out of it.
#[derive(Debug, PartialEq, Eq)]
pub enum CookieStrip {
    /// The cookie is not in the field: forward it unchanged.
    Absent,
    /// The cookie was the only one: drop the field.
    Emptied,
    /// The other cookies, as sent, joined by `; `.
    Rest(Vec<u8>),
}

/// `header` without cookie `name`. Allocates only when other cookies remain.
pub fn strip_cookie(header: &[u8], name: &str) -> CookieStrip {
    if alone(header, name).is_some() {
        return CookieStrip::Emptied;
    }
    if !cookie_pairs(header).any(|p| is_named(p.trim_ascii(), name)) {
        return CookieStrip::Absent;
    }
    let mut rest = Vec::new();
    for pair in cookie_pairs(header).map(<[u8]>::trim_ascii) {
        if pair.is_empty() || is_named(pair, name) {
            continue;
        }
        if rest.is_empty() {
            rest.reserve(header.len());
        } else {
            rest.extend_from_slice(b"; ");
        }
        rest.extend_from_slice(pair);
    }
    if rest.is_empty() {
        CookieStrip::Emptied
    } else {
        CookieStrip::Rest(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> SessionData {
        let mut claims = Map::new();
        claims.insert("email".into(), "a@b.c".into());
        SessionData {
            tenant: "acme".into(),
            subject: "u1".into(),
            jti: Some("j".into()),
            iat: 10,
            expires_at: 1000,
            claims: Some(claims),
            claims_ref: None,
        }
    }

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let s = SessionSealer::new(&[7u8; 32]);
        let v = s.seal(&data());
        assert_eq!(s.open(&v, 999).unwrap().0, data());
        assert_eq!(s.open(&v, 1000).unwrap_err(), SessionError::Expired);
        assert!(!v.contains("a@b.c"), "claims are encrypted");
        let mut bad = v.clone().into_bytes();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            s.open(std::str::from_utf8(&bad).unwrap(), 1).unwrap_err(),
            SessionError::Invalid
        );
        let other = SessionSealer::new(&[8u8; 32]);
        assert_eq!(other.open(&v, 1).unwrap_err(), SessionError::Invalid);
        for junk in ["", "!!", "AAAA", &"A".repeat(10_000)] {
            assert!(s.open(junk, 1).is_err());
        }
    }

    #[test]
    fn cache_matches_whole_cookie() {
        let s = SessionSealer::new(&[7u8; 32]);
        let v = s.seal(&data());
        let cache = SessionCache::new(2);
        cache.insert(v.as_bytes(), 1u32);
        assert_eq!(cache.get(v.as_bytes()).unwrap().value, 1);
        let mut forged = v[..30].to_string();
        forged.push_str(&"A".repeat(v.len() - 30));
        assert!(
            cache.get(forged.as_bytes()).is_none(),
            "same nonce, other bytes"
        );
        cache.insert(s.seal(&data()).as_bytes(), 2);
        cache.insert(s.seal(&data()).as_bytes(), 3);
        assert!(cache.get(v.as_bytes()).is_none(), "bounded");
    }

    #[test]
    fn full_cache_drops_its_oldest_eighth_not_everything() {
        let s = SessionSealer::new(&[7u8; 32]);
        let cache = SessionCache::new(16);
        let cookies: Vec<Vec<u8>> = (0..100).map(|_| s.seal(&data()).into_bytes()).collect();
        for (i, c) in cookies.iter().enumerate() {
            cache.insert(c, i);
            let held = cookies[..=i]
                .iter()
                .filter(|c| cache.get(c).is_some())
                .count();
            assert!(held <= 16, "{held} entries after {} inserts", i + 1);
            // The newest 14 (16 less the eighth dropped) are always there.
            for (j, c) in cookies[..=i].iter().enumerate().rev().take(14) {
                assert_eq!(
                    cache.get(c).map(|e| e.value),
                    Some(j),
                    "entry {j} after {i}"
                );
            }
        }
        assert!(cache.get(&cookies[0]).is_none());
    }

    #[test]
    fn cookie_header_helpers() {
        let (find_cookie_bytes, strip_cookie_bytes) = (super::find_cookie, super::strip_cookie);
        let find_cookie = |h: &'static str, n: &str| {
            find_cookie_bytes(h.as_bytes(), n).map(|v| std::str::from_utf8(v).unwrap())
        };
        let strip_cookie = |h: &str, n: &str| strip_cookie_bytes(h.as_bytes(), n);
        let rest = |r: &str| CookieStrip::Rest(r.as_bytes().to_vec());
        let h = "a=1; __Host-linkgate=xyz; b=2";
        assert_eq!(find_cookie(h, "__Host-linkgate"), Some("xyz"));
        assert_eq!(find_cookie(h, "c"), None);
        assert_eq!(
            find_cookie("x__Host-linkgate=1; __Host-linkgate=2", "__Host-linkgate"),
            Some("2")
        );
        assert_eq!(find_cookie("__Host-linkgate-2=1", "__Host-linkgate"), None);
        let name = "__Host-linkgate";
        assert_eq!(strip_cookie(h, name), rest("a=1; b=2"));
        assert_eq!(
            strip_cookie(" __Host-linkgate=x ", name),
            CookieStrip::Emptied
        );
        assert_eq!(
            strip_cookie("__Host-linkgate=x;;", name),
            CookieStrip::Emptied
        );
        assert_eq!(strip_cookie("a=1;b=2", name), CookieStrip::Absent);
        // The name inside another cookie's name or value is not the cookie.
        assert_eq!(strip_cookie("a=__Host-linkgate", name), CookieStrip::Absent);
        assert_eq!(
            strip_cookie("__Host-linkgate2=1", name),
            CookieStrip::Absent
        );
        assert_eq!(
            strip_cookie("__Host-linkgate=1; __Host-linkgate=2; c=3", name),
            rest("c=3")
        );
        assert_eq!(strip_cookie("__Host-linkgate; c=3", name), rest("c=3"));
        assert_eq!(find_cookie("", name), None);
        assert_eq!(find_cookie("__Host-linkgate", name), None, "no value");
        assert_eq!(strip_cookie(";;", name), CookieStrip::Absent);
        // The session cookie alone (the fast path) and near misses of it.
        assert_eq!(find_cookie("__Host-linkgate=xyz", name), Some("xyz"));
        assert_eq!(find_cookie("__Host-linkgate=xyz ", name), Some("xyz"));
        assert_eq!(find_cookie("__Host-linkgate=", name), Some(""));
        assert_eq!(find_cookie("__Host-linkgatex=1", name), None);
        assert_eq!(
            strip_cookie("__Host-linkgate=xyz", name),
            CookieStrip::Emptied
        );
        assert_eq!(strip_cookie("__Host-linkgate=", name), CookieStrip::Emptied);
        assert_eq!(strip_cookie("__Host-linkgate=xyz;a=1", name), rest("a=1"));
        // Bytes that are not UTF-8 (obs-text) around the session cookie: it is still found and
        // taken out, and the rest goes on as sent.
        let latin1 = b"a=caf\xe9; __Host-linkgate=xyz; b=\xff";
        assert_eq!(find_cookie_bytes(latin1, name), Some(&b"xyz"[..]));
        assert_eq!(
            strip_cookie_bytes(latin1, name),
            CookieStrip::Rest(b"a=caf\xe9; b=\xff".to_vec())
        );
    }

    proptest::proptest! {
        /// Any `Cookie` field: no panic, and what goes upstream never holds the cookie.
        #[test]
        fn stripped_fields_never_hold_the_cookie(
            field in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b"__Host-linkgate".to_vec()),
                    proptest::strategy::Just(b"=".to_vec()),
                    proptest::strategy::Just(b";".to_vec()),
                    proptest::strategy::Just(b" ".to_vec()),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..4),
                ],
                0..12,
            )
        ) {
            let field = field.concat();
            let name = "__Host-linkgate";
            let left = match strip_cookie(&field, name) {
                CookieStrip::Absent => field.clone(),
                CookieStrip::Emptied => Vec::new(),
                CookieStrip::Rest(rest) => rest,
            };
            proptest::prop_assert_eq!(find_cookie(&left, name), None);
            proptest::prop_assert_eq!(strip_cookie(&left, name), CookieStrip::Absent);
        }
    }
}
