//! TLS, SNI/Host routing, HTTP versions, the plain-HTTP listener and keep-alive on errors.

use crate::harness::*;

#[tokio::test]
async fn http2_and_http1_both_work() {
    let gw = Gateway::default().await;
    let cookie = gw.login("acme", "alice").await;

    let r = gw
        .client()
        .get(gw.url("acme", "/h2"))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2 expected");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /h2");

    let r = gw
        .client_h1()
        .get(gw.url("acme", "/h1"))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /h1");

    // A link redeemed over HTTP/2.
    let tok = gw.token("globex", &claims("bob"));
    let r = gw
        .client()
        .get(gw.url("globex", &format!("/login/{tok}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 303);
    // An error over HTTP/2.
    let r = gw
        .client()
        .get(gw.url("globex", "/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    expect_error(r, 401, "session_required").await;
}

#[tokio::test]
async fn handshake_refused_for_unknown_or_missing_sni() {
    let gw = Gateway::default().await;
    let ok = tls_handshake(gw.https_port, Some("links.acme.test")).await;
    assert!(ok.is_ok(), "known SNI must handshake: {ok:?}");
    assert_eq!(ok.unwrap().as_deref(), Some(&b"h2"[..]), "ALPN h2 offered");

    let r = tls_handshake(gw.https_port, Some("unknown.test")).await;
    assert!(r.is_err(), "unknown SNI accepted");
    let r = tls_handshake(gw.https_port, None).await;
    assert!(r.is_err(), "missing SNI accepted");

    // Through an ordinary HTTPS client too.
    let r = gw
        .client()
        .get(format!("https://unknown.test:{}/", gw.https_port))
        .send()
        .await;
    assert!(r.is_err(), "unknown host served over TLS");
    // The server still works after refusing.
    let r = gw
        .client()
        .get(gw.url("acme", "/static/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn sni_host_mismatch_is_421() {
    let gw = Gateway::default().await;
    let cookie = gw.login("globex", "bob").await;
    // TLS to links.acme.test (SNI), Host header names globex.
    let r = gw
        .client_h1()
        .get(gw.url("acme", "/x"))
        .header("host", format!("links.globex.test:{}", gw.https_port))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    expect_error(r, 421, "host_mismatch").await;
    // Even for a host that is not served at all.
    let r = gw
        .client_h1()
        .get(gw.url("acme", "/static/x"))
        .header("host", "nothere.test")
        .send()
        .await
        .unwrap();
    expect_error(r, 421, "host_mismatch").await;
    assert!(gw.upstream("globex").requests().is_empty());
    assert!(gw.upstream("acme").requests().is_empty());

    // Routing ignores the port in Host.
    let r = gw
        .client_h1()
        .get(gw.url("acme", "/static/y"))
        .header("host", "links.acme.test:8443")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn second_request_on_same_connection_after_401() {
    let gw = Gateway::default().await;
    let before = metric(
        &gw.metrics().await,
        "linkgate_tls_handshakes_total",
        &[("result", "ok")],
    )
    .unwrap_or(0.0);
    let c = gw
        .client_builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let r = c.get(gw.url("acme", "/private")).send().await.unwrap();
    assert!(header(&r, "connection").is_none_or(|v| !v.eq_ignore_ascii_case("close")));
    expect_error(r, 401, "session_required").await;
    let r = c.get(gw.url("acme", "/private2")).send().await.unwrap();
    expect_error(r, 401, "session_required").await;
    let r = c.get(gw.url("acme", "/static/ok")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let after = metric(
        &gw.metrics().await,
        "linkgate_tls_handshakes_total",
        &[("result", "ok")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        after - before,
        1.0,
        "three requests should share one TLS connection"
    );
}

#[tokio::test]
async fn plain_http_listener_redirects_and_refuses() {
    let gw = Gateway::default().await;
    let c = gw.client();
    let r = c
        .get(gw.http_url("links.acme.test", "/some/path?x=1&y=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        header(&r, "location").unwrap(),
        format!(
            "https://links.acme.test:{}/some/path?x=1&y=2",
            gw.https_port
        )
    );

    let r = c
        .get(gw.http_url("127.0.0.1", "/x"))
        .header("host", "unknown.test")
        .send()
        .await
        .unwrap();
    expect_error(r, 421, "unknown_host").await;

    let r = c
        .get(gw.http_url("links.acme.test", "/.well-known/acme-challenge/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "ACME challenge path must not redirect");
    assert!(header(&r, "location").is_none());
    assert!(gw.upstream("acme").requests().is_empty());
}

#[tokio::test]
async fn jwks_served_on_every_host_and_admin() {
    let gw = Gateway::default().await;
    let mut docs = vec![];
    for t in ["acme", "globex"] {
        let r = gw
            .client()
            .get(gw.url(t, "/.well-known/linkgate/jwks.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "JWKS on {t} without a session");
        docs.push(r.json::<serde_json::Value>().await.unwrap());
    }
    let admin: serde_json::Value = plain_client()
        .get(gw.admin_url("/v1/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(docs[0], docs[1]);
    assert_eq!(docs[0], admin);
    let keys = admin["keys"].as_array().expect("keys array");
    assert!(!keys.is_empty());
    for k in keys {
        assert!(k["kid"].as_str().is_some_and(|s| !s.is_empty()), "kid: {k}");
        assert_eq!(k["use"], "sig", "{k}");
        assert!(k.get("d").is_none(), "private key material published: {k}");
        match k["kty"].as_str() {
            Some("OKP") => {
                assert_eq!(k["crv"], "Ed25519");
                assert_eq!(k["alg"], "EdDSA");
            }
            Some("EC") => {
                assert_eq!(k["crv"], "P-256");
                assert_eq!(k["alg"], "ES256");
            }
            other => panic!("unexpected kty {other:?}"),
        }
    }
    assert!(
        gw.upstream("acme").requests().is_empty(),
        "JWKS must be answered by the gateway"
    );
}
