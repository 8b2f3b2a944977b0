//! SPEC section 7: Prometheus metrics on the admin listener.

use std::time::Duration;

use crate::harness::*;
use serde_json::json;

const OUTCOMES: [&str; 7] = [
    "forwarded",
    "public",
    "redeemed",
    "confirm_page",
    "rejected",
    "acme_challenge",
    "redirect_https",
];

const LINK_RESULTS: [&str; 10] = [
    "ok",
    "link_malformed",
    "link_bad_signature",
    "link_expired",
    "link_not_yet_valid",
    "link_wrong_tenant",
    "link_bad_redirect",
    "link_revoked",
    "link_binding_mismatch",
    "link_used",
];

const TLS_RESULTS: [&str; 3] = ["ok", "unknown_sni", "error"];

const DOMAIN_STATES: [&str; 6] = [
    "pending_ownership",
    "pending_routing",
    "issuing",
    "active",
    "failed",
    "moved",
];

#[tokio::test]
async fn core_metrics_exported_at_zero_from_start() {
    let gw = Gateway::default().await;
    let r = plain_client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = header(&r, "content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content-type {ct}");
    let m = r.text().await.unwrap();
    let mut missing = vec![];
    for o in OUTCOMES {
        if metric(&m, "linkgate_requests_total", &[("outcome", o)]) != Some(0.0) {
            missing.push(format!("linkgate_requests_total{{outcome={o}}}"));
        }
    }
    for res in LINK_RESULTS {
        if metric(&m, "linkgate_link_validations_total", &[("result", res)]) != Some(0.0) {
            missing.push(format!("linkgate_link_validations_total{{result={res}}}"));
        }
    }
    for res in TLS_RESULTS {
        if metric(&m, "linkgate_tls_handshakes_total", &[("result", res)]).is_none() {
            missing.push(format!("linkgate_tls_handshakes_total{{result={res}}}"));
        }
    }
    for name in [
        "linkgate_sessions_created_total",
        "linkgate_upstream_errors_total",
    ] {
        if metric(&m, name, &[]) != Some(0.0) {
            missing.push(name.to_string());
        }
    }
    if !m.contains("linkgate_request_duration_seconds") {
        missing.push("linkgate_request_duration_seconds".into());
    }
    assert!(
        missing.is_empty(),
        "missing or non-zero at start: {missing:?}\n{m}"
    );
}

#[tokio::test]
async fn domain_certificate_and_acme_metric_families_exported() {
    let gw = Gateway::default().await;
    let m = gw.metrics().await;
    let mut missing = vec![];
    for s in DOMAIN_STATES {
        if metric(&m, "linkgate_domains", &[("state", s)]).is_none() {
            missing.push(format!("linkgate_domains{{state={s}}}"));
        }
    }
    for name in [
        "linkgate_acme_orders_total",
        "linkgate_dns_checks_total",
        "linkgate_webhook_deliveries_total",
    ] {
        if !m.contains(name) {
            missing.push(name.to_string());
        }
    }
    assert!(missing.is_empty(), "missing: {missing:?}\n{m}");
    for h in ["links.acme.test", "links.globex.test"] {
        let v = metric(
            &m,
            "linkgate_certificate_expiry_timestamp_seconds",
            &[("hostname", h)],
        );
        assert_eq!(v, Some(CERT_NOT_AFTER as f64), "expiry of {h}:\n{m}");
    }
}

#[tokio::test]
async fn counters_move_with_traffic() {
    let gw = Gateway::default().await;
    let m0 = gw.metrics().await;
    let get0 = |n: &str, l: &[(&str, &str)]| metric(&m0, n, l).unwrap_or(0.0);

    // redeemed + sessions_created + link ok
    let cookie = gw.login("acme", "alice").await;
    // forwarded x2
    for p in ["/f1", "/f2"] {
        assert_eq!(gw.get_with_cookie("acme", p, &cookie).await.status(), 200);
    }
    // public
    assert_eq!(
        gw.client()
            .get(gw.url("acme", "/static/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // rejected: session_required, expired link
    assert_eq!(
        gw.client()
            .get(gw.url("acme", "/p"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let mut c = claims("alice");
    c["exp"] = json!(now() - 1000);
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{}", gw.token("acme", &c))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // bad signature
    let bad = sign_hs(
        b"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        jsonwebtoken::Algorithm::HS256,
        Some("k1"),
        &claims("a"),
    );
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{bad}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // confirm page
    let mut c = claims("alice");
    c["one_time"] = json!(true);
    let r = gw
        .client()
        .get(gw.url("acme", &format!("/login/{}", gw.token("acme", &c))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // redirect_https and acme_challenge on the plain listener
    let r = gw
        .client()
        .get(gw.http_url("links.acme.test", "/r"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    let r = gw
        .client()
        .get(gw.http_url("links.acme.test", "/.well-known/acme-challenge/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // unknown SNI
    assert!(tls_handshake(gw.https_port, Some("unknown.test"))
        .await
        .is_err());

    tokio::time::sleep(Duration::from_millis(200)).await;
    let m1 = gw.metrics().await;
    let delta = |n: &str, l: &[(&str, &str)]| metric(&m1, n, l).unwrap_or(0.0) - get0(n, l);
    type Check<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
    let checks: Vec<Check> = vec![
        (
            "linkgate_requests_total",
            vec![("outcome", "redeemed")],
            1.0,
        ),
        (
            "linkgate_requests_total",
            vec![("outcome", "forwarded")],
            2.0,
        ),
        ("linkgate_requests_total", vec![("outcome", "public")], 1.0),
        (
            "linkgate_requests_total",
            vec![("outcome", "confirm_page")],
            1.0,
        ),
        (
            "linkgate_requests_total",
            vec![("outcome", "redirect_https")],
            1.0,
        ),
        (
            "linkgate_link_validations_total",
            vec![("result", "link_expired")],
            1.0,
        ),
        (
            "linkgate_link_validations_total",
            vec![("result", "link_bad_signature")],
            1.0,
        ),
        ("linkgate_sessions_created_total", vec![], 1.0),
        (
            "linkgate_tls_handshakes_total",
            vec![("result", "unknown_sni")],
            1.0,
        ),
    ];
    let mut wrong = vec![];
    for (n, l, want) in &checks {
        let d = delta(n, l);
        if d != *want {
            wrong.push(format!("{n}{l:?}: +{d}, want +{want}"));
        }
    }
    // The 404 for an unknown challenge token counts as acme_challenge (or, arguably, rejected).
    let rej = delta("linkgate_requests_total", &[("outcome", "rejected")]);
    let chal = delta("linkgate_requests_total", &[("outcome", "acme_challenge")]);
    if rej < 3.0 || rej + chal != 4.0 {
        wrong.push(format!(
            "rejected +{rej} (want 3), acme_challenge +{chal} (want 1)"
        ));
    }
    // ok validations: the redeemed link and the confirm page's link.
    let ok = delta("linkgate_link_validations_total", &[("result", "ok")]);
    if ok < 1.0 {
        wrong.push(format!("link ok +{ok}"));
    }
    if delta("linkgate_tls_handshakes_total", &[("result", "ok")]) < 1.0 {
        wrong.push("tls ok did not move".into());
    }
    let count = metric(&m1, "linkgate_request_duration_seconds_count", &[]).unwrap_or(0.0)
        - metric(&m0, "linkgate_request_duration_seconds_count", &[]).unwrap_or(0.0);
    if count < 8.0 {
        wrong.push(format!("request_duration_seconds_count +{count}"));
    }
    if metric(
        &m1,
        "linkgate_request_duration_seconds_bucket",
        &[("le", "+Inf")],
    )
    .is_none()
    {
        wrong.push("no histogram buckets".into());
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{m1}");
}

#[tokio::test]
async fn upstream_errors_counted() {
    let gw = Gateway::start(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")
        .extra(r#"public_paths = ["/pub"]"#)
        .dead_upstream()]))
    .await;
    let before = metric(&gw.metrics().await, "linkgate_upstream_errors_total", &[]).unwrap_or(0.0);
    let r = gw
        .client()
        .get(gw.url("acme", "/pub"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let after = metric(&gw.metrics().await, "linkgate_upstream_errors_total", &[]).unwrap_or(0.0);
    assert!(after - before >= 1.0, "upstream errors did not move");
}

#[tokio::test]
async fn config_domains_with_static_certificates_count_as_active() {
    // SPEC 2: a [[domains]] entry covered by [[certificates]] is served at once and `active`.
    let gw = Gateway::default().await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "linkgate_domains", &[("state", "active")]),
        Some(2.0),
        "{m}"
    );
}
