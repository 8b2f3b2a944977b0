//! SPEC section 3: magic-link forms, checks (in order) and their error answers.

use crate::harness::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

fn assert_session_cookie_attrs(r: &reqwest::Response) {
    let c = session_cookie(r).expect("session Set-Cookie");
    assert_eq!(c.name, "__Host-linkgate");
    assert!(!c.value.is_empty());
    assert!(c.attr("secure").is_some(), "Secure missing: {c:?}");
    assert!(c.attr("httponly").is_some(), "HttpOnly missing: {c:?}");
    assert!(
        c.attr("samesite")
            .is_some_and(|v| v.eq_ignore_ascii_case("lax")),
        "SameSite=Lax missing: {c:?}"
    );
    assert_eq!(c.attr("path"), Some("/"), "Path=/ missing: {c:?}");
    assert!(c.attr("domain").is_none(), "Domain must not be set: {c:?}");
}

fn assert_no_store(r: &reqwest::Response) {
    let cc = header(r, "cache-control").unwrap_or_default();
    assert!(cc.contains("no-store"), "Cache-Control {cc:?}");
    assert_eq!(
        header(r, "referrer-policy").as_deref(),
        Some("no-referrer"),
        "Referrer-Policy"
    );
}

async fn get(gw: &Gateway, tenant: &str, path: &str) -> reqwest::Response {
    gw.client().get(gw.url(tenant, path)).send().await.unwrap()
}

async fn login_path(gw: &Gateway, tenant: &str, token: &str) -> reqwest::Response {
    get(gw, tenant, &format!("/login/{token}")).await
}

#[tokio::test]
async fn path_form_redeems_with_303_cookie_and_headers() {
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &claims("alice"));
    let r = login_path(&gw, "acme", &tok).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/");
    assert_session_cookie_attrs(&r);
    assert_no_store(&r);
    let body = r.text().await.unwrap();
    assert!(!body.contains(&tok), "token echoed in body");

    // The cookie works: the next request is forwarded with the identity.
    let cookie = gw.login("acme", "alice").await;
    let r = gw.get_with_cookie("acme", "/", &cookie).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /");
    let rec = gw.upstream("acme").last("/").expect("forwarded");
    assert_eq!(rec.header("x-linkgate-subject"), Some("alice"));
    // The link request itself was answered by the gateway.
    assert!(!gw.upstream("acme").dump().contains(&tok));
}

#[tokio::test]
async fn query_form_redeems_to_clean_url() {
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &claims("alice"));
    let r = get(
        &gw,
        "acme",
        &format!("/docs/page?a=1&magic_link={tok}&b=two"),
    )
    .await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_location(&r, &gw, "links.acme.test", "/docs/page?a=1&b=two");
    assert_session_cookie_attrs(&r);
    assert_no_store(&r);

    let tok = gw.token("acme", &claims("alice"));
    let r = get(&gw, "acme", &format!("/docs?magic_link={tok}")).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/docs");

    // The parameter's name spelled with an escape is still the link (never forwarded).
    let tok = gw.token("acme", &claims("alice"));
    let r = get(&gw, "acme", &format!("/docs?magic%5Flink={tok}&c=3")).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/docs?c=3");

    // A path that a browser would read as another site (`//host/...`) is not an open
    // redirect: the answer stays on this host.
    for evil in ["//evil.example/x", "///evil.example/x"] {
        let tok = gw.token("acme", &claims("alice"));
        let r = get(&gw, "acme", &format!("{evil}?magic_link={tok}")).await;
        assert_eq!(r.status(), 303, "{evil}");
        assert_location(&r, &gw, "links.acme.test", "/evil.example/x");
    }
    assert!(
        gw.upstream("acme").requests().is_empty(),
        "link requests must not be forwarded"
    );
}

#[tokio::test]
async fn both_forms_present_path_wins_and_param_removed() {
    let gw = Gateway::default().await;
    let good = gw.token("acme", &claims("alice"));
    let bad = sign_hs(
        b"not-the-key-not-the-key-not-the-key!",
        Algorithm::HS256,
        Some("k1"),
        &claims("mallory"),
    );

    // Good path token, bad query token: the path token decides.
    let r = get(&gw, "acme", &format!("/login/{good}?magic_link={bad}")).await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    let loc = header(&r, "location").unwrap();
    assert!(
        !loc.contains("magic_link"),
        "magic_link kept in Location {loc}"
    );
    assert!(!loc.contains(&bad) && !loc.contains(&good));
    assert_location(&r, &gw, "links.acme.test", "/");

    // Bad path token, good query token: still the path token decides.
    let good2 = gw.token("acme", &claims("alice"));
    let r = get(&gw, "acme", &format!("/login/{bad}?magic_link={good2}")).await;
    expect_error(r, 401, "link_bad_signature").await;
}

#[tokio::test]
async fn redirect_claim_sets_location() {
    let gw = Gateway::default().await;
    let mut c = claims("alice");
    c["redirect"] = json!("/dashboard/x?tab=2");
    let r = login_path(&gw, "acme", &gw.token("acme", &c)).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/dashboard/x?tab=2");

    // Query form with a redirect claim: the claim wins over the clean URL.
    let mut c = claims("alice");
    c["redirect"] = json!("/elsewhere");
    let tok = gw.token("acme", &c);
    let r = get(&gw, "acme", &format!("/docs?magic_link={tok}")).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/elsewhere");
}

#[tokio::test]
async fn malformed_links_are_rejected() {
    let gw = Gateway::default().await;
    let secret = default_secret("acme");
    let hs = |c: &Value| sign_hs(&secret, Algorithm::HS256, Some("k1"), c);
    let good = hs(&claims("alice"));
    let parts: Vec<&str> = good.split('.').collect();
    let hdr = json!({"alg":"HS256","kid":"k1","typ":"JWT"});

    let mut no_exp = claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut str_exp = claims("alice");
    str_exp["exp"] = json!("tomorrow");
    let mut one_time_no_jti = claims("alice");
    one_time_no_jti.as_object_mut().unwrap().remove("jti");
    one_time_no_jti["one_time"] = json!(true);
    let mut no_subject = claims("alice");
    no_subject.as_object_mut().unwrap().remove("sub");
    let mut empty_sub = claims("");
    empty_sub.as_object_mut().unwrap().remove("user_id");
    let mut big = claims("alice");
    big["pad"] = json!("x".repeat(9 * 1024));

    let cases: Vec<(&str, String)> = vec![
        ("two parts", format!("{}.{}", parts[0], parts[1])),
        ("four parts", format!("{good}.{}", parts[2])),
        ("empty signature", format!("{}.{}.", parts[0], parts[1])),
        (
            "non-base64url payload",
            format!("{}.{}!!.{}", parts[0], parts[1], parts[2]),
        ),
        (
            "header not JSON",
            craft_hs256(&secret, b"not json", claims("alice").to_string().as_bytes()),
        ),
        (
            "payload not JSON",
            craft_hs256(&secret, hdr.to_string().as_bytes(), b"{\"sub\":"),
        ),
        ("exp missing", hs(&no_exp)),
        ("exp not numeric", hs(&str_exp)),
        ("one_time without jti", hs(&one_time_no_jti)),
        ("no sub and no user_id", hs(&no_subject)),
        ("empty sub and no user_id", hs(&empty_sub)),
        ("over 8 KiB", hs(&big)),
    ];
    for (name, tok) in cases {
        let r = login_path(&gw, "acme", &tok).await;
        let st = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            st == 401 && v["error"] == "link_malformed",
            "case `{name}`: got {st} {text}"
        );
    }
    // The same token shapes in the query form.
    let r = get(
        &gw,
        "acme",
        &format!("/x?magic_link={}.{}", parts[0], parts[1]),
    )
    .await;
    expect_error(r, 401, "link_malformed").await;
}

#[tokio::test]
async fn bad_signatures_are_rejected() {
    let gw = Gateway::default().await;
    let secret = default_secret("acme");
    let c = claims("alice");
    let good = sign_hs(&secret, Algorithm::HS256, Some("k1"), &c);
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered_claims = c.clone();
    tampered_claims["sub"] = json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(tampered_claims.to_string().as_bytes()),
        parts[2]
    );

    let cases: Vec<(&str, String)> = vec![
        (
            "wrong secret",
            sign_hs(
                b"another-secret-another-secret-another!",
                Algorithm::HS256,
                Some("k1"),
                &c,
            ),
        ),
        (
            "unknown kid",
            sign_hs(&secret, Algorithm::HS256, Some("k9"), &c),
        ),
        (
            "alg HS384 for an HS256 key",
            sign_hs(&secret, Algorithm::HS384, Some("k1"), &c),
        ),
        (
            "alg none",
            craft(&json!({"alg":"none","kid":"k1"}), &c, "AAAA"),
        ),
        (
            "alg none, no kid",
            craft(&json!({"alg":"none"}), &c, "AAAA"),
        ),
        ("tampered payload", tampered),
        (
            "garbage signature",
            format!("{}.{}.AAAAAAAA", parts[0], parts[1]),
        ),
    ];
    for (name, tok) in cases {
        let r = login_path(&gw, "acme", &tok).await;
        let st = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            st == 401 && v["error"] == "link_bad_signature",
            "case `{name}`: got {st} {text}"
        );
    }
    assert!(gw.upstream("acme").requests().is_empty());
}

#[tokio::test]
async fn kid_selects_key_without_fallback_and_no_kid_tries_each() {
    let k1 = KeyCfg::hs256("k1", b"first-key-first-key-first-key-first-key".to_vec());
    let k2 = KeyCfg::hs256("k2", b"second-key-second-key-second-key-second".to_vec());
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").keys(vec![k1.clone(), k2.clone()])
    ]))
    .await;
    let s2 = k2.secret_bytes().unwrap();
    // Signed with k2, labelled k2: ok.
    let r = login_path(
        &gw,
        "acme",
        &sign_hs(&s2, Algorithm::HS256, Some("k2"), &claims("a")),
    )
    .await;
    assert_eq!(r.status(), 303);
    // Signed with k2, no kid: each key in turn -> ok.
    let r = login_path(
        &gw,
        "acme",
        &sign_hs(&s2, Algorithm::HS256, None, &claims("a")),
    )
    .await;
    assert_eq!(r.status(), 303, "no-kid token should try every key");
    // Signed with k2 but labelled k1: no fallback.
    let r = login_path(
        &gw,
        "acme",
        &sign_hs(&s2, Algorithm::HS256, Some("k1"), &claims("a")),
    )
    .await;
    expect_error(r, 401, "link_bad_signature").await;
}

#[tokio::test]
async fn eddsa_keys_verify_and_alg_confusion_fails() {
    let ed = KeyCfg::ed25519("ed1");
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").keys(vec![ed.clone()])
    ]))
    .await;
    let r = login_path(&gw, "acme", &ed.sign(&claims("alice"))).await;
    assert_eq!(r.status(), 303, "EdDSA link: {}", r.text().await.unwrap());

    // HS256 "signed" with the public key PEM as HMAC secret (classic alg confusion).
    let KeyMaterial::PublicKey { public_pem, .. } = &ed.material else {
        unreachable!()
    };
    let forged = sign_hs(
        public_pem.as_bytes(),
        Algorithm::HS256,
        Some("ed1"),
        &claims("alice"),
    );
    expect_error(
        login_path(&gw, "acme", &forged).await,
        401,
        "link_bad_signature",
    )
    .await;
    // Another Ed25519 key with the same kid.
    let other = KeyCfg::ed25519("ed1");
    expect_error(
        login_path(&gw, "acme", &other.sign(&claims("alice"))).await,
        401,
        "link_bad_signature",
    )
    .await;
}

#[tokio::test]
async fn time_checks_with_30s_leeway() {
    let gw = Gateway::default().await;
    let t = now();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice");
        f(&mut c);
        gw.token("acme", &c)
    };
    let expired = with(&|c| c["exp"] = json!(t - 90));
    expect_error(login_path(&gw, "acme", &expired).await, 401, "link_expired").await;
    let in_leeway = with(&|c| c["exp"] = json!(t - 10));
    assert_eq!(
        login_path(&gw, "acme", &in_leeway).await.status(),
        303,
        "exp within leeway"
    );
    let nbf_future = with(&|c| c["nbf"] = json!(t + 120));
    expect_error(
        login_path(&gw, "acme", &nbf_future).await,
        401,
        "link_not_yet_valid",
    )
    .await;
    let iat_future = with(&|c| c["iat"] = json!(t + 120));
    expect_error(
        login_path(&gw, "acme", &iat_future).await,
        401,
        "link_not_yet_valid",
    )
    .await;
    let nbf_leeway = with(&|c| c["nbf"] = json!(t + 10));
    assert_eq!(
        login_path(&gw, "acme", &nbf_leeway).await.status(),
        303,
        "nbf within leeway"
    );
}

#[tokio::test]
async fn tenant_and_space_id_claims_must_match_host_tenant() {
    let gw = Gateway::default().await;
    for (k, v) in [("tenant", "globex"), ("space_id", "globex")] {
        let mut c = claims("alice");
        c[k] = json!(v);
        let r = login_path(&gw, "acme", &gw.token("acme", &c)).await;
        expect_error(r, 401, "link_wrong_tenant").await;
    }
    let mut c = claims("alice");
    c["tenant"] = json!("acme");
    assert_eq!(
        login_path(&gw, "acme", &gw.token("acme", &c))
            .await
            .status(),
        303
    );
}

#[tokio::test]
async fn cross_tenant_links() {
    // Different secrets: acme's link on globex's host fails the signature.
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &claims("alice"));
    expect_error(
        login_path(&gw, "globex", &tok).await,
        401,
        "link_bad_signature",
    )
    .await;
    drop(gw);

    // Same secret and kid on both tenants: the tenant claim decides.
    let shared = b"shared-secret-shared-secret-shared-secret".to_vec();
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").keys(vec![KeyCfg::hs256("k1", shared.clone())]),
        TenantCfg::new("globex").keys(vec![KeyCfg::hs256("k1", shared.clone())]),
    ]))
    .await;
    let mut c = claims("alice");
    c["tenant"] = json!("acme");
    let tok = gw.token("acme", &c);
    expect_error(
        login_path(&gw, "globex", &tok).await,
        401,
        "link_wrong_tenant",
    )
    .await;
    assert_eq!(login_path(&gw, "acme", &tok).await.status(), 303);
}

#[tokio::test]
async fn subject_falls_back_to_user_id() {
    let gw = Gateway::default().await;
    for (c, expected) in [
        (json!({"user_id": "u-17", "exp": now() + 600}), "u-17"),
        (json!({"sub": "", "user_id": 42, "exp": now() + 600}), "42"),
    ] {
        let cookie = gw.redeem("acme", &gw.token("acme", &c)).await;
        let r = gw.get_with_cookie("acme", "/whoami", &cookie).await;
        assert_eq!(r.status(), 200);
        let rec = gw.upstream("acme").last("/whoami").unwrap();
        assert_eq!(rec.header("x-linkgate-subject"), Some(expected));
    }
}

#[tokio::test]
async fn bad_redirects_are_rejected_with_400() {
    let gw = Gateway::default().await;
    let bad = [
        "//evil.example/x",
        "https://evil.example/",
        "evil",
        "/\\evil.example",
        "/a\\b",
        "/a b",
        "/a\tb",
        "/a%20b",
        "/a%0d%0aSet-Cookie:%20x=1",
        "/a%5Cb",
        "/%09x",
        "/a\u{7f}",
        "",
    ];
    for red in bad {
        let mut c = claims("alice");
        c["redirect"] = json!(red);
        let r = login_path(&gw, "acme", &gw.token("acme", &c)).await;
        let st = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            st == 400 && v["error"] == "link_bad_redirect",
            "redirect {red:?}: got {st} {text}"
        );
    }
}

#[tokio::test]
async fn checks_run_in_spec_order() {
    let gw = Gateway::default().await;
    let t = now();
    // 1 before 3: missing exp and a bad signature -> malformed.
    let c = json!({"sub": "a"});
    let tok = sign_hs(
        b"wrong-wrong-wrong-wrong-wrong-wrong-wrong",
        Algorithm::HS256,
        Some("k1"),
        &c,
    );
    expect_error(login_path(&gw, "acme", &tok).await, 401, "link_malformed").await;
    // 3 before 4: expired and a bad signature -> bad_signature.
    let c = json!({"sub": "a", "exp": t - 1000});
    let tok = sign_hs(
        b"wrong-wrong-wrong-wrong-wrong-wrong-wrong",
        Algorithm::HS256,
        Some("k1"),
        &c,
    );
    expect_error(
        login_path(&gw, "acme", &tok).await,
        401,
        "link_bad_signature",
    )
    .await;
    // 4 before 5: expired and wrong tenant -> expired.
    let c = json!({"sub": "a", "exp": t - 1000, "tenant": "globex"});
    expect_error(
        login_path(&gw, "acme", &gw.token("acme", &c)).await,
        401,
        "link_expired",
    )
    .await;
    // 5 before 6: wrong tenant and no subject -> wrong_tenant.
    let c = json!({"exp": t + 600, "tenant": "globex"});
    expect_error(
        login_path(&gw, "acme", &gw.token("acme", &c)).await,
        401,
        "link_wrong_tenant",
    )
    .await;
    // 6 before 7: no subject and a bad redirect -> malformed.
    let c = json!({"exp": t + 600, "redirect": "//evil"});
    expect_error(
        login_path(&gw, "acme", &gw.token("acme", &c)).await,
        401,
        "link_malformed",
    )
    .await;
    // 7 before 9: bad redirect and a binding mismatch -> bad_redirect.
    let c = json!({"sub": "a", "exp": t + 600, "redirect": "//evil", "ip": "10.9.8.7"});
    expect_error(
        login_path(&gw, "acme", &gw.token("acme", &c)).await,
        400,
        "link_bad_redirect",
    )
    .await;
}

#[tokio::test]
async fn ip_and_ua_binding() {
    let gw = Gateway::default().await;
    let with = |k: &str, v: &str| {
        let mut c = claims("alice");
        c[k] = json!(v);
        gw.token("acme", &c)
    };
    expect_error(
        login_path(&gw, "acme", &with("ip", "10.1.2.3")).await,
        403,
        "link_binding_mismatch",
    )
    .await;
    assert_eq!(
        login_path(&gw, "acme", &with("ip", "127.0.0.1"))
            .await
            .status(),
        303
    );

    let ua_tok = with("ua", "LinkTester/1.0");
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{ua_tok}")))
        .header("user-agent", "OtherAgent/2.0")
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "link_binding_mismatch").await;
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{ua_tok}")))
        .header("user-agent", "LinkTester/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);

    // Check 9 runs before check 10: a used one-time link from the wrong agent is a mismatch.
    let mut c = claims("alice");
    c["ua"] = json!("LinkTester/1.0");
    c["one_time"] = json!(true);
    let once = gw.token("acme", &c);
    let send = |ua: &'static str| {
        gw.client()
            .post(gw.url("acme", &format!("/login/{once}")))
            .header("user-agent", ua)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("")
            .send()
    };
    assert_eq!(send("LinkTester/1.0").await.unwrap().status(), 303);
    expect_error(send("LinkTester/1.0").await.unwrap(), 410, "link_used").await;
    expect_error(
        send("Other/1.0").await.unwrap(),
        403,
        "link_binding_mismatch",
    )
    .await;
}

#[tokio::test]
async fn errors_are_html_when_accept_html() {
    let gw = Gateway::default().await;
    let mut c = claims("alice");
    c["exp"] = json!(now() - 1000);
    let tok = gw.token("acme", &c);
    let json_msg = expect_error(login_path(&gw, "acme", &tok).await, 401, "link_expired").await
        ["message"]
        .as_str()
        .unwrap()
        .to_string();

    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{tok}")))
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ct = header(&r, "content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "content-type {ct}");
    assert!(!header(&r, "connection")
        .unwrap_or_default()
        .eq_ignore_ascii_case("close"));
    let body = r.text().await.unwrap();
    assert!(
        body.to_ascii_lowercase().contains("<html") || body.contains("<!"),
        "{body}"
    );
    let esc = json_msg
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let variants = [
        json_msg.clone(),
        esc.clone(),
        esc.replace('\'', "&#39;").replace('"', "&quot;"),
        esc.replace('\'', "&#x27;").replace('"', "&quot;"),
    ];
    assert!(
        variants.iter().any(|m| body.contains(m)),
        "HTML lacks message {json_msg:?}: {body}"
    );
    assert!(!body.contains(&tok), "token in HTML body");

    // Same for a session error.
    let r = gw
        .client()
        .get(gw.url("acme", "/private"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(header(&r, "content-type")
        .unwrap_or_default()
        .starts_with("text/html"));
}

#[tokio::test]
async fn key_sources_inline_env_and_file_with_trailing_newline() {
    let file_nl = KeyCfg::hs256(
        "k1",
        b"file-secret-with-newline-0123456789abcdef\n".to_vec(),
    );
    let inline = KeyCfg {
        kid: "k1".into(),
        alg: Algorithm::HS384,
        material: KeyMaterial::Secret("inline-secret-0123456789abcdefghijklmnopqrstuvw".into()),
    };
    let env = KeyCfg {
        kid: "k1".into(),
        alg: Algorithm::HS512,
        material: KeyMaterial::SecretEnv(
            "LINKGATE_IT_SECRET".into(),
            "env-secret-0123456789abcdefghijklmnopqrstuvwxyz".into(),
        ),
    };
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").keys(vec![file_nl]),
        TenantCfg::new("globex").keys(vec![inline]),
        TenantCfg::new("initech").keys(vec![env]),
    ]))
    .await;
    for t in ["acme", "globex", "initech"] {
        let r = login_path(&gw, t, &gw.token(t, &claims("alice"))).await;
        assert_eq!(r.status(), 303, "tenant {t}: {}", r.text().await.unwrap());
    }
    // The trailing newline is not part of the key.
    let with_nl = sign_hs(
        b"file-secret-with-newline-0123456789abcdef\n",
        Algorithm::HS256,
        Some("k1"),
        &claims("a"),
    );
    expect_error(
        login_path(&gw, "acme", &with_nl).await,
        401,
        "link_bad_signature",
    )
    .await;
}

#[tokio::test]
async fn token_never_reaches_upstream_or_logs() {
    // At debug level too (RUST_LOG is read by the gateway's env filter, if any).
    let mut p = Prepared::new(GatewayCfg::default());
    p.env.push(("RUST_LOG".into(), "debug".into()));
    let gw = Gateway::start_prepared(p).await;
    let good = gw.token("acme", &claims("alice"));
    let mut c = claims("alice");
    c["exp"] = json!(now() - 1000);
    let expired = gw.token("acme", &c);
    let forged = sign_hs(
        b"forged-forged-forged-forged-forged-forged",
        Algorithm::HS256,
        Some("k1"),
        &claims("m"),
    );
    let q = gw.token("acme", &claims("bob"));

    let r = login_path(&gw, "acme", &good).await;
    assert_eq!(r.status(), 303);
    let cookie = session_cookie(&r).unwrap().value;
    // Follow the redirect with the session.
    assert_eq!(gw.get_with_cookie("acme", "/", &cookie).await.status(), 200);
    assert_eq!(login_path(&gw, "acme", &expired).await.status(), 401);
    assert_eq!(login_path(&gw, "acme", &forged).await.status(), 401);
    let r = get(&gw, "acme", &format!("/docs?magic_link={q}")).await;
    assert_eq!(r.status(), 303);
    // A request with a session and a link in the query: still never forwarded with the token.
    let q2 = gw.token("acme", &claims("alice"));
    let _ = gw
        .get_with_cookie("acme", &format!("/docs?magic_link={q2}"), &cookie)
        .await;

    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let up = gw.upstream("acme").dump();
    let log = gw.log();
    for t in [&good, &expired, &forged, &q, &q2] {
        let sig = t.rsplit('.').next().unwrap();
        let payload = t.split('.').nth(1).unwrap();
        assert!(
            !up.contains(sig) && !up.contains(payload),
            "token reached upstream:\n{up}"
        );
        let leaks: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(sig) || l.contains(payload))
            .map(|l| &l[..l.len().min(300)])
            .collect();
        assert!(
            leaks.is_empty(),
            "token in gateway log:\n{}",
            leaks.join("\n")
        );
    }
}
