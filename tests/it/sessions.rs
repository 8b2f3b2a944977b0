//! SPEC section 4: sessions, forwarding, header hygiene, path rules, non-forwarded answers.

use std::time::Duration;

use crate::harness::*;
use serde_json::json;

#[tokio::test]
async fn forwarded_request_has_identity_headers_and_verifiable_assertion() {
    let gw = Gateway::default().await;
    let mut c = claims("alice");
    c["email"] = json!("alice@acme.example");
    c["name"] = json!("Alice A");
    c["ctx"] = json!({"plan": "pro", "seats": 3});
    c["favourite_colour"] = json!("teal");
    let jti = c["jti"].as_str().unwrap().to_string();
    let cookie = gw.redeem("acme", &gw.token("acme", &c)).await;

    let r = gw.get_with_cookie("acme", "/app/page?x=1", &cookie).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /app/page");
    let rec = gw.upstream("acme").last("/app/page").unwrap();
    assert_eq!(rec.uri, "/app/page?x=1");
    assert_eq!(rec.header("x-linkgate-subject"), Some("alice"));
    assert_eq!(rec.header("x-linkgate-email"), Some("alice@acme.example"));
    assert_eq!(rec.header("x-linkgate-name"), Some("Alice A"));
    assert_eq!(rec.header("x-linkgate-tenant"), Some("acme"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));

    let assertion = rec
        .header("x-linkgate-assertion")
        .expect("assertion header");
    let a = gw.verify_assertion("acme", assertion).await;
    assert_eq!(a["aud"], "acme");
    assert_eq!(a["sub"], "alice");
    assert_eq!(a["email"], "alice@acme.example");
    assert_eq!(a["name"], "Alice A");
    assert_eq!(a["jti"], jti.as_str());
    assert_eq!(a["ctx"], json!({"plan": "pro", "seats": 3}));
    assert_eq!(
        a["favourite_colour"], "teal",
        "unknown claims are kept: {a}"
    );
}

#[tokio::test]
async fn custom_headers_map_is_applied_and_its_names_are_stripped() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")
        .extra(
            r#"public_paths = ["/pub"]
headers = { sub = "X-User", email = "X-Mail" }"#,
        )]))
    .await;
    let mut c = claims("alice");
    c["email"] = json!("alice@acme.example");
    let cookie = gw.redeem("acme", &gw.token("acme", &c)).await;
    let r = gw
        .client()
        .get(gw.url("acme", "/p"))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .header("x-user", "mallory")
        .header("x_mail", "mallory@evil")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/p").unwrap();
    assert_eq!(rec.headers_all("x-user"), vec!["alice"]);
    assert_eq!(rec.headers_all("x-mail"), vec!["alice@acme.example"]);
    assert!(rec.header("x_mail").is_none());
    assert!(!rec.dump().contains("mallory"), "{}", rec.dump());

    // On a public path too.
    let r = gw
        .client()
        .get(gw.url("acme", "/pub"))
        .header("X-USER", "mallory")
        .header("x_user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/pub").unwrap();
    assert!(!rec.dump().contains("mallory"), "{}", rec.dump());
}

fn forged(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    rb.header("X-Linkgate-Subject", "mallory")
        .header("x_linkgate_subject", "mallory")
        .header("X-LINKGATE-EMAIL", "mallory@evil.example")
        .header("X-Linkgate-Tenant", "evilcorp")
        .header("X-Linkgate-Assertion", "forged.assertion.mallory")
        .header("x-linkgate-whatever", "mallory")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Proto", "gopher")
        .header("X-Forwarded-Host", "evil.example")
}

fn assert_clean(rec: &Recorded) {
    let dump = rec.dump();
    for bad in ["mallory", "evilcorp", "6.6.6.6", "gopher", "evil.example"] {
        assert!(
            !dump.contains(bad),
            "forged value {bad:?} reached upstream:\n{dump}"
        );
    }
    assert!(rec.header("x_linkgate_subject").is_none());
    assert_eq!(rec.headers_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(rec.headers_all("x-forwarded-proto"), vec!["https"]);
    let xfh = rec.headers_all("x-forwarded-host");
    assert_eq!(xfh.len(), 1, "one X-Forwarded-Host: {xfh:?}");
    assert!(
        xfh[0].starts_with("links.acme.test"),
        "X-Forwarded-Host {xfh:?}"
    );
}

#[tokio::test]
async fn forged_identity_and_forwarding_headers_never_reach_upstream() {
    let gw = Gateway::default().await;
    let cookie = gw.login("acme", "alice").await;
    let r = forged(gw.client_h1().get(gw.url("acme", "/secure")))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/secure").unwrap();
    assert_clean(&rec);
    assert_eq!(rec.headers_all("x-linkgate-subject"), vec!["alice"]);
    assert_eq!(rec.headers_all("x-linkgate-tenant"), vec!["acme"]);
    assert!(
        rec.header("x-linkgate-email").is_none(),
        "no email claim, no email header"
    );

    // Public path, no session: all of them removed, none added.
    let r = forged(gw.client_h1().get(gw.url("acme", "/static/app.js")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/static/app.js").unwrap();
    assert_clean(&rec);
    assert!(rec.header("x-linkgate-subject").is_none());
    assert!(rec.header("x-linkgate-assertion").is_none());
}

#[tokio::test]
async fn session_cookie_is_removed_other_cookies_kept() {
    let gw = Gateway::default().await;
    let cookie = gw.login("acme", "alice").await;
    let r = gw
        .client()
        .get(gw.url("acme", "/c"))
        .header("cookie", format!("theme=dark; {COOKIE}={cookie}; lang=en"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/c").unwrap();
    let sent = rec.headers_all("cookie").join("; ");
    assert!(sent.contains("theme=dark"), "cookies upstream: {sent:?}");
    assert!(sent.contains("lang=en"), "cookies upstream: {sent:?}");
    assert!(
        !sent.contains(COOKIE) && !sent.contains(&cookie),
        "session cookie forwarded: {sent:?}"
    );

    // Only the session cookie: no Cookie header with it upstream.
    let _ = gw.get_with_cookie("acme", "/c2", &cookie).await;
    let rec = gw.upstream("acme").last("/c2").unwrap();
    assert!(!rec.dump().contains(&cookie));
}

/// HTTP/2 clients split cookies into one `cookie` field each (RFC 9113 §8.2.3): the session
/// cookie must go whichever field it is in.
#[tokio::test]
async fn session_cookie_is_removed_from_any_cookie_field() {
    let gw = Gateway::default().await;
    let cookie = gw.login("acme", "alice").await;
    let r = gw
        .client()
        .get(gw.url("acme", "/crumbs"))
        .header("cookie", "theme=dark")
        .header("cookie", format!("{COOKIE}={cookie}"))
        .header("cookie", "lang=en")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/crumbs").unwrap();
    assert_eq!(rec.header("x-linkgate-subject"), Some("alice"));
    let sent = rec.headers_all("cookie");
    assert!(
        !rec.dump().contains(&cookie) && !sent.iter().any(|c| c.contains(COOKIE)),
        "session cookie forwarded: {sent:?}"
    );
    let sent = sent.join("; ");
    assert!(
        sent.contains("theme=dark") && sent.contains("lang=en"),
        "cookies upstream: {sent:?}"
    );
}

#[tokio::test]
async fn missing_and_invalid_sessions() {
    let gw = Gateway::default().await;
    let r = gw
        .client()
        .get(gw.url("acme", "/private"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "session_required").await;

    let r = gw.get_with_cookie("acme", "/private", "garbage").await;
    expect_error(r, 401, "session_invalid").await;

    let cookie = gw.login("acme", "alice").await;
    // Tamper with one character in the middle.
    let mut bytes: Vec<char> = cookie.chars().collect();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == 'A' { 'B' } else { 'A' };
    let tampered: String = bytes.into_iter().collect();
    let r = gw.get_with_cookie("acme", "/private", &tampered).await;
    expect_error(r, 401, "session_invalid").await;
    // Truncated.
    let r = gw
        .get_with_cookie("acme", "/private", &cookie[..cookie.len() - 4])
        .await;
    expect_error(r, 401, "session_invalid").await;

    // Another tenant's cookie.
    let r = gw.get_with_cookie("globex", "/private", &cookie).await;
    expect_error(r, 401, "session_invalid").await;
    // The original still works.
    assert_eq!(
        gw.get_with_cookie("acme", "/private", &cookie)
            .await
            .status(),
        200
    );
    assert!(gw.upstream("globex").requests().is_empty());
    assert_eq!(gw.upstream("acme").requests().len(), 1);
}

#[tokio::test]
async fn session_from_another_gateway_secret_is_invalid() {
    // A cookie made with another `[session] secret_file` is refused (rotation ends sessions).
    let gw1 = Gateway::default().await;
    let cookie = gw1.login("acme", "alice").await;
    let gw2 = Gateway::start(GatewayCfg {
        session_secret: vec![9u8; 48],
        ..GatewayCfg::default()
    })
    .await;
    let r = gw2.get_with_cookie("acme", "/private", &cookie).await;
    expect_error(r, 401, "session_invalid").await;
    assert_eq!(
        gw1.get_with_cookie("acme", "/private", &cookie)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn login_url_redirects_visitors_without_session() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").extra(r#"login_url = "https://app.acme.example/signin""#)
    ]))
    .await;
    let r = gw
        .client()
        .get(gw.url("acme", "/private"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        header(&r, "location").as_deref(),
        Some("https://app.acme.example/signin")
    );
    let r = gw.get_with_cookie("acme", "/private", "garbage").await;
    assert_eq!(r.status(), 302, "no usable session -> login_url");
    let cookie = gw.login("acme", "alice").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/private", &cookie)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn public_paths_prefix_rule() {
    let gw = Gateway::default().await; // acme: public_paths = ["/static/", "/pub"]
    for p in [
        "/static/app.js",
        "/static/",
        "/static/a/b.css",
        "/pub",
        "/pub/x",
        "/pub/x/y",
    ] {
        let r = gw.client().get(gw.url("acme", p)).send().await.unwrap();
        assert_eq!(r.status(), 200, "public {p}");
        assert!(gw.upstream("acme").last(p).is_some(), "{p} not forwarded");
    }
    for p in ["/public", "/pubx", "/static", "/staticx/a", "/"] {
        let r = gw.client().get(gw.url("acme", p)).send().await.unwrap();
        expect_error(r, 401, "session_required").await;
    }
    // globex has no public paths.
    let r = gw
        .client()
        .get(gw.url("globex", "/static/app.js"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "session_required").await;
}

#[tokio::test]
async fn paths_claim_limits_the_session() {
    let gw = Gateway::default().await;
    let mut c = claims("alice");
    c["paths"] = json!(["/app", "/docs/"]);
    let cookie = gw.redeem("acme", &gw.token("acme", &c)).await;
    for p in ["/app", "/app/x", "/docs/a", "/docs/a/b"] {
        assert_eq!(
            gw.get_with_cookie("acme", p, &cookie).await.status(),
            200,
            "{p}"
        );
    }
    for p in ["/apple", "/", "/other", "/application/x"] {
        expect_error(
            gw.get_with_cookie("acme", p, &cookie).await,
            403,
            "forbidden_path",
        )
        .await;
    }
    // Climbing out of an allowed prefix is caught after normalisation.
    let r = raw_get(
        &gw,
        "links.acme.test",
        "/app/../secret",
        &[format!("Cookie: {COOKIE}={cookie}")],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "forbidden_path");
    assert!(gw.upstream("acme").last("/secret").is_none());
    assert!(gw.upstream("acme").last("/apple").is_none());
}

#[tokio::test]
async fn paths_are_normalised_before_matching_and_forwarding() {
    let gw = Gateway::default().await;
    let cookie = gw.login("acme", "alice").await;
    let ck = [format!("Cookie: {COOKIE}={cookie}")];
    let cases = [
        ("/a/./b/../c", "/a/c"),
        ("/x/%2e%2e/y", "/y"),
        ("/x/%2E%2E/z?k=v", "/z"),
        ("/%61pp/%7Euser", "/app/~user"),
    ];
    for (raw, expected) in cases {
        let r = raw_get(&gw, "links.acme.test", raw, &ck).await;
        assert_eq!(r.status, 200, "{raw}: {r:?}");
        assert_eq!(r.body, format!("upstream ok {expected}"), "{raw}");
    }
    assert_eq!(gw.upstream("acme").last("/z").unwrap().uri, "/z?k=v");
    for raw in ["/../x", "/a/../../x", "/%2e%2e/x", "/a/%2E%2E/%2e%2e/x"] {
        let r = raw_get(&gw, "links.acme.test", raw, &ck).await;
        assert_eq!(r.status, 400, "{raw}: {r:?}");
        assert_eq!(r.json()["error"], "bad_path", "{raw}");
        let ct = r.header("content-type").unwrap_or_default();
        assert!(ct.contains("application/json"), "{raw}: content-type {ct}");
    }
    // A public prefix cannot be used to climb to a private path.
    let r = raw_get(&gw, "links.acme.test", "/static/../private", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "session_required");
    let r = raw_get(&gw, "links.acme.test", "/static/%2e%2e/private", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(gw.upstream("acme").last("/private").is_none());
    // And a public path reached through dot segments is public.
    let r = raw_get(&gw, "links.acme.test", "/x/../static/a.css", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "upstream ok /static/a.css");
}

#[tokio::test]
async fn upstream_unreachable_is_502() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")
        .extra(r#"public_paths = ["/pub"]"#)
        .dead_upstream()]))
    .await;
    let r = gw
        .client()
        .get(gw.url("acme", "/pub"))
        .send()
        .await
        .unwrap();
    expect_error(r, 502, "upstream_unavailable").await;
    let cookie = gw.login("acme", "alice").await;
    expect_error(
        gw.get_with_cookie("acme", "/x", &cookie).await,
        502,
        "upstream_unavailable",
    )
    .await;
}

#[tokio::test]
async fn session_expires_after_tenant_session_ttl() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").extra(r#"session_ttl = "2s""#)
    ]))
    .await;
    let cookie = gw.login("acme", "alice").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/x", &cookie).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    expect_error(
        gw.get_with_cookie("acme", "/x", &cookie).await,
        401,
        "session_invalid",
    )
    .await;
}

#[tokio::test]
async fn cookie_stays_small_with_large_claims() {
    let gw = Gateway::default().await;
    let mut c = claims("alice");
    c["ctx"] = json!({"blob": "y".repeat(5000)});
    let tok = gw.token("acme", &c);
    assert!(
        tok.len() < 8192,
        "test token must stay under 8 KiB ({})",
        tok.len()
    );
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{tok}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let raw = header(&r, "set-cookie").unwrap();
    let cookie = session_cookie(&r).unwrap().value;
    assert!(raw.len() < 4096, "Set-Cookie is {} bytes", raw.len());
    let r = gw.get_with_cookie("acme", "/big", &cookie).await;
    assert_eq!(r.status(), 200);
    let rec = gw.upstream("acme").last("/big").unwrap();
    let a = gw
        .verify_assertion("acme", rec.header("x-linkgate-assertion").unwrap())
        .await;
    assert_eq!(a["ctx"]["blob"].as_str().map(str::len), Some(5000));
}

#[tokio::test]
async fn several_upstreams_round_robin() {
    let mut t = TenantCfg::new("acme").extra(r#"public_paths = ["/pub"]"#);
    t.more_upstreams = vec![true];
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![t])).await;
    for i in 0..6 {
        let r = gw
            .client()
            .get(gw.url("acme", &format!("/pub/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let a = gw.upstream("acme").requests().len();
    let b = gw.more_upstreams["acme"].0[0].requests().len();
    assert_eq!(a + b, 6);
    assert!(a >= 2 && b >= 2, "round robin expected, got {a}/{b}");
}

#[tokio::test]
async fn dead_upstream_is_taken_out_by_health_checks() {
    let mut t = TenantCfg::new("acme").extra(r#"public_paths = ["/pub"]"#);
    t.more_upstreams = vec![false];
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![t])).await;
    // Within a while, every request lands on the live upstream.
    let ok = eventually(Duration::from_secs(15), || async {
        let mut all = true;
        for i in 0..4 {
            let r = gw
                .client()
                .get(gw.url("acme", &format!("/pub/{i}")))
                .send()
                .await
                .unwrap();
            all &= r.status() == 200;
        }
        all
    })
    .await;
    assert!(ok, "requests still reach the dead upstream after 15 s");
}
