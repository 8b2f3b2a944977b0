//! Identity assertions for the upstream: an EdDSA JWT per session and host, signed with the
//! gateway's key (kept in the store, so every node signs with the same key) and published as
//! a JWKS. An assertion is reused for a session's requests until shortly before it expires.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};
use sha2::Digest;

/// Lifetime of one assertion, seconds.
pub const ASSERTION_TTL: i64 = 300;
/// An assertion is replaced once less than this many seconds remain.
const REFRESH_MARGIN: i64 = 60;
/// Cached assertions kept at most (the oldest-inserted eighth is dropped when full).
const MAX_CACHED: usize = 100_000;

/// Why the signing key could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("gateway signing key unusable: {0}")]
pub struct SignerError(String);

/// Generates a fresh Ed25519 key as (kid, PKCS#8 DER).
pub fn generate_key() -> Result<(String, Vec<u8>), SignerError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| SignerError(e.to_string()))?;
    let kid = kid_for(kp.public_key_raw());
    Ok((kid, kp.serialize_der()))
}

fn kid_for(public: &[u8]) -> String {
    let digest = sha2::Sha256::digest(public);
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

struct Cached {
    host: Box<str>,
    token: http::HeaderValue,
    exp: i64,
    /// Insertion number, for dropping the oldest entries.
    seq: u64,
}

/// Signs assertions and serves the public key set.
pub struct AssertionSigner {
    kid: String,
    key: EncodingKey,
    jwks: Vec<u8>,
    cache: DashMap<[u8; 16], Cached, crate::gateway::FastHasher>,
    /// Assertions cached so far.
    cached: std::sync::atomic::AtomicU64,
}

impl AssertionSigner {
    /// A signer for the Ed25519 key in `pkcs8` (DER).
    pub fn new(kid: String, pkcs8: &[u8]) -> Result<Self, SignerError> {
        let kp = rcgen::KeyPair::try_from(pkcs8).map_err(|e| SignerError(e.to_string()))?;
        let x = URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        let jwks = serde_json::to_vec(&serde_json::json!({
            "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]
        }))
        .map_err(|e| SignerError(e.to_string()))?;
        Ok(Self {
            kid,
            key: EncodingKey::from_ed_der(pkcs8),
            jwks,
            cache: DashMap::default(),
            cached: Default::default(),
        })
    }

    /// The JWKS document (JSON bytes).
    pub fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// The key id put in every assertion header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// An assertion for one session on `host` (as a header value: cloning it per request
    /// copies nothing): the link's `claims` with `iss`, `aud`, `iat`, `exp` set by the gateway. `session_id` identifies the session for caching; `claims`
    /// is only called when a new assertion must be signed.
    pub fn assertion(
        &self,
        session_id: [u8; 16],
        host: &str,
        tenant: &str,
        now: i64,
        claims: impl FnOnce() -> Map<String, Value>,
    ) -> http::HeaderValue {
        if let Some(c) = self.cache.get(&session_id) {
            if &*c.host == host && c.exp - now > REFRESH_MARGIN {
                return c.token.clone();
            }
        }
        let mut claims = claims();
        for k in ["exp", "nbf", "iat", "iss", "aud"] {
            claims.remove(k);
        }
        claims.insert("iss".into(), format!("https://{host}").into());
        claims.insert("aud".into(), tenant.into());
        claims.insert("iat".into(), now.into());
        let exp = now + ASSERTION_TTL;
        claims.insert("exp".into(), exp.into());
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key)
            .expect("Ed25519 signing of JSON claims cannot fail");
        let token = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(jwt))
            .expect("a compact JWS is a valid header value");
        let seq = self
            .cached
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::gateway::drop_oldest(&self.cache, MAX_CACHED, seq, |c| c.seq);
        self.cache.insert(
            session_id,
            Cached {
                host: host.into(),
                token: token.clone(),
                exp,
                seq,
            },
        );
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    #[test]
    fn signs_verifiable_assertions_and_caches() {
        let (kid, der) = generate_key().unwrap();
        let s = AssertionSigner::new(kid.clone(), &der).unwrap();
        let jwks: serde_json::Value = serde_json::from_slice(s.jwks()).unwrap();
        let x = jwks["keys"][0]["x"].as_str().unwrap();
        let raw = URL_SAFE_NO_PAD.decode(x).unwrap();
        let mut claims = Map::new();
        claims.insert("sub".into(), "u1".into());
        claims.insert("exp".into(), 1.into());
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let t = s.assertion([1; 16], "links.acme.test", "acme", now, || claims.clone());
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = 0;
        v.set_audience(&["acme"]);
        v.set_issuer(&["https://links.acme.test"]);
        let d = decode::<Map<String, Value>>(t.as_bytes(), &DecodingKey::from_ed_der(&raw), &v)
            .unwrap();
        assert_eq!(d.header.kid.as_deref(), Some(kid.as_str()));
        assert_eq!(d.claims["sub"], "u1");
        assert_eq!(d.claims["exp"].as_i64().unwrap(), now + ASSERTION_TTL);
        let again = s.assertion([1; 16], "links.acme.test", "acme", now + 10, || {
            panic!("cached")
        });
        assert_eq!(again, t);
        let other_host = s.assertion([1; 16], "b.acme.test", "acme", now, || claims.clone());
        assert_ne!(other_host, t);
    }
}
