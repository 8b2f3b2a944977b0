//! SPEC sections 2 and 3: public-key link algorithms (RS256, ES256, EdDSA), key choice by
//! `kid` and `alg`, and key rotation through live reload (SIGHUP) with sessions kept.

use std::process::Command;

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::harness::*;

fn es256(kid: &str) -> KeyCfg {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    KeyCfg {
        kid: kid.into(),
        alg: Algorithm::ES256,
        material: KeyMaterial::PublicKey {
            public_pem: kp.public_key_pem(),
            private_pem: kp.serialize_pem(),
        },
    }
}

/// A 2048-bit RSA key pair from the `openssl` command; None when it is not installed.
fn rs256(kid: &str) -> Option<KeyCfg> {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("rsa.pem");
    let public = dir.path().join("rsa.pub.pem");
    let gen = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .output()
        .ok()?;
    if !gen.status.success() {
        return None;
    }
    let pubout = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .ok()?;
    assert!(pubout.status.success(), "openssl pkey -pubout failed");
    Some(KeyCfg {
        kid: kid.into(),
        alg: Algorithm::RS256,
        material: KeyMaterial::PublicKey {
            public_pem: std::fs::read_to_string(&public).unwrap(),
            private_pem: std::fs::read_to_string(&private).unwrap(),
        },
    })
}

fn public_pem(k: &KeyCfg) -> &str {
    match &k.material {
        KeyMaterial::PublicKey { public_pem, .. } => public_pem,
        _ => panic!("not a public key"),
    }
}

async fn get_login(gw: &Gateway, token: &str) -> reqwest::Response {
    gw.client()
        .get(gw.url("acme", &format!("/login/{token}")))
        .send()
        .await
        .unwrap()
}

/// The session forwards to the upstream as `sub`.
async fn assert_session(gw: &Gateway, cookie: &str, sub: &str, path: &str) {
    let r = gw.get_with_cookie("acme", path, cookie).await;
    assert_eq!(
        r.status(),
        200,
        "session of {sub} not forwarded: {}",
        r.text().await.unwrap()
    );
    assert_eq!(
        gw.upstream("acme")
            .last(path)
            .unwrap_or_else(|| panic!("upstream never saw {path}"))
            .header("x-linkgate-subject"),
        Some(sub)
    );
}

/// Rewrites a link URL (`https://host[:port]/...`) to the test port.
fn local(gw: &Gateway, url: &str) -> String {
    let rest = url.strip_prefix("https://").expect("https URL");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = hostport.split(':').next().unwrap();
    gw.url_host(host, if path.is_empty() { "/" } else { path })
}

fn kid_of(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).unwrap().kid
}

/// Token carried by a path-form link URL.
fn token_of(url: &str) -> String {
    url.rsplit("/login/")
        .next()
        .unwrap()
        .split(['?', '#'])
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn rs256_es256_eddsa_keys_verify() {
    let e1 = es256("e1");
    let d1 = KeyCfg::ed25519("d1");
    let mut keys = vec![e1.clone(), d1.clone()];
    let r1 = rs256("r1");
    match &r1 {
        Some(k) => keys.insert(0, k.clone()),
        None => eprintln!("openssl not available: RS256 not tested"),
    }
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").keys(keys.clone())
    ]))
    .await;

    // Each key signs links that redeem into working sessions.
    for k in &keys {
        let sub = format!("user-{}", k.kid);
        let cookie = gw.redeem("acme", &k.sign(&claims(&sub))).await;
        assert_session(&gw, &cookie, &sub, &format!("/after-{}", k.kid)).await;
    }

    // Without `kid`, each key is tried in turn.
    for k in [&e1, &d1] {
        let sub = format!("nokid-{}", k.kid);
        let tok = sign_without_kid(k, &claims(&sub));
        assert_eq!(kid_of(&tok), None);
        let cookie = gw.redeem("acme", &tok).await;
        assert_session(&gw, &cookie, &sub, &format!("/nokid-{}", k.kid)).await;
    }

    let payload = claims("mallory");
    let es_tok = e1.sign(&payload);
    let (_, body_sig) = es_tok.split_once('.').unwrap();

    // The ES256 key's signature under a header claiming RS256 (alg must equal the key's).
    let rs_header = b64(json!({"alg": "RS256", "typ": "JWT", "kid": "e1"})
        .to_string()
        .as_bytes());
    let r = get_login(&gw, &format!("{rs_header}.{body_sig}")).await;
    expect_error(r, 401, "link_bad_signature").await;

    // Algorithm confusion: HS256 keyed with the public PEM of an asymmetric key.
    for k in keys.iter() {
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": k.kid});
        let tok = craft_hs256(
            public_pem(k).as_bytes(),
            header.to_string().as_bytes(),
            payload.to_string().as_bytes(),
        );
        let r = get_login(&gw, &tok).await;
        expect_error(r, 401, "link_bad_signature").await;
    }

    // alg none.
    let none = craft(
        &json!({"alg": "none", "typ": "JWT", "kid": "e1"}),
        &payload,
        "AAAA",
    );
    expect_error(get_login(&gw, &none).await, 401, "link_bad_signature").await;

    // The right algorithm under another key's kid.
    let mut as_d1 = e1.clone();
    as_d1.kid = "d1".into();
    expect_error(
        get_login(&gw, &as_d1.sign(&payload)).await,
        401,
        "link_bad_signature",
    )
    .await;

    // An unknown kid: no fallback to the other keys, although e1 would verify.
    let mut unknown = e1.clone();
    unknown.kid = "zz".into();
    expect_error(
        get_login(&gw, &unknown.sign(&payload)).await,
        401,
        "link_bad_signature",
    )
    .await;

    // Another ES256 key claiming to be e1.
    let mut impostor = es256("e1");
    impostor.kid = "e1".into();
    expect_error(
        get_login(&gw, &impostor.sign(&payload)).await,
        401,
        "link_bad_signature",
    )
    .await;

    // A tampered payload under a valid signature.
    let (head, _) = es_tok.split_once('.').unwrap();
    let sig = es_tok.rsplit('.').next().unwrap();
    let forged = format!(
        "{head}.{}.{sig}",
        b64(claims("mallory-2").to_string().as_bytes())
    );
    expect_error(get_login(&gw, &forged).await, 401, "link_bad_signature").await;

    if r1.is_none() {
        eprintln!("note: RS256 was skipped (no openssl)");
    }
}

/// Signs `claims` with `k`'s private key, with no `kid` in the header.
fn sign_without_kid(k: &KeyCfg, claims: &Value) -> String {
    let h = jsonwebtoken::Header::new(k.alg);
    let KeyMaterial::PublicKey { private_pem, .. } = &k.material else {
        panic!("public key expected");
    };
    let key = match k.alg {
        Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()),
        Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(private_pem.as_bytes()),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()),
    }
    .unwrap();
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

const K2_SECRET: &[u8] = b"acme-k2-rotated-secret-abcdefghijklmnopqrstuvwxyz";

#[tokio::test]
async fn key_rotation_with_reload() {
    let mut gw = Gateway::start(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")])).await;
    let pid = gw.pid();
    let k1 = gw.tenant("acme").keys[0].clone();
    let k2 = KeyCfg::hs256("k2", K2_SECRET.to_vec());
    let session_secret = gw.cfg.session_secret.clone();

    let cookie = gw.redeem("acme", &k1.sign(&claims("alice"))).await;
    assert_session(&gw, &cookie, "alice", "/s0").await;
    expect_error(
        get_login(&gw, &k2.sign(&claims("early"))).await,
        401,
        "link_bad_signature",
    )
    .await;

    // 1. k2 added first, k1 kept.
    gw.p.cfg.tenants[0].keys = vec![k2.clone(), k1.clone()];
    gw.p.write_config();
    assert_eq!(
        gw.reload().await,
        Some(true),
        "reload with k2 added; log:\n{}",
        gw.log()
    );
    assert_eq!(gw.pid(), pid);
    let c = gw.redeem("acme", &k2.sign(&claims("bob"))).await;
    assert_session(&gw, &c, "bob", "/s1-bob").await;
    let c = gw.redeem("acme", &k1.sign(&claims("carol"))).await;
    assert_session(&gw, &c, "carol", "/s1-carol").await;
    assert_session(&gw, &cookie, "alice", "/s1").await;

    // The admin API signs with the (new) first HS* key.
    let r = gw
        .admin_post("/v1/links", &json!({"tenant": "acme", "sub": "dave"}))
        .await;
    assert_eq!(r.status(), 201);
    let link: Value = r.json().await.unwrap();
    let tok = link["token"].as_str().unwrap();
    assert_eq!(kid_of(tok).as_deref(), Some("k2"), "POST /v1/links kid");
    let r = gw
        .client()
        .get(local(&gw, link["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_session(&gw, &session_cookie(&r).unwrap().value, "dave", "/s1-dave").await;

    // So does `mint` (offline, from the same file).
    let (code, out, err) = gw.run_cli(&["mint", "--tenant", "acme", "--sub", "erin"]);
    assert_eq!(code, 0, "{err}");
    let url = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("https://"))
        .unwrap_or_else(|| panic!("no URL in mint output: {out}"))
        .to_string();
    let tok = token_of(&url);
    assert_eq!(kid_of(&tok).as_deref(), Some("k2"), "mint kid");
    let c = gw.redeem("acme", &tok).await;
    assert_session(&gw, &c, "erin", "/s1-erin").await;

    // 2. Only k2: k1 links fail, the k1 session (sealed with the session secret) stays.
    gw.p.cfg.tenants[0].keys = vec![k2.clone()];
    gw.p.write_config();
    assert_eq!(
        gw.reload().await,
        Some(true),
        "reload without k1; log:\n{}",
        gw.log()
    );
    expect_error(
        get_login(&gw, &k1.sign(&claims("late-k1"))).await,
        401,
        "link_bad_signature",
    )
    .await;
    assert_session(&gw, &cookie, "alice", "/s2").await;
    let c = gw.redeem("acme", &k2.sign(&claims("frank"))).await;
    assert_session(&gw, &c, "frank", "/s2-frank").await;

    // 3. A broken file (k1 back, plus a 10-byte secret): refused as a whole.
    gw.p.cfg.tenants[0].keys = vec![
        k2.clone(),
        k1.clone(),
        KeyCfg::hs256("k3", b"short-key!".to_vec()),
    ];
    gw.p.write_config();
    assert_eq!(
        gw.reload().await,
        Some(false),
        "broken config not refused; log:\n{}",
        gw.log()
    );
    assert!(
        gw.log().contains("tenants[0].keys[2]"),
        "the problem is not named by its path; log:\n{}",
        gw.log()
    );
    assert!(gw.is_running(), "gateway died on a broken reload");
    assert_eq!(gw.pid(), pid);
    expect_error(
        get_login(&gw, &k1.sign(&claims("partial"))).await,
        401,
        "link_bad_signature",
    )
    .await;
    let c = gw.redeem("acme", &k2.sign(&claims("grace"))).await;
    assert_session(&gw, &c, "grace", "/s3-grace").await;
    assert_session(&gw, &cookie, "alice", "/s3").await;

    // 4. A valid file that changes the session secret: refused, sessions kept.
    gw.p.cfg.tenants[0].keys = vec![k2.clone(), k1.clone()];
    gw.p.cfg.session_secret = vec![9u8; 48];
    gw.p.write_config();
    assert_eq!(
        gw.reload().await,
        Some(false),
        "a reload changing [session] secret_file content must be refused; log:\n{}",
        gw.log()
    );
    assert!(gw.is_running());
    assert_eq!(gw.pid(), pid);
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("configuration not reloaded") && l.contains("session")),
        "the refusal does not mention [session]; log:\n{log}"
    );
    assert_session(&gw, &cookie, "alice", "/s4").await;
    expect_error(
        get_login(&gw, &k1.sign(&claims("partial-2"))).await,
        401,
        "link_bad_signature",
    )
    .await;
    let c = gw.redeem("acme", &k2.sign(&claims("heidi"))).await;
    assert_session(&gw, &c, "heidi", "/s4-heidi").await;

    // 5. The same keys with the original session secret: accepted.
    gw.p.cfg.session_secret = session_secret;
    gw.p.write_config();
    assert_eq!(
        gw.reload().await,
        Some(true),
        "valid reload after refusals; log:\n{}",
        gw.log()
    );
    let c = gw.redeem("acme", &k1.sign(&claims("ivan"))).await;
    assert_session(&gw, &c, "ivan", "/s5-ivan").await;
    assert_session(&gw, &cookie, "alice", "/s5").await;
    assert_eq!(gw.pid(), pid);
}

#[tokio::test]
async fn reload_refuses_changes_that_need_a_restart() {
    let mut gw = Gateway::default().await;
    let before = gw.p.cfg.tail.clone();
    // The DNS checker and the ACME client are built once: their settings need a restart.
    for (table, change) in [
        ("[dns]", "\n[dns]\ncheck_interval = \"7s\"\n"),
        ("[acme]", "\n[acme]\nrenew_before = \"20d\"\n"),
    ] {
        gw.p.cfg.tail = format!("{before}{change}");
        gw.p.write_config();
        assert_eq!(
            gw.reload().await,
            Some(false),
            "{table}; log:\n{}",
            gw.log()
        );
        assert!(
            gw.log()
                .contains(&format!("changes to {table} need a restart")),
            "{table}; log:\n{}",
            gw.log()
        );
    }
    // Back to the running file: reloads again.
    gw.p.cfg.tail = before;
    gw.p.write_config();
    assert_eq!(gw.reload().await, Some(true), "log:\n{}", gw.log());
}
