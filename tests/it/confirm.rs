//! SPEC section 3, "Link scanners": confirm pages for one_time links and `confirm` modes.

use crate::harness::*;
use serde_json::{json, Value};

fn one_time_claims(sub: &str) -> Value {
    let mut c = claims(sub);
    c["one_time"] = json!(true);
    c["email"] = json!("alice.secret@example.com");
    c["name"] = json!("Alice Confidential");
    c
}

async fn post_empty(gw: &Gateway, tenant: &str, path: &str) -> reqwest::Response {
    gw.client()
        .post(gw.url(tenant, path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap()
}

/// HEAD on a link URL: 200, no session.
async fn assert_head_only_looks(gw: &Gateway, path: &str) {
    let r = gw.client().head(gw.url("acme", path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(session_cookie(&r).is_none());
}

async fn assert_confirm_page(r: reqwest::Response, token: &str, secrets: &[&str]) {
    assert_eq!(r.status(), 200, "confirm page status");
    assert!(
        session_cookie(&r).is_none(),
        "confirm page must not set the session"
    );
    let h = |n: &str| header(&r, n).unwrap_or_default();
    assert!(
        h("content-type").starts_with("text/html"),
        "content-type {}",
        h("content-type")
    );
    assert!(
        h("cache-control").contains("no-store"),
        "Cache-Control {}",
        h("cache-control")
    );
    assert_eq!(h("referrer-policy"), "no-referrer");
    assert!(
        h("x-robots-tag").contains("noindex"),
        "X-Robots-Tag {}",
        h("x-robots-tag")
    );
    let csp = h("content-security-policy");
    for part in [
        "default-src 'none'",
        "style-src 'unsafe-inline'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "CSP {csp:?} lacks {part}");
    }
    let body = r.text().await.unwrap();
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("<form"), "no form: {body}");
    assert!(
        lower.contains("method=\"post\"")
            || lower.contains("method='post'")
            || lower.contains("method=post"),
        "form is not POST: {body}"
    );
    assert!(!body.contains(token), "confirm page shows the token");
    for s in secrets {
        assert!(!body.contains(s), "confirm page shows claim {s:?}");
    }
}

#[tokio::test]
async fn one_time_get_shows_confirm_page_and_post_redeems_once() {
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &one_time_claims("alice-subject"));
    let path = format!("/login/{tok}");
    let secrets = [
        "alice-subject",
        "alice.secret@example.com",
        "Alice Confidential",
    ];

    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_confirm_page(r, &tok, &secrets).await;
    // GET again: still not consumed.
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_confirm_page(r, &tok, &secrets).await;
    // HEAD: not consumed either.
    assert_head_only_looks(&gw, &path).await;

    // POST redeems.
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/");
    let cookie = session_cookie(&r).expect("session cookie").value;
    assert!(header(&r, "cache-control")
        .unwrap_or_default()
        .contains("no-store"));
    assert_eq!(
        gw.get_with_cookie("acme", "/in", &cookie).await.status(),
        200
    );

    // Reuse: 410 link_used, for GET and for POST.
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    expect_error(r, 410, "link_used").await;
    let r = post_empty(&gw, "acme", &path).await;
    expect_error(r, 410, "link_used").await;
    assert!(!gw.upstream("acme").dump().contains(&tok));
}

#[tokio::test]
async fn one_time_query_form_confirm_then_post_to_clean_url() {
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &one_time_claims("alice"));
    let path = format!("/reports?id=7&magic_link={tok}");
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_confirm_page(r, &tok, &["alice.secret@example.com"]).await;
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
    assert_location(&r, &gw, "links.acme.test", "/reports?id=7");
    assert!(session_cookie(&r).is_some());
    let r = post_empty(&gw, "acme", &path).await;
    expect_error(r, 410, "link_used").await;
}

#[tokio::test]
async fn invalid_one_time_link_gets_error_not_confirm_page() {
    // GET runs checks 1-10 before showing the page.
    let gw = Gateway::default().await;
    let mut c = one_time_claims("alice");
    c["exp"] = json!(now() - 1000);
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{}", gw.token("acme", &c))))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "link_expired").await;
}

#[tokio::test]
async fn plain_links_redeem_on_get_and_post_repeatedly() {
    let gw = Gateway::default().await;
    let tok = gw.token("acme", &claims("alice"));
    let path = format!("/login/{tok}");
    for _ in 0..2 {
        let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
        assert_eq!(r.status(), 303);
        assert!(session_cookie(&r).is_some());
    }
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
    assert!(session_cookie(&r).is_some());
}

#[tokio::test]
async fn confirm_always_shows_page_for_every_link() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").extra(r#"confirm = "always""#)
    ]))
    .await;
    let tok = gw.token("acme", &claims("alice"));
    let path = format!("/login/{tok}");
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_confirm_page(r, &tok, &[]).await;
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
    assert!(session_cookie(&r).is_some());
    // Not one_time: it can be redeemed again.
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn confirm_never_redeems_one_time_on_get() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme").extra(r#"confirm = "never""#)
    ]))
    .await;
    let tok = gw.token("acme", &one_time_claims("alice"));
    let path = format!("/login/{tok}");
    // HEAD (a link scanner) looks without consuming, even here.
    for _ in 0..2 {
        assert_head_only_looks(&gw, &path).await;
    }
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert!(session_cookie(&r).is_some());
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    expect_error(r, 410, "link_used").await;
}

#[tokio::test]
async fn branding_applies_to_confirm_and_error_pages_escaped() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")
        .extra(
            r##"[tenants.branding]
title = "Acme <b>Portal</b> & Co"
color = "#5b21b6""##,
        )]))
    .await;
    let tok = gw.token("acme", &one_time_claims("alice"));
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{tok}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Portal"),
        "branding title missing on confirm page: {body}"
    );
    assert!(
        !body.contains("<b>Portal</b>"),
        "branding title not HTML-escaped: {body}"
    );

    let r = gw
        .client()
        .get(gw.url("acme", "/private"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Portal"),
        "branding title missing on error page: {body}"
    );
    assert!(
        !body.contains("<b>Portal</b>"),
        "branding title not HTML-escaped: {body}"
    );
}

#[tokio::test]
async fn one_time_jti_is_per_tenant() {
    // Tenants choose their own `jti`s: acme using up its "order-1" leaves globex's alone.
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![
        TenantCfg::new("acme"),
        TenantCfg::new("globex"),
    ]))
    .await;
    let mut c = one_time_claims("alice");
    c["jti"] = json!("order-1");
    let acme = format!("/login/{}", gw.token("acme", &c));
    let globex = format!("/login/{}", gw.token("globex", &c));
    assert_eq!(post_empty(&gw, "acme", &acme).await.status(), 303);
    expect_error(post_empty(&gw, "acme", &acme).await, 410, "link_used").await;
    let r = gw
        .client()
        .get(gw.url("globex", &globex))
        .send()
        .await
        .unwrap();
    assert_confirm_page(r, &globex, &[]).await;
    assert_eq!(post_empty(&gw, "globex", &globex).await.status(), 303);
    expect_error(post_empty(&gw, "globex", &globex).await, 410, "link_used").await;
}

#[tokio::test]
async fn a_used_link_makes_no_session_and_stores_nothing() {
    // Claims too big for the cookie are kept in the store: presenting a used link again
    // must not add a row per attempt.
    let gw = Gateway::default().await;
    let mut c = one_time_claims("alice");
    c["ctx"] = json!({"blob": "y".repeat(5000)});
    let path = format!("/login/{}", gw.token("acme", &c));
    let r = post_empty(&gw, "acme", &path).await;
    assert_eq!(r.status(), 303);
    let db = gw.p.path("state").join("linkgate.db");
    let rows = || {
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM session_claims", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
    };
    assert_eq!(rows(), 1, "the redemption stores its claims");
    for _ in 0..3 {
        let r = post_empty(&gw, "acme", &path).await;
        assert!(session_cookie(&r).is_none());
        expect_error(r, 410, "link_used").await;
    }
    assert_eq!(rows(), 1, "a used link stored claims");
}
