//! SPEC section 6, webhooks: Standard Webhooks signatures, the durable outbox (receiver
//! outage and SIGKILL lose nothing), private targets refused by default, redirects never
//! followed, delivery only for subscribed events.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::harness::*;

const DELIVERIES: &str = "linkgate_webhook_deliveries_total";

// ---------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------

/// A recording webhook receiver: hyper HTTP/1.1 on 127.0.0.1, answering every request
/// with `status` (and `Location` when given).
struct Receiver {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<Recorded>>>,
    _server: TestHttpServer,
}

impl Receiver {
    fn start(status: u16, location: Option<String>) -> Receiver {
        Self::start_on(0, status, location)
    }

    /// Listens on `port` (0 = any free port).
    fn start_on(port: u16, status: u16, location: Option<String>) -> Receiver {
        let records: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recs = records.clone();
        let server = TestHttpServer::start(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap(),
            move |req| receive(req, recs.clone(), status, location.clone()),
        );
        Receiver {
            addr: server.addr,
            records,
            _server: server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }
}

async fn receive(
    req: hyper::Request<hyper::body::Incoming>,
    recs: Arc<Mutex<Vec<Recorded>>>,
    status: u16,
    location: Option<String>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let rec = Recorded::capture(req).await;
    recs.lock().unwrap().push(rec);
    let mut b = hyper::Response::builder().status(status);
    if let Some(l) = location {
        b = b.header("location", l);
    }
    Ok(
        b.body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
            .unwrap(),
    )
}

// ---------------------------------------------------------------------------------------
// Config and checks
// ---------------------------------------------------------------------------------------

/// One `[[tenants.webhooks]]` entry of tenant `acme`.
struct Hook {
    url: String,
    events: Vec<&'static str>,
    /// The secret the receiver verifies with.
    secret: Vec<u8>,
    /// true: inline `secret`; false: `secret_file` holding the secret plus a trailing newline.
    inline: bool,
}

impl Hook {
    fn new(url: String, events: &[&'static str], secret: &str) -> Hook {
        Hook {
            url,
            events: events.to_vec(),
            secret: secret.as_bytes().to_vec(),
            inline: false,
        }
    }
    fn inline(mut self) -> Hook {
        self.inline = true;
        self
    }
}

/// Tenant `acme` (host `links.acme.test`) with `hooks`; `allow_private` writes
/// `[webhooks] allow_private_targets = true`, else the section is left out (default false).
fn prepare(hooks: &[Hook], allow_private: bool) -> Prepared {
    let mut p = Prepared::new(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")]));
    let mut tables = vec![];
    for (i, h) in hooks.iter().enumerate() {
        let secret = if h.inline {
            format!("secret = {}", q(std::str::from_utf8(&h.secret).unwrap()))
        } else {
            let path = p.path(&format!("hook-{i}.key"));
            fs::write(&path, [h.secret.as_slice(), b"\n"].concat()).unwrap();
            format!("secret_file = {}", q(path.to_str().unwrap()))
        };
        let events: Vec<String> = h.events.iter().map(|e| q(e)).collect();
        tables.push(format!(
            "{{ url = {}, {secret}, events = [{}] }}",
            q(&h.url),
            events.join(", ")
        ));
    }
    p.cfg.tenants[0]
        .extra
        .push(format!("webhooks = [{}]", tables.join(", ")));
    if allow_private {
        p.cfg.tail += "[webhooks]\nallow_private_targets = true\ntimeout = \"5s\"\n";
    }
    p.write_config();
    p
}

fn rfc3339_to_unix(s: &str) -> i64 {
    let z = match s.strip_suffix("+00:00") {
        Some(b) => format!("{b}Z"),
        None => s.to_string(),
    };
    let t = humantime::parse_rfc3339(&z).unwrap_or_else(|e| panic!("bad RFC 3339 UTC {s:?}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Checks one delivery per the Standard Webhooks scheme (method, content type, id,
/// timestamp, `v1` HMAC-SHA256 signature over `id.timestamp.body` with `secret`) and
/// returns the parsed body.
fn verify(r: &Recorded, secret: &[u8]) -> Value {
    let dump = r.dump();
    assert_eq!(r.method, "POST", "webhook method; {dump}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type; {dump}");
    let id = r.header("webhook-id").expect("webhook-id header");
    assert!(id.starts_with("msg_") && id.len() > 4, "webhook-id {id:?}");
    let ts = r.header("webhook-timestamp").expect("webhook-timestamp");
    let ts_n: i64 = ts
        .parse()
        .unwrap_or_else(|_| panic!("webhook-timestamp not Unix seconds: {ts:?}"));
    assert!(
        (ts_n - now()).abs() <= 60,
        "webhook-timestamp {ts_n} far from now {}",
        now()
    );
    let sig = r.header("webhook-signature").expect("webhook-signature");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert!(
        sig.split(' ').any(|s| s == expected),
        "webhook-signature {sig:?}, expected {expected:?} (secret {:?}); {dump}",
        String::from_utf8_lossy(secret)
    );
    let body: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("webhook body is not JSON; {dump}"));
    let t = rfc3339_to_unix(body["timestamp"].as_str().expect("body timestamp"));
    assert!((t - now()).abs() <= 120, "body timestamp {t}; {dump}");
    body
}

async fn metric_value(gw: &Gateway, result: &str) -> f64 {
    metric(&gw.metrics().await, DELIVERIES, &[("result", result)]).unwrap_or(0.0)
}

/// Claims with a `ctx` object.
fn claims_ctx(sub: &str, ctx: Value) -> Value {
    let mut c = claims(sub);
    c["ctx"] = ctx;
    c
}

/// Redeems a `one_time` link: GET shows the confirm page (nothing consumed), POST redeems.
async fn redeem_one_time(gw: &Gateway, token: &str) {
    let path = format!("/login/{token}");
    let r = gw.client().get(gw.url("acme", &path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "one_time GET must show the confirm page");
    let r = gw
        .client()
        .post(gw.url("acme", &path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        303,
        "one_time POST redeems: {}",
        r.text().await.unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn link_redeemed_webhook_is_signed_and_delivered() {
    let rx = Receiver::start(200, None);
    let secret = "whsec-acme-redeemed-0123456789";
    let p = prepare(
        &[Hook::new(rx.url("/hook"), &["link.redeemed"], secret)],
        true,
    );
    let gw = Gateway::start_prepared(p).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, DELIVERIES, &[("result", "ok")]),
        Some(0.0),
        "{DELIVERIES}{{result=\"ok\"}} exported at 0 from start-up"
    );
    assert_eq!(
        metric(&m, DELIVERIES, &[("result", "error")]),
        Some(0.0),
        "{DELIVERIES}{{result=\"error\"}} exported at 0 from start-up"
    );

    let ctx = json!({"order": 42, "plan": "pro", "tags": ["a", "b"], "nested": {"x": null}});
    let c = claims_ctx("alice", ctx.clone());
    gw.redeem("acme", &gw.token("acme", &c)).await;

    let got = eventually(Duration::from_secs(5), || async {
        !rx.requests().is_empty()
    })
    .await;
    assert!(got, "no webhook within 5 s; log:\n{}", gw.log());
    let r = rx.requests()[0].clone();
    assert_eq!(r.path(), "/hook", "webhook path");
    // The trailing newline of secret_file is not part of the key.
    let body = verify(&r, secret.as_bytes());
    assert_eq!(body["type"], "link.redeemed", "{body}");
    let d = &body["data"];
    assert_eq!(d["tenant"], "acme", "{body}");
    assert_eq!(d["subject"], "alice", "{body}");
    assert_eq!(d["jti"], c["jti"], "{body}");
    assert_eq!(d["host"], "links.acme.test", "{body}");
    assert_eq!(d["client_ip"], "127.0.0.1", "{body}");
    assert_eq!(d["ctx"], ctx, "{body}");
    let token = gw.token("acme", &c);
    let sig_segment = token.rsplit('.').next().unwrap();
    assert!(
        !String::from_utf8_lossy(&r.body).contains(sig_segment),
        "the token must not appear in the webhook"
    );

    let ok = eventually(Duration::from_secs(5), || async {
        metric_value(&gw, "ok").await >= 1.0
    })
    .await;
    assert!(
        ok,
        "deliveries_total{{result=\"ok\"}} did not count the delivery"
    );

    // A link without `ctx`: `ctx` is null; a new event gets a new webhook-id.
    let c2 = claims("bob");
    gw.redeem("acme", &gw.token("acme", &c2)).await;
    let got = eventually(Duration::from_secs(5), || async {
        rx.requests().len() >= 2
    })
    .await;
    assert!(got, "second webhook missing; log:\n{}", gw.log());
    let r2 = rx.requests()[1].clone();
    let body2 = verify(&r2, secret.as_bytes());
    assert_eq!(body2["data"]["subject"], "bob", "{body2}");
    assert_eq!(body2["data"]["jti"], c2["jti"], "{body2}");
    assert!(
        body2["data"].get("ctx").is_some_and(Value::is_null),
        "ctx must be present and null: {body2}"
    );
    assert_ne!(
        r.header("webhook-id"),
        r2.header("webhook-id"),
        "two events share a webhook-id"
    );

    // Answered 2xx: delivered once, not again (retries come after 2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let n = rx.requests().len();
    assert_eq!(n, 2, "a delivered webhook was sent again:\n{}", {
        rx.requests()
            .iter()
            .map(Recorded::dump)
            .collect::<Vec<_>>()
            .join("\n----\n")
    });
    assert_eq!(metric_value(&gw, "error").await, 0.0);
}

#[tokio::test]
async fn webhooks_survive_receiver_outage_and_sigkill() {
    // Port chosen, nothing listening yet: attempts get connection refused.
    let port = free_port();
    let secret = "whsec-outage-secret-abcdefghij";
    let url = format!("http://127.0.0.1:{port}/hook");
    let p = prepare(&[Hook::new(url, &["link.redeemed"], secret)], true);
    let mut gw = Gateway::start_prepared(p).await;

    let c1 = claims("alice");
    let c2 = claims_ctx("bob", json!({"k": "v"}));
    let mut c3 = claims("carol");
    c3["one_time"] = json!(true);
    gw.redeem("acme", &gw.token("acme", &c1)).await;
    gw.redeem("acme", &gw.token("acme", &c2)).await;
    redeem_one_time(&gw, &gw.token("acme", &c3)).await;

    let failed = eventually(Duration::from_secs(6), || async {
        metric_value(&gw, "error").await >= 1.0
    })
    .await;
    assert!(
        failed,
        "no failed attempt counted while the receiver is down; log:\n{}",
        gw.log()
    );
    assert_eq!(metric_value(&gw, "ok").await, 0.0);

    // Crash: no graceful shutdown; the outbox must be in the store already.
    gw.kill();
    let rx = Receiver::start_on(port, 200, None);
    gw.restart().await;

    let want: BTreeSet<String> = [&c1, &c2, &c3]
        .iter()
        .map(|c| c["jti"].as_str().unwrap().to_string())
        .collect();
    let all = eventually(Duration::from_secs(30), || async {
        let seen: BTreeSet<String> = rx
            .requests()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter_map(|b| b["data"]["jti"].as_str().map(str::to_string))
            .collect();
        want.is_subset(&seen)
    })
    .await;
    let reqs = rx.requests();
    assert!(
        all,
        "not every event delivered after restart: got {} requests:\n{}\nlog:\n{}",
        reqs.len(),
        reqs.iter()
            .map(Recorded::dump)
            .collect::<Vec<_>>()
            .join("\n----\n"),
        gw.log()
    );

    // Every delivery signed; one stable id (and body) per event, distinct across events.
    let mut by_id: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut id_of_jti: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &reqs {
        let body = verify(r, secret.as_bytes());
        assert_eq!(body["type"], "link.redeemed");
        let id = r.header("webhook-id").unwrap().to_string();
        if let Some(prev) = by_id.insert(id.clone(), r.body.clone()) {
            assert_eq!(prev, r.body, "body changed between attempts of {id}");
        }
        let jti = body["data"]["jti"].as_str().unwrap().to_string();
        id_of_jti.entry(jti).or_default().insert(id);
    }
    assert_eq!(
        id_of_jti.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "events for other links (the one_time confirm page must not emit one)"
    );
    for (jti, ids) in &id_of_jti {
        assert_eq!(
            ids.len(),
            1,
            "event {jti} delivered under several ids {ids:?}"
        );
    }
    assert_eq!(by_id.len(), 3, "three events, three webhook-ids");
    let b2 = reqs
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
        .find(|b| b["data"]["jti"] == c2["jti"])
        .unwrap();
    assert_eq!(b2["data"]["ctx"], json!({"k": "v"}));
    assert_eq!(b2["data"]["subject"], "bob");

    let ok = eventually(Duration::from_secs(5), || async {
        metric_value(&gw, "ok").await >= 3.0
    })
    .await;
    assert!(ok, "deliveries_total{{result=\"ok\"}} < 3 after delivery");
}

#[tokio::test]
async fn private_targets_refused_by_default() {
    let rx = Receiver::start(200, None);
    let secret = "whsec-private-secret-0123456789";
    let p = prepare(
        &[Hook::new(rx.url("/hook"), &["link.redeemed"], secret)],
        false,
    );
    let gw = Gateway::start_prepared(p).await;
    assert_eq!(
        metric(&gw.metrics().await, DELIVERIES, &[("result", "error")]),
        Some(0.0)
    );

    gw.login("acme", "alice").await;
    let refused = eventually(Duration::from_secs(8), || async {
        metric_value(&gw, "error").await >= 1.0
    })
    .await;
    assert!(
        refused,
        "no error counted for a loopback http:// receiver; receiver got {}; log:\n{}",
        rx.requests().len(),
        gw.log()
    );
    // Give a retry (2 s) time to go wrong too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rx.requests().is_empty(),
        "delivered to a loopback receiver with allow_private_targets = false:\n{}",
        rx.requests()[0].dump()
    );
    assert_eq!(metric_value(&gw, "ok").await, 0.0);
    let log = gw.log();
    assert!(
        log.contains("private"),
        "the log does not say why the webhook is not delivered:\n{log}"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let target = Receiver::start(200, None);
    let r307 = Receiver::start(307, Some(target.url("/from307")));
    let r302 = Receiver::start(302, Some(target.url("/from302")));
    let (s1, s2) = (
        "whsec-redirect-307-0123456789",
        "whsec-redirect-302-0123456789",
    );
    let p = prepare(
        &[
            Hook::new(r307.url("/hook"), &["link.redeemed"], s1),
            Hook::new(r302.url("/hook"), &["link.redeemed"], s2),
        ],
        true,
    );
    let gw = Gateway::start_prepared(p).await;
    let c = claims("alice");
    gw.redeem("acme", &gw.token("acme", &c)).await;

    let retried = eventually(Duration::from_secs(12), || async {
        r307.requests().len() >= 2 && r302.requests().len() >= 2
    })
    .await;
    assert!(
        retried,
        "a 3xx answer is not retried: 307 receiver got {}, 302 receiver got {}; log:\n{}",
        r307.requests().len(),
        r302.requests().len(),
        gw.log()
    );
    assert!(
        target.requests().is_empty(),
        "a redirect was followed:\n{}",
        target.requests()[0].dump()
    );
    for (rx, secret) in [(&r307, s1), (&r302, s2)] {
        let reqs = rx.requests();
        let ids: BTreeSet<&str> = reqs.iter().filter_map(|r| r.header("webhook-id")).collect();
        assert_eq!(
            ids.len(),
            1,
            "webhook-id not stable across retries: {ids:?}"
        );
        for r in &reqs {
            let b = verify(r, secret.as_bytes());
            assert_eq!(b["data"]["jti"], c["jti"]);
        }
    }
    assert_eq!(metric_value(&gw, "ok").await, 0.0, "a 3xx counted as ok");
    assert!(metric_value(&gw, "error").await >= 2.0);
    assert!(target.requests().is_empty(), "a redirect was followed");
}

#[tokio::test]
async fn webhook_only_for_subscribed_events() {
    let domains_only = Receiver::start(200, None);
    let redeemed = Receiver::start(200, None);
    let (s1, s2) = ("whsec-domains-only-0123456789", "whsec-inline-0123456789ab");
    let p = prepare(
        &[
            Hook::new(domains_only.url("/hook"), &["domain.active"], s1),
            // Control (and the inline `secret` form): gets the link.redeemed event.
            Hook::new(redeemed.url("/hook"), &["link.redeemed"], s2).inline(),
        ],
        true,
    );
    let gw = Gateway::start_prepared(p).await;
    let c = claims("alice");
    gw.redeem("acme", &gw.token("acme", &c)).await;

    let got = eventually(Duration::from_secs(5), || async {
        !redeemed.requests().is_empty()
    })
    .await;
    assert!(got, "control webhook not delivered; log:\n{}", gw.log());
    let b = verify(&redeemed.requests()[0], s2.as_bytes());
    assert_eq!(b["type"], "link.redeemed");
    assert_eq!(b["data"]["jti"], c["jti"]);

    // Both deliveries would come from the same event; leave time for a stray one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        domains_only.requests().is_empty(),
        "a webhook subscribed to domain.active got:\n{}",
        domains_only.requests()[0].dump()
    );
    assert_eq!(metric_value(&gw, "error").await, 0.0);
}

#[tokio::test]
async fn proxy_environment_variables_are_ignored() {
    // A proxy from the environment would connect wherever it likes, past the address check.
    let proxy = Receiver::start(200, None);
    let target = Receiver::start(200, None);
    let secret = "whsec-no-proxy-0123456789ab";
    let mut p = prepare(
        &[Hook::new(target.url("/hook"), &["link.redeemed"], secret)],
        true,
    );
    let proxy_url = format!("http://{}", proxy.addr);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        p.env.push((var.to_string(), proxy_url.clone()));
    }
    let gw = Gateway::start_prepared(p).await;
    let c = claims("alice");
    gw.redeem("acme", &gw.token("acme", &c)).await;
    let got = eventually(Duration::from_secs(8), || async {
        !target.requests().is_empty() || !proxy.requests().is_empty()
    })
    .await;
    assert!(got, "nothing delivered; log:\n{}", gw.log());
    assert!(
        proxy.requests().is_empty(),
        "the webhook went through the proxy:\n{}",
        proxy.requests()[0].dump()
    );
    let b = verify(&target.requests()[0], secret.as_bytes());
    assert_eq!(b["data"]["jti"], c["jti"]);
}
