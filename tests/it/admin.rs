//! SPEC section 6 (links, revocations, auth) and the open admin endpoints.

use std::time::Duration;

use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Rewrites a link URL (`https://host/...`) to the test port.
fn local(gw: &Gateway, url: &str) -> String {
    let rest = url.strip_prefix("https://").expect("https URL");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = hostport.split(':').next().unwrap();
    gw.url_host(host, if path.is_empty() { "/" } else { path })
}

fn rfc3339_to_unix(s: &str) -> i64 {
    let z = match s.strip_suffix("+00:00") {
        Some(b) => format!("{b}Z"),
        None => s.to_string(),
    };
    let t = humantime::parse_rfc3339(&z).unwrap_or_else(|e| panic!("bad RFC 3339 UTC {s:?}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn admin_requires_bearer_except_open_endpoints() {
    let gw = Gateway::default().await;
    let c = plain_client();
    let body = json!({"tenant": "acme", "sub": "alice"});
    for (m, path) in [
        (Method::POST, "/v1/links"),
        (Method::POST, "/v1/revocations"),
        (Method::GET, "/v1/domains"),
    ] {
        let r = c
            .request(m.clone(), gw.admin_url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_admin_error(r, 401, "unauthorized").await;
        let r = c
            .request(m.clone(), gw.admin_url(path))
            .bearer_auth("wrong-token")
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_admin_error(r, 401, "unauthorized").await;
        let r = c
            .request(m.clone(), gw.admin_url(path))
            .header("authorization", format!("Basic {ADMIN_TOKEN}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_admin_error(r, 401, "unauthorized").await;
    }
    for path in ["/healthz", "/readyz", "/metrics", "/v1/jwks.json"] {
        let r = c.get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} must be open");
    }
    // With the token it works.
    let r = gw.admin_post("/v1/links", &body).await;
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn post_links_returns_a_working_url() {
    let gw = Gateway::default().await;
    let r = gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "alice", "ttl": "1h", "claims": {"email": "alice@acme.example"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let url = v["url"].as_str().expect("url");
    let token = v["token"].as_str().expect("token");
    let jti = v["jti"].as_str().expect("jti");
    let exp_at = v["expires_at"].as_str().expect("expires_at");
    assert!(
        url == format!("https://links.acme.test/login/{token}")
            || url == format!("https://links.acme.test:{}/login/{token}", gw.https_port),
        "url {url}"
    );
    let payload = jwt_payload(token);
    assert_eq!(payload["jti"], jti);
    assert_eq!(payload["sub"], "alice");
    assert_eq!(payload["email"], "alice@acme.example");
    let exp = payload["exp"].as_i64().unwrap();
    assert!((exp - (now() + 3600)).abs() <= 10, "exp {exp}");
    assert!(
        exp_at.ends_with('Z') || exp_at.ends_with("+00:00"),
        "UTC: {exp_at}"
    );
    assert!(
        (rfc3339_to_unix(exp_at) - exp).abs() <= 1,
        "expires_at {exp_at} vs exp {exp}"
    );

    let r = gw.client().get(local(&gw, url)).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = session_cookie(&r).unwrap().value;
    assert_eq!(
        gw.get_with_cookie("acme", "/me", &cookie).await.status(),
        200
    );
    let rec = gw.upstream("acme").last("/me").unwrap();
    assert_eq!(rec.header("x-linkgate-subject"), Some("alice"));
    assert_eq!(rec.header("x-linkgate-email"), Some("alice@acme.example"));
}

#[tokio::test]
async fn post_links_options_query_form_one_time_redirect_host_ttl_seconds() {
    let mut acme = TenantCfg::new("acme");
    acme.hosts.push("portal.acme.test".into());
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![acme])).await;

    // Default TTL: 5 days.
    let v: Value = gw
        .admin_post("/v1/links", &json!({"tenant": "acme", "sub": "a"}))
        .await
        .json()
        .await
        .unwrap();
    let exp = jwt_payload(v["token"].as_str().unwrap())["exp"]
        .as_i64()
        .unwrap();
    assert!((exp - (now() + 5 * 86400)).abs() <= 10, "default ttl");

    let r = gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "a", "ttl": 120, "form": "query", "one_time": true,
                    "redirect": "/welcome", "host": "portal.acme.test"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let url = v["url"].as_str().unwrap();
    let token = v["token"].as_str().unwrap();
    assert!(
        url.starts_with("https://portal.acme.test/")
            || url.starts_with(&format!("https://portal.acme.test:{}/", gw.https_port)),
        "{url}"
    );
    assert!(url.contains(&format!("magic_link={token}")), "{url}");
    let p = jwt_payload(token);
    assert_eq!(p["one_time"], true);
    assert_eq!(p["redirect"], "/welcome");
    assert!((p["exp"].as_i64().unwrap() - (now() + 120)).abs() <= 10);

    // One-time: confirm page on GET, redeem on POST, to the redirect.
    let u = local(&gw, url);
    let r = gw.client().get(&u).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(session_cookie(&r).is_none());
    let r = gw
        .client()
        .post(&u)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "portal.acme.test", "/welcome");
}

#[tokio::test]
async fn post_links_errors() {
    let ed = KeyCfg::ed25519("ed1");
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme"),
        TenantCfg::new("pubco").keys(vec![ed]),
    ]))
    .await;
    let r = gw
        .admin_post("/v1/links", &json!({"tenant": "nope", "sub": "a"}))
        .await;
    expect_admin_error(r, 400, "unknown_tenant").await;
    let r = gw
        .admin_post("/v1/links", &json!({"tenant": "pubco", "sub": "a"}))
        .await;
    expect_admin_error(r, 400, "no_signing_key").await;

    let r = gw.admin_post("/v1/links", &json!({"tenant": "acme"})).await;
    let v = expect_admin_error(r, 400, "invalid_body").await;
    assert!(
        v["message"].as_str().unwrap().contains("sub"),
        "message names the field: {v}"
    );
    let r = gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "a", "ttl": "soon"}),
        )
        .await;
    let v = expect_admin_error(r, 400, "invalid_body").await;
    assert!(
        v["message"].as_str().unwrap().contains("ttl"),
        "message names the field: {v}"
    );
    let r = gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "a", "form": "sideways"}),
        )
        .await;
    let v = expect_admin_error(r, 400, "invalid_body").await;
    assert!(
        v["message"].as_str().unwrap().contains("form"),
        "message names the field: {v}"
    );
    // Type errors, also inside values that take several forms, name the field.
    for (body, field) in [
        (json!({"tenant": 5, "sub": "a"}), "tenant"),
        (json!({"tenant": "acme", "sub": "a", "ttl": 1.5}), "ttl"),
        (json!({"tenant": "acme", "sub": "a", "ttl": -3}), "ttl"),
        (json!({"tenant": "acme", "sub": "a", "claims": 5}), "claims"),
        (
            json!({"tenant": "acme", "sub": "a", "one_time": "yes"}),
            "one_time",
        ),
    ] {
        let r = gw.admin_post("/v1/links", &body).await;
        let v = expect_admin_error(r, 400, "invalid_body").await;
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("`{field}`")),
            "{body}: message does not name `{field}`: {v}"
        );
    }
    let r = gw
        .admin(Method::POST, "/v1/links")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_admin_error(r, 400, "invalid_body").await;
}

async fn poll_status(
    gw: &Gateway,
    tenant: &str,
    path: &str,
    cookie: Option<&str>,
    want: u16,
) -> u16 {
    let deadline = std::time::Instant::now() + Duration::from_millis(2000);
    loop {
        let rb = gw.client().get(gw.url(tenant, path));
        let rb = match cookie {
            Some(c) => rb.header("cookie", format!("{COOKIE}={c}")),
            None => rb,
        };
        let last = rb.send().await.unwrap().status().as_u16();
        if last == want || std::time::Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn revocation_by_jti_ends_link_and_sessions() {
    let gw = Gateway::default().await;
    let c = claims("alice");
    let jti = c["jti"].as_str().unwrap().to_string();
    let tok = gw.token("acme", &c);
    let cookie = gw.redeem("acme", &tok).await;
    let other = gw.login("acme", "alice").await; // same subject, another jti
    assert_eq!(
        gw.get_with_cookie("acme", "/x", &cookie).await.status(),
        200
    );

    let r = gw.admin_post("/v1/revocations", &json!({"jti": jti})).await;
    assert_eq!(r.status(), 201);

    let st = poll_status(&gw, "acme", "/x", Some(&cookie), 401).await;
    assert_eq!(st, 401, "session of a revoked link still works");
    expect_error(
        gw.get_with_cookie("acme", "/x", &cookie).await,
        401,
        "session_invalid",
    )
    .await;
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{tok}")))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "link_revoked").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/x", &other).await.status(),
        200,
        "other jti unaffected"
    );

    // Check 8 runs before check 10: a used, then revoked one-time link is `link_revoked`.
    let mut c = claims("bob");
    c["one_time"] = json!(true);
    let jti = c["jti"].as_str().unwrap().to_string();
    let once = gw.token("acme", &c);
    let post = || {
        gw.client()
            .post(gw.url("acme", &format!("/login/{once}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 303);
    expect_error(post().await.unwrap(), 410, "link_used").await;
    let r = gw.admin_post("/v1/revocations", &json!({"jti": jti})).await;
    assert_eq!(r.status(), 201);
    let mut last = 0;
    for _ in 0..20 {
        last = post().await.unwrap().status().as_u16();
        if last == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, 401);
    expect_error(post().await.unwrap(), 401, "link_revoked").await;
}

#[tokio::test]
async fn revocation_by_subject() {
    let gw = Gateway::default().await;
    let alice_tok = gw.token("acme", &claims("alice"));
    let alice = gw.redeem("acme", &alice_tok).await;
    let bob = gw.login("acme", "bob").await;
    let galice = gw.login("globex", "alice").await;

    let r = gw
        .admin_post(
            "/v1/revocations",
            &json!({"tenant": "acme", "sub": "alice"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(poll_status(&gw, "acme", "/x", Some(&alice), 401).await, 401);
    expect_error(
        gw.get_with_cookie("acme", "/x", &alice).await,
        401,
        "session_invalid",
    )
    .await;
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{alice_tok}")))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "link_revoked").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/x", &bob).await.status(),
        200,
        "bob unaffected"
    );
    assert_eq!(
        gw.get_with_cookie("globex", "/x", &galice).await.status(),
        200,
        "other tenant unaffected"
    );

    // A link issued after the revocation's `before` works again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut c = claims("alice");
    c["iat"] = json!(now());
    let fresh = gw.token("acme", &c);
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{fresh}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "link issued after `before` must work");
    // A link without iat counts as issued at time 0: revoked.
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("iat");
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{}", gw.token("acme", &c))))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "link_revoked").await;
}

#[tokio::test]
async fn revocation_tenant_wide_with_before() {
    let gw = Gateway::default().await;
    let t = now();
    let mut old = claims("carol");
    old["iat"] = json!(t - 200);
    let old_tok = gw.token("acme", &old);
    let old_cookie = gw.redeem("acme", &old_tok).await;
    let new_cookie = gw.login("acme", "dave").await; // iat = now - 5
    let globex = gw.login("globex", "erin").await;

    let r = gw
        .admin_post(
            "/v1/revocations",
            &json!({"tenant": "acme", "before": t - 100}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        poll_status(&gw, "acme", "/x", Some(&old_cookie), 401).await,
        401
    );
    expect_error(
        gw.get_with_cookie("acme", "/x", &old_cookie).await,
        401,
        "session_invalid",
    )
    .await;
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{old_tok}")))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "link_revoked").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/x", &new_cookie).await.status(),
        200,
        "issued after before"
    );
    assert_eq!(
        gw.get_with_cookie("globex", "/x", &globex).await.status(),
        200
    );

    // Tenant-wide with default before (now), RFC 3339 form on globex.
    let before = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let r = gw
        .admin_post(
            "/v1/revocations",
            &json!({"tenant": "globex", "before": before}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        poll_status(&gw, "globex", "/x", Some(&globex), 401).await,
        401
    );
    let r = gw
        .admin_post("/v1/revocations", &json!({"tenant": "acme"}))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        poll_status(&gw, "acme", "/x", Some(&new_cookie), 401).await,
        401
    );
}

#[tokio::test]
async fn revocation_bad_bodies() {
    let gw = Gateway::default().await;
    let r = gw
        .admin_post("/v1/revocations", &json!({"tenant": "nope"}))
        .await;
    expect_admin_error(r, 400, "unknown_tenant").await;
    let r = gw
        .admin_post("/v1/revocations", &json!({"tenant": "nope", "sub": "a"}))
        .await;
    expect_admin_error(r, 400, "unknown_tenant").await;
    for body in [
        json!({}),
        json!({"sub": "alice"}),
        json!({"jti": 5}),
        json!({"tenant": "acme", "before": "yesterday-ish"}),
    ] {
        let r = gw.admin_post("/v1/revocations", &body).await;
        expect_admin_error(r, 400, "invalid_body").await;
    }
    for (body, field) in [
        (json!({"tenant": ["acme"]}), "tenant"),
        (json!({"tenant": "acme", "before": 1.5}), "before"),
        (json!({"tenant": "acme", "before": true}), "before"),
    ] {
        let r = gw.admin_post("/v1/revocations", &body).await;
        let v = expect_admin_error(r, 400, "invalid_body").await;
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("`{field}`")),
            "{body}: message does not name `{field}`: {v}"
        );
    }
    let r = gw
        .admin(Method::POST, "/v1/revocations")
        .header("content-type", "application/json")
        .body("[")
        .send()
        .await
        .unwrap();
    expect_admin_error(r, 400, "invalid_body").await;
}

#[tokio::test]
async fn healthz_and_readyz() {
    let gw = Gateway::default().await;
    for p in ["/healthz", "/readyz"] {
        let r = plain_client().get(gw.admin_url(p)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
}

#[tokio::test]
async fn revocation_before_accepts_any_rfc3339_offset() {
    // 2026-12-03T08:00:00Z = 1796284800, written several ways.
    let gw = Gateway::default().await;
    for (before, want) in [
        ("2026-12-03T08:00:00Z", 1_796_284_800),
        ("2026-12-03T10:00:00+02:00", 1_796_284_800),
        ("2026-12-03T03:30:00-04:30", 1_796_284_800),
        ("2026-12-03T10:00:00.750+02:00", 1_796_284_800),
        ("2026-12-03t08:00:00.1z", 1_796_284_800),
    ] {
        let r = gw
            .admin_post(
                "/v1/revocations",
                &json!({"tenant": "acme", "sub": "zed", "before": before}),
            )
            .await;
        let st = r.status();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(st, 201, "{before}: {v}");
        assert_eq!(v["before"], want, "{before}: {v}");
    }
    for before in [
        "2026-12-03 08:00:00",
        "2026-12-03T08:00:00",
        "2026-13-03T08:00:00Z",
    ] {
        let r = gw
            .admin_post(
                "/v1/revocations",
                &json!({"tenant": "acme", "before": before}),
            )
            .await;
        expect_admin_error(r, 400, "invalid_body").await;
    }
}
