//! Magic-link validation: keys prepared once per tenant, the algorithm pinned by the key, and
//! the contract's checks 1–9 run in order (check 10, one-time use, needs the store and is the
//! caller's). The token is never logged or echoed.

use std::borrow::Cow;
use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Sha256, Sha384, Sha512};

use crate::config::{KeyAlg, KeyConfig, KeyMaterial};
use crate::revocation::Revocations;

/// Largest token accepted (check 1).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock leeway for `exp`, `nbf` and `iat`, seconds.
pub const LEEWAY_SECS: i64 = 30;

/// Why a link was refused; each maps to the contract's error code and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongTenant,
    BadRedirect,
    Revoked,
    BindingMismatch,
    Used,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for LinkError {}

impl LinkError {
    /// The sentence shown to the visitor (JSON `message` and HTML pages).
    pub fn message(self) -> &'static str {
        match self {
            LinkError::Malformed => "The link is malformed.",
            LinkError::BadSignature => "The link's signature is not valid.",
            LinkError::Expired => "The link has expired. Ask for a new one.",
            LinkError::NotYetValid => "The link is not valid yet.",
            LinkError::WrongTenant => "The link belongs to another site.",
            LinkError::BadRedirect => "The link's redirect target is not allowed.",
            LinkError::Revoked => "The link has been revoked.",
            LinkError::BindingMismatch => "The link was issued for another device or network.",
            LinkError::Used => "The link has already been used. Ask for a new one.",
        }
    }

    /// The contract's error code.
    pub fn code(self) -> &'static str {
        crate::metrics::LINK_RESULTS[self.index()]
    }

    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            LinkError::BadRedirect => 400,
            LinkError::BindingMismatch => 403,
            LinkError::Used => 410,
            _ => 401,
        }
    }

    /// Index into [`crate::metrics::LINK_RESULTS`] (0 is `ok`).
    pub fn index(self) -> usize {
        match self {
            LinkError::Malformed => 1,
            LinkError::BadSignature => 2,
            LinkError::Expired => 3,
            LinkError::NotYetValid => 4,
            LinkError::WrongTenant => 5,
            LinkError::BadRedirect => 6,
            LinkError::Revoked => 7,
            LinkError::BindingMismatch => 8,
            LinkError::Used => 9,
        }
    }
}

/// Why a configured key could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("not a usable {alg} public key (PEM): {reason}")]
pub struct KeyError {
    alg: &'static str,
    reason: String,
}

enum Verifier {
    Hs256(Hmac<Sha256>),
    Hs384(Hmac<Sha384>),
    Hs512(Hmac<Sha512>),
    Public(Box<DecodingKey>, Algorithm),
}

/// One verification key, prepared at start.
pub struct VerifyKey {
    kid: String,
    alg: KeyAlg,
    verifier: Verifier,
}

/// Builds the jsonwebtoken decoding key for a public key.
pub fn decoding_key(alg: KeyAlg, material: &KeyMaterial) -> Result<DecodingKey, KeyError> {
    let err = |reason: String| KeyError {
        alg: alg.as_str(),
        reason,
    };
    match (alg, material) {
        (_, KeyMaterial::Secret(s)) => Ok(DecodingKey::from_secret(&s.0)),
        (KeyAlg::RS256, KeyMaterial::PublicPem(p)) => {
            DecodingKey::from_rsa_pem(p).map_err(|e| err(e.to_string()))
        }
        (KeyAlg::ES256, KeyMaterial::PublicPem(p)) => {
            DecodingKey::from_ec_pem(p).map_err(|e| err(e.to_string()))
        }
        (KeyAlg::EdDSA, KeyMaterial::PublicPem(p)) => {
            DecodingKey::from_ed_pem(p).map_err(|e| err(e.to_string()))
        }
        (_, KeyMaterial::PublicPem(_)) => Err(err("HMAC algorithms need a secret".into())),
    }
}

fn jwt_alg(alg: KeyAlg) -> Algorithm {
    match alg {
        KeyAlg::HS256 => Algorithm::HS256,
        KeyAlg::HS384 => Algorithm::HS384,
        KeyAlg::HS512 => Algorithm::HS512,
        KeyAlg::RS256 => Algorithm::RS256,
        KeyAlg::ES256 => Algorithm::ES256,
        KeyAlg::EdDSA => Algorithm::EdDSA,
    }
}

impl VerifyKey {
    /// Prepares `k` (HMAC state keyed once; public keys parsed once).
    pub fn new(k: &KeyConfig) -> Result<Self, KeyError> {
        let verifier = match (&k.material, k.alg) {
            (KeyMaterial::Secret(s), KeyAlg::HS256) => {
                Verifier::Hs256(Hmac::new_from_slice(&s.0).expect("HMAC takes any key length"))
            }
            (KeyMaterial::Secret(s), KeyAlg::HS384) => {
                Verifier::Hs384(Hmac::new_from_slice(&s.0).expect("HMAC takes any key length"))
            }
            (KeyMaterial::Secret(s), KeyAlg::HS512) => {
                Verifier::Hs512(Hmac::new_from_slice(&s.0).expect("HMAC takes any key length"))
            }
            (m, alg) => Verifier::Public(Box::new(decoding_key(alg, m)?), jwt_alg(alg)),
        };
        Ok(Self {
            kid: k.kid.clone(),
            alg: k.alg,
            verifier,
        })
    }

    /// Checks `sig_b64` over `message` in constant time (HMAC) or with the public key.
    fn verify(&self, message: &[u8], sig_b64: &str) -> bool {
        fn hmac_ok<M: Mac + Clone>(m: &M, message: &[u8], sig_b64: &str) -> bool {
            let mut buf = [0u8; 64];
            let Ok(n) = URL_SAFE_NO_PAD.decode_slice(sig_b64, &mut buf) else {
                return false;
            };
            let mut mac = m.clone();
            mac.update(message);
            mac.verify_slice(&buf[..n]).is_ok()
        }
        match &self.verifier {
            Verifier::Hs256(m) => hmac_ok(m, message, sig_b64),
            Verifier::Hs384(m) => hmac_ok(m, message, sig_b64),
            Verifier::Hs512(m) => hmac_ok(m, message, sig_b64),
            Verifier::Public(k, alg) => {
                jsonwebtoken::crypto::verify(sig_b64, message, k, *alg).unwrap_or(false)
            }
        }
    }
}

/// A tenant's verification keys, in configuration order.
pub struct TenantKeys {
    keys: Vec<VerifyKey>,
}

impl TenantKeys {
    /// Prepares every key.
    pub fn new(keys: &[KeyConfig]) -> Result<Self, KeyError> {
        Ok(Self {
            keys: keys.iter().map(VerifyKey::new).collect::<Result<_, _>>()?,
        })
    }
}

/// What the request brings that the link may be bound to.
pub struct LinkContext<'a> {
    /// Tenant that owns the request's Host.
    pub tenant: &'a str,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
    /// Unix seconds.
    pub now: i64,
}

/// A link that passed checks 1–9.
#[derive(Debug, Clone)]
pub struct ValidLink {
    /// `sub`, or `user_id` as a string.
    pub subject: String,
    pub jti: Option<String>,
    /// `iat`, or 0 when absent.
    pub iat: i64,
    pub exp: i64,
    pub one_time: bool,
    pub redirect: Option<String>,
    /// The decoded payload (a JSON object), parsed into claims only when needed.
    payload: String,
}

impl ValidLink {
    /// Every claim of the link.
    pub fn claims(&self) -> Map<String, Value> {
        serde_json::from_str(&self.payload).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow)]
    kid: Option<Cow<'a, str>>,
    crit: Option<IgnoredAny>,
}

/// The claims the checks read, borrowed from the payload; every other claim is skipped here
/// and kept in the payload. Duplicate keys are refused by the derive.
#[derive(Deserialize)]
struct KnownClaims<'a> {
    #[serde(borrow)]
    sub: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
    iat: Option<serde_json::Number>,
    #[serde(borrow)]
    jti: Option<Cow<'a, str>>,
    one_time: Option<bool>,
    #[serde(borrow)]
    tenant: Option<&'a RawValue>,
    #[serde(borrow)]
    space_id: Option<&'a RawValue>,
    #[serde(borrow)]
    redirect: Option<&'a RawValue>,
    #[serde(borrow)]
    ip: Option<&'a RawValue>,
    #[serde(borrow)]
    ua: Option<&'a RawValue>,
    #[serde(borrow)]
    paths: Option<&'a RawValue>,
}

/// A JSON string, borrowed when it has no escapes.
fn text(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if let Ok(b) = serde_json::from_str::<&str>(s) {
        return Some(Cow::Borrowed(b));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

fn number(n: Option<serde_json::Number>) -> Result<Option<i64>, LinkError> {
    let Some(n) = n else { return Ok(None) };
    n.as_i64()
        .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
        .map(Some)
        .ok_or(LinkError::Malformed)
}

/// Runs checks 1–9 of the contract on `token` for the tenant owning the request.
pub fn validate(
    token: &str,
    keys: &TenantKeys,
    ctx: &LinkContext<'_>,
    revocations: &Revocations,
) -> Result<ValidLink, LinkError> {
    // 1. Well-formed.
    if token.len() > MAX_TOKEN_BYTES {
        return Err(LinkError::Malformed);
    }
    let mut parts = token.splitn(4, '.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LinkError::Malformed);
    };
    if h64.is_empty() || p64.is_empty() || s64.is_empty() {
        return Err(LinkError::Malformed);
    }
    if !s64
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(LinkError::Malformed);
    }
    // The usual header decodes on the stack; a longer one (`x5c`, `jwk`) on the heap.
    let mut header_buf = [0u8; 512];
    let header_vec;
    let header_bytes = if h64.len() / 4 * 3 + 3 <= header_buf.len() {
        let n = URL_SAFE_NO_PAD
            .decode_slice(h64, &mut header_buf)
            .map_err(|_| LinkError::Malformed)?;
        &header_buf[..n]
    } else {
        header_vec = URL_SAFE_NO_PAD
            .decode(h64)
            .map_err(|_| LinkError::Malformed)?;
        &header_vec[..]
    };
    // One UTF-8 check up front lets serde_json read strings without re-validating them.
    let header_text = std::str::from_utf8(header_bytes).map_err(|_| LinkError::Malformed)?;
    let header: Header<'_> = serde_json::from_str(header_text).map_err(|_| LinkError::Malformed)?;
    if header.crit.is_some() {
        return Err(LinkError::Malformed);
    }
    let payload = URL_SAFE_NO_PAD
        .decode(p64)
        .map_err(|_| LinkError::Malformed)
        .and_then(|b| String::from_utf8(b).map_err(|_| LinkError::Malformed))?;
    let known: KnownClaims<'_> =
        serde_json::from_str(&payload).map_err(|_| LinkError::Malformed)?;
    let exp = number(known.exp)?.ok_or(LinkError::Malformed)?;
    let nbf = number(known.nbf)?;
    let iat = number(known.iat)?;
    let one_time = known.one_time.unwrap_or(false);
    let jti = match known.jti {
        None => None,
        Some(s) if !s.is_empty() && s.len() <= 256 => Some(s),
        Some(_) => return Err(LinkError::Malformed),
    };
    if one_time && jti.is_none() {
        return Err(LinkError::Malformed);
    }
    if let Some(raw) = known.paths {
        let ok = serde_json::from_str::<Vec<Cow<'_, str>>>(raw.get())
            .is_ok_and(|ps| ps.iter().all(|p| p.starts_with('/')));
        if !ok {
            return Err(LinkError::Malformed);
        }
    }

    // 2 + 3. Key chosen by kid (or each in turn), alg pinned by the key, signature.
    let message = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    let verified = match &header.kid {
        Some(kid) => match keys.keys.iter().find(|k| k.kid == *kid) {
            Some(k) if k.alg.as_str() == header.alg => k.verify(message, s64),
            _ => false,
        },
        None => keys
            .keys
            .iter()
            .filter(|k| k.alg.as_str() == header.alg)
            .any(|k| k.verify(message, s64)),
    };
    if !verified {
        return Err(LinkError::BadSignature);
    }

    // 4. Time.
    // Valid while `now < exp` (RFC 7519), give or take the leeway.
    if ctx.now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(LinkError::Expired);
    }
    let future = |t: Option<i64>| t.is_some_and(|t| t > ctx.now.saturating_add(LEEWAY_SECS));
    if future(nbf) || future(iat) {
        return Err(LinkError::NotYetValid);
    }

    // 5. Tenant.
    for raw in [known.tenant, known.space_id].into_iter().flatten() {
        if text(raw).as_deref() != Some(ctx.tenant) {
            return Err(LinkError::WrongTenant);
        }
    }

    // 6. Subject.
    let subject = match known.sub.and_then(text).filter(|s| !s.is_empty()) {
        Some(s) => s.into_owned(),
        None => match known.user_id {
            Some(raw) => match text(raw) {
                Some(s) if !s.is_empty() => s.into_owned(),
                Some(_) => return Err(LinkError::Malformed),
                None => match serde_json::from_str::<serde_json::Number>(raw.get()) {
                    Ok(n) => n.to_string(),
                    Err(_) => return Err(LinkError::Malformed),
                },
            },
            None => return Err(LinkError::Malformed),
        },
    };
    if subject.len() > 1024 {
        return Err(LinkError::Malformed);
    }

    // 7. Redirect.
    let redirect = match known.redirect {
        None => None,
        Some(raw) => match text(raw) {
            Some(r) if is_safe_redirect(&r) => Some(r.into_owned()),
            _ => return Err(LinkError::BadRedirect),
        },
    };

    // 8. Revocation.
    let iat0 = iat.unwrap_or(0);
    if revocations.is_revoked(ctx.tenant, &subject, jti.as_deref(), iat0) {
        return Err(LinkError::Revoked);
    }

    // 9. Bindings.
    if let Some(raw) = known.ip {
        let want = text(raw).and_then(|s| s.parse::<IpAddr>().ok());
        if want.is_none() || want != ctx.client_ip.map(canonical_ip) {
            return Err(LinkError::BindingMismatch);
        }
    }
    if let Some(raw) = known.ua {
        if text(raw).as_deref() != ctx.user_agent || ctx.user_agent.is_none() {
            return Err(LinkError::BindingMismatch);
        }
    }

    let jti = jti.map(Cow::into_owned);
    Ok(ValidLink {
        subject,
        jti,
        iat: iat0,
        exp,
        one_time,
        redirect,
        payload,
    })
}

/// Maps IPv4-mapped IPv6 addresses to IPv4 so `ip` claims compare as people write them.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// True when `r` is a local path: exactly one leading `/`, no `\`, no control or whitespace
/// characters, raw or percent-encoded.
pub fn is_safe_redirect(r: &str) -> bool {
    fn clean(s: &[u8]) -> bool {
        s.first() == Some(&b'/')
            && s.get(1) != Some(&b'/')
            && !s
                .iter()
                .any(|&b| b == b'\\' || b.is_ascii_control() || b.is_ascii_whitespace())
    }
    if r.len() > 2048 || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(r).collect();
    if let Ok(s) = std::str::from_utf8(&decoded) {
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return false;
        }
    }
    clean(r.as_bytes()) && clean(&decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use jsonwebtoken::{encode, EncodingKey, Header as JwtHeader};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn keys() -> TenantKeys {
        TenantKeys::new(&[KeyConfig {
            kid: "k1".into(),
            alg: KeyAlg::HS256,
            material: KeyMaterial::Secret(Secret(SECRET.to_vec())),
        }])
        .unwrap()
    }

    fn ctx() -> LinkContext<'static> {
        LinkContext {
            tenant: "acme",
            client_ip: Some("10.0.0.1".parse().unwrap()),
            user_agent: Some("ua/1"),
            now: NOW,
        }
    }

    fn mint(claims: Value, kid: Option<&str>) -> String {
        let mut h = JwtHeader::new(Algorithm::HS256);
        h.kid = kid.map(str::to_string);
        encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn check(claims: Value) -> Result<ValidLink, LinkError> {
        validate(
            &mint(claims, Some("k1")),
            &keys(),
            &ctx(),
            &Revocations::default(),
        )
    }

    #[test]
    fn valid_link_passes() {
        let l = check(json!({"sub":"u1","exp":NOW+60,"iat":NOW,"email":"a@b","extra":{"x":1}}))
            .unwrap();
        assert_eq!(l.subject, "u1");
        assert_eq!(l.claims()["extra"]["x"], 1);
        // No kid: each key tried.
        let t = mint(json!({"sub":"u1","exp":NOW+60}), None);
        assert!(validate(&t, &keys(), &ctx(), &Revocations::default()).is_ok());
    }

    #[test]
    fn each_check_has_its_code() {
        use LinkError::*;
        let cases = [
            (json!({"sub":"u","exp":"soon"}), Malformed),
            (json!({"sub":"u"}), Malformed),
            (json!({"sub":"u","exp":NOW+60,"one_time":true}), Malformed),
            (json!({"exp":NOW+60}), Malformed),
            (json!({"sub":"u","exp":NOW-31}), Expired),
            (json!({"sub":"u","exp":NOW-30}), Expired),
            (json!({"sub":"u","exp":NOW+60,"nbf":NOW+31}), NotYetValid),
            (json!({"sub":"u","exp":NOW+60,"iat":NOW+31}), NotYetValid),
            (
                json!({"sub":"u","exp":NOW+60,"tenant":"globex"}),
                WrongTenant,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"space_id":"globex"}),
                WrongTenant,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"redirect":"//evil.example"}),
                BadRedirect,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"redirect":"/a%0d%0aSet-Cookie:x"}),
                BadRedirect,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"redirect":"/\\evil"}),
                BadRedirect,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"redirect":"https://evil"}),
                BadRedirect,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"ip":"10.0.0.2"}),
                BindingMismatch,
            ),
            (
                json!({"sub":"u","exp":NOW+60,"ua":"other"}),
                BindingMismatch,
            ),
        ];
        for (claims, want) in cases {
            assert_eq!(check(claims.clone()).unwrap_err(), want, "{claims}");
        }
        assert!(check(
            json!({"user_id":42,"exp":NOW+60,"ip":"10.0.0.1","ua":"ua/1","redirect":"/x?y=1"})
        )
        .is_ok());
        assert!(
            check(json!({"sub":"u","exp":NOW-29})).is_ok(),
            "leeway 30 s"
        );
    }

    #[test]
    fn long_header_is_read() {
        let mut h = JwtHeader::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        h.x5u = Some(format!("https://keys.example/{}", "x".repeat(900)));
        let claims = json!({"sub":"u","exp":NOW+60});
        let t = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(t.split('.').next().unwrap().len() > 1000);
        let l = validate(&t, &keys(), &ctx(), &Revocations::default()).unwrap();
        assert_eq!(l.subject, "u");
        // Near the stack buffer's edge, on both sides.
        for n in 440..470 {
            h.x5u = Some("x".repeat(n));
            let t = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
            assert!(
                validate(&t, &keys(), &ctx(), &Revocations::default()).is_ok(),
                "{n}"
            );
        }
    }

    #[test]
    fn signature_and_algorithm_confusion() {
        let good = mint(json!({"sub":"u","exp":NOW+60}), Some("k1"));
        let r = Revocations::default();
        // Unknown kid: no fallback.
        let t = mint(json!({"sub":"u","exp":NOW+60}), Some("k9"));
        assert_eq!(
            validate(&t, &keys(), &ctx(), &r).unwrap_err(),
            LinkError::BadSignature
        );
        // alg none with empty or bogus signature.
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
        let p = good.split('.').nth(1).unwrap();
        assert_eq!(
            validate(&format!("{h}.{p}."), &keys(), &ctx(), &r).unwrap_err(),
            LinkError::Malformed
        );
        assert_eq!(
            validate(&format!("{h}.{p}.AAAA"), &keys(), &ctx(), &r).unwrap_err(),
            LinkError::BadSignature
        );
        // Same signature but header says HS512.
        let h512 = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","kid":"k1"}"#);
        let s = good.split('.').nth(2).unwrap();
        assert_eq!(
            validate(&format!("{h512}.{p}.{s}"), &keys(), &ctx(), &r).unwrap_err(),
            LinkError::BadSignature
        );
        // Tampered payload.
        let p2 = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","exp":1900000000}"#);
        let h0 = good.split('.').next().unwrap();
        assert_eq!(
            validate(&format!("{h0}.{p2}.{s}"), &keys(), &ctx(), &r).unwrap_err(),
            LinkError::BadSignature
        );
    }

    #[test]
    fn hostile_tokens_never_panic() {
        let r = Revocations::default();
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "!!!.b.c",
            &big,
            "e30.e30.",
            "e30.e30.x",
            "eyJhbGciOiJIUzI1NiJ9.bnVsbA.abc",
            "eyJhbGciOjF9.e30.abc",
        ] {
            assert!(validate(t, &keys(), &ctx(), &r).is_err(), "{t:.20}");
        }
    }

    #[test]
    fn revoked_links_refused() {
        use crate::revocation::Revocation;
        let r = Revocations::default();
        r.apply(&Revocation::Subject {
            tenant: "acme".into(),
            sub: "u".into(),
            before: NOW - 10,
        });
        let t = mint(json!({"sub":"u","exp":NOW+60,"iat":NOW-20}), Some("k1"));
        assert_eq!(
            validate(&t, &keys(), &ctx(), &r).unwrap_err(),
            LinkError::Revoked
        );
        let t = mint(json!({"sub":"u","exp":NOW+60,"iat":NOW-5}), Some("k1"));
        assert!(
            validate(&t, &keys(), &ctx(), &r).is_ok(),
            "issued after the revocation"
        );
        let t = mint(json!({"sub":"u","exp":NOW+60}), Some("k1"));
        assert_eq!(
            validate(&t, &keys(), &ctx(), &r).unwrap_err(),
            LinkError::Revoked,
            "no iat = 0"
        );
        r.apply(&Revocation::Jti { jti: "j1".into() });
        let t = mint(json!({"sub":"v","exp":NOW+60,"jti":"j1"}), Some("k1"));
        assert_eq!(
            validate(&t, &keys(), &ctx(), &r).unwrap_err(),
            LinkError::Revoked
        );
    }

    #[test]
    fn redirects() {
        assert!(is_safe_redirect("/"));
        assert!(is_safe_redirect("/a/b?c=d#e"));
        for bad in [
            "",
            "a",
            "//x",
            "/%2Fx",
            "/a b",
            "/a\tb",
            "/%09",
            "/%5Cx",
            "\\x",
            "/\u{2028}",
        ] {
            assert!(!is_safe_redirect(bad), "{bad}");
        }
    }

    proptest::proptest! {
        /// Any token-shaped text: refused with an error, never a panic.
        #[test]
        fn arbitrary_tokens_are_refused(token in "[A-Za-z0-9_=.-]{0,300}") {
            proptest::prop_assert!(validate(&token, &keys(), &ctx(), &Revocations::default()).is_err());
        }
    }
}
