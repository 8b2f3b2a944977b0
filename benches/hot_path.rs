//! Micro-benchmarks of the per-request work: magic-link validation and session cookie
//! checking (targets: <= 1.5 us per valid token, <= 1 us per cookie on a 2-core box), plus
//! path normalisation.
//!
//! `cargo bench --bench hot_path`

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use linkgate::config::{KeyAlg, KeyConfig, KeyMaterial, Secret};
use linkgate::link::{validate, LinkContext, TenantKeys};
use linkgate::revocation::Revocations;
use linkgate::session::{SessionData, SessionSealer};

use serde_json::json;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn token_validation(c: &mut Criterion) {
    let keys = TenantKeys::new(&[KeyConfig {
        kid: "k1".into(),
        alg: KeyAlg::HS256,
        material: KeyMaterial::Secret(Secret(SECRET.to_vec())),
    }])
    .unwrap();
    let now = 1_800_000_000i64;
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let claims = json!({"sub": "user-123", "email": "user@example.com", "name": "A User",
        "exp": now + 3600, "iat": now, "jti": "Zm9vYmFyYmF6cXV4"});
    let token = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
    let mut bad = token.clone();
    bad.pop();
    bad.push('A');
    let revocations = Revocations::default();
    let ctx = LinkContext {
        tenant: "acme",
        client_ip: None,
        user_agent: None,
        now,
    };
    c.bench_function("link/validate_valid_hs256", |b| {
        b.iter(|| validate(black_box(&token), &keys, &ctx, &revocations).unwrap())
    });
    c.bench_function("link/validate_bad_signature", |b| {
        b.iter(|| validate(black_box(&bad), &keys, &ctx, &revocations).unwrap_err())
    });
}

fn cookie_check(c: &mut Criterion) {
    let sealer = SessionSealer::new(&[7u8; 32]);
    let mut claims = serde_json::Map::new();
    claims.insert("email".into(), "user@example.com".into());
    claims.insert("name".into(), "A User".into());
    let data = SessionData {
        tenant: "acme".into(),
        subject: "user-123".into(),
        jti: Some("Zm9vYmFyYmF6cXV4".into()),
        iat: 1_800_000_000,
        expires_at: 1_800_043_200,
        claims: Some(claims),
        claims_ref: None,
    };
    let cookie = sealer.seal(&data);
    let revocations = Revocations::default();
    let cache = linkgate::session::SessionCache::new(1000);
    cache.insert(cookie.as_bytes(), data.clone());
    let line = format!("__Host-linkgate={cookie}");
    c.bench_function("session/cached_check", |b| {
        b.iter(|| {
            let value =
                linkgate::session::find_cookie(black_box(line.as_bytes()), "__Host-linkgate");
            let e = cache.get(value.unwrap()).unwrap();
            let d = &e.value;
            assert!(d.expires_at > 1_800_000_100);
            assert!(!revocations.is_revoked(&d.tenant, &d.subject, d.jti.as_deref(), d.iat));
            e
        })
    });
    c.bench_function("session/open_and_check", |b| {
        b.iter(|| {
            let (d, _) = sealer.open(black_box(&cookie), 1_800_000_100).unwrap();
            assert!(!revocations.is_revoked(&d.tenant, &d.subject, d.jti.as_deref(), d.iat));
            d
        })
    });
    c.bench_function("session/seal", |b| b.iter(|| sealer.seal(black_box(&data))));
}

fn path_normalisation(c: &mut Criterion) {
    c.bench_function("paths/normalize_plain", |b| {
        b.iter(|| linkgate::paths::normalize(black_box("/app/dashboard/settings")).unwrap())
    });
    c.bench_function("paths/normalize_dots", |b| {
        b.iter(|| linkgate::paths::normalize(black_box("/app/./a/../b/%7Ec")).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = token_validation, cookie_check, path_normalisation
}
criterion_main!(benches);
