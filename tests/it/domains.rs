//! SPEC section 5: custom-domain onboarding through the admin API, with a real ACME CA
//! (pebble) and a DNS server changed at runtime (pebble-challtestsrv). Every test starts its
//! own pebble, DNS server and gateway on free ports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::infra::*;

const ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn is_rfc3339(v: &Value) -> bool {
    // 2024-01-02T03:04:05Z / with fraction / with offset
    v.as_str().is_some_and(|s| {
        let b = s.as_bytes();
        s.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && (b[10] == b'T' || b[10] == b't')
            && b[13] == b':'
            && b[16] == b':'
            && (s.ends_with('Z') || s.ends_with('z') || s[19..].contains(['+', '-']))
    })
}

/// Parses an RFC 3339 UTC-or-offset timestamp to Unix seconds (seconds precision).
fn rfc3339_secs(s: &str) -> i64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, se) = (n(0, 4), n(5, 7), n(8, 10), n(11, 13), n(14, 16), n(17, 19));
    // days from civil (Howard Hinnant)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = days * 86_400 + h * 3600 + mi * 60 + se;
    let rest = &s[19..];
    let rest = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(off) = rest.strip_prefix(['+', '-']) {
        let sign = if rest.starts_with('-') { -1 } else { 1 };
        let oh: i64 = off[0..2].parse().unwrap();
        let om: i64 = off[3..5].parse().unwrap();
        t -= sign * (oh * 3600 + om * 60);
    }
    t
}

fn record(d: &Value, i: usize) -> &Value {
    &d["records"][i]
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn infra_pebble_and_dns_answer() {
    let dns = Dns::start().await;
    dns.set_a(EDGE_TARGET, &["127.0.0.1"]).await;
    dns.set_cname("links.infra.test", EDGE_TARGET).await;
    let ans = dns.query("links.infra.test", RR_A).await;
    assert!(
        ans.contains(&DnsAnswer::Cname(EDGE_TARGET.into())),
        "CNAME not in answer: {ans:?}"
    );
    assert!(
        ans.contains(&DnsAnswer::A("127.0.0.1".parse().unwrap())),
        "A of the CNAME target not chased: {ans:?}"
    );
    assert!(dns.query("nothing.infra.test", RR_A).await.is_empty());
    dns.clear_cname("links.infra.test").await;
    assert!(dns.query("links.infra.test", RR_CNAME).await.is_empty());

    let mut pebble = Pebble::new(dns.port);
    pebble.start(free_port()).await;
    let dir: Value = pebble
        .api_client()
        .get(pebble.directory_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(dir["newOrder"].is_string(), "directory: {dir}");
    assert!(dir["newAccount"].is_string(), "directory: {dir}");
    let root1 = pebble.root_der();
    pebble.stop();
    pebble.start_again().await;
    assert_ne!(
        root1,
        pebble.root_der(),
        "pebble regenerates its root per start"
    );
}

#[tokio::test]
async fn onboarding_reaches_active_and_serves_magic_links() {
    let env = DomainEnv::start().await;
    let host = "links.onboarding.test";
    let d = env.add_domain(host, "acme").await;
    assert_eq!(d["hostname"], host);
    assert_eq!(d["tenant"], "acme");
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert!(d["certificate"].is_null(), "{d}");
    let recs = d["records"].as_array().expect("records list");
    assert_eq!(recs.len(), 2, "{d}");
    let own = &recs[0];
    assert_eq!(own["type"], "CNAME");
    assert_eq!(own["name"], format!("_linkgate.{host}"));
    let own_value = own["value"].as_str().unwrap().to_string();
    let token = own_value
        .strip_suffix(&format!(".{VERIFY_ZONE}"))
        .unwrap_or_else(|| panic!("ownership value {own_value} not in {VERIFY_ZONE}"));
    assert!(
        !token.is_empty() && !token.contains('.'),
        "token label {token:?}"
    );
    assert!(matches!(own["status"].as_str(), Some("missing")), "{d}");
    assert!(own["seen"].is_null(), "{d}");
    let routing = &recs[1];
    assert_eq!(routing["type"], "CNAME");
    assert_eq!(routing["name"], host);
    assert_eq!(routing["value"], EDGE_TARGET);

    // GET and the list agree.
    let got = env.get_domain(host).await;
    assert_eq!(got["records"][0]["value"], own_value.as_str());
    let list = env.list_domains().await;
    assert!(
        list["domains"]
            .as_array()
            .expect("domains list")
            .iter()
            .any(|x| x["hostname"] == host),
        "{list}"
    );

    // The static domain (`links.acme.test`, covered by a static certificate) counts as active.
    let active_before = metric(
        &env.gw.metrics().await,
        "linkgate_domains",
        &[("state", "active")],
    )
    .unwrap_or(0.0);

    // Before any record: a check leaves it pending with both records missing.
    let d = env.check(host).await;
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert_eq!(record(&d, 0)["status"], "missing", "{d}");
    assert!(is_rfc3339(&d["last_checked_at"]), "{d}");

    // Step 1: ownership. An immediate check moves it on.
    env.set_ownership(&d).await;
    let d = env.check(host).await;
    assert_eq!(d["state"], "pending_routing", "{d}");
    assert_eq!(record(&d, 0)["status"], "ok", "{d}");
    assert_eq!(record(&d, 0)["seen"], own_value.as_str(), "{d}");
    assert_eq!(record(&d, 1)["status"], "missing", "{d}");

    // Step 2: routing -> issuing -> active.
    env.set_routing(host).await;
    let d = env.wait_state(host, "active", ACTIVE_TIMEOUT).await;
    assert_eq!(record(&d, 1)["status"], "ok", "{d}");
    assert_eq!(record(&d, 1)["seen"], EDGE_TARGET, "{d}");
    assert!(d["last_error"].is_null(), "{d}");
    let c = &d["certificate"];
    assert!(
        is_rfc3339(&c["not_before"]) && is_rfc3339(&c["not_after"]),
        "{d}"
    );
    assert!(c["issuer"].as_str().is_some_and(|s| !s.is_empty()), "{d}");

    // The certificate is pebble's, for this name, served via SNI and matching the object.
    let chain = env
        .served(host)
        .await
        .unwrap_or_else(|e| panic!("handshake trusting pebble's root: {e}\n{}", env.diag()));
    assert!(
        cert_dns_names(&chain[0]).iter().any(|n| n == host),
        "SANs {:?}",
        cert_dns_names(&chain[0])
    );
    let (nb, na) = cert_validity(&chain[0]);
    assert!(
        (rfc3339_secs(c["not_before"].as_str().unwrap()) - nb).abs() <= 1,
        "not_before {} vs cert {nb}",
        c["not_before"]
    );
    assert!(
        (rfc3339_secs(c["not_after"].as_str().unwrap()) - na).abs() <= 1,
        "not_after {} vs cert {na}",
        c["not_after"]
    );
    // The static host keeps its own certificate.
    assert!(tls_handshake(env.gw.https_port, Some("links.acme.test"))
        .await
        .is_ok());

    // A magic link minted for this host works end to end.
    let r = env
        .gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "carol", "host": format!("{host}:{}", env.gw.https_port)}),
        )
        .await;
    let st = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(st, 201, "{v}");
    let url = v["url"].as_str().unwrap();
    assert!(url.contains(host), "url {url}");
    let tok = v["token"].as_str().unwrap();
    let client = env.client_for(host);
    let r = client
        .get(format!("https://{host}:{}/login/{tok}", env.gw.https_port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "redeem on the custom domain");
    let cookie = session_cookie(&r).expect("session cookie").value;
    let r = client
        .get(format!("https://{host}:{}/app/page", env.gw.https_port))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /app/page");
    let rec = env
        .gw
        .upstream("acme")
        .last("/app/page")
        .expect("forwarded");
    assert_eq!(rec.header("x-linkgate-subject"), Some("carol"));
    assert_eq!(rec.header("x-linkgate-tenant"), Some("acme"));

    // Metrics.
    let m = env.gw.metrics().await;
    assert_eq!(
        metric(&m, "linkgate_domains", &[("state", "active")]),
        Some(active_before + 1.0),
        "linkgate_domains{{state=active}}: one more than before activation\n{m}"
    );
    assert!(
        metric(&m, "linkgate_acme_orders_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0,
        "acme orders ok\n{m}"
    );
    assert!(
        metric(
            &m,
            "linkgate_dns_checks_total",
            &[("record", "ownership"), ("result", "ok")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "dns checks ownership ok\n{m}"
    );
    let exp = metric(
        &m,
        "linkgate_certificate_expiry_timestamp_seconds",
        &[("hostname", host)],
    );
    assert!(exp.is_some(), "expiry gauge for {host}\n{m}");
    assert!(
        (exp.unwrap() as i64 - na).abs() <= 1,
        "expiry gauge {exp:?} vs not_after {na}"
    );
    assert_eq!(env.account_creations(), 1, "{}", env.diag());
}

#[tokio::test]
async fn wrong_ownership_value_is_reported() {
    let env = DomainEnv::start().await;
    let host = "links.wrongvalue.test";
    let d = env.add_domain(host, "acme").await;
    let name = record(&d, 0)["name"].as_str().unwrap().to_string();
    let wrong = format!("not-the-token.{VERIFY_ZONE}");
    env.dns.set_cname(&name, &wrong).await;

    let d = env.check(host).await;
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert_eq!(record(&d, 0)["status"], "wrong_value", "{d}");
    assert_eq!(record(&d, 0)["seen"], wrong.as_str(), "{d}");
    // Periodic checks agree and keep it pending.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert_eq!(record(&d, 0)["status"], "wrong_value", "{d}");
    assert_eq!(record(&d, 0)["seen"], wrong.as_str(), "{d}");

    // Fixing the record moves it on without an explicit check. The target is compared
    // case-insensitively and reported lower-case.
    let value = record(&d, 0)["value"].as_str().unwrap().to_string();
    env.dns
        .set_cname_verbatim(&name, &value.to_ascii_uppercase())
        .await;
    let d = env.wait_state(host, "pending_routing", STEP_TIMEOUT).await;
    assert_eq!(record(&d, 0)["status"], "ok", "{d}");
    assert_eq!(record(&d, 0)["seen"], value.as_str(), "{d}");
}

#[tokio::test]
async fn proxied_hostname_is_reported() {
    let env = DomainEnv::start().await;
    let host = "links.proxied.test";
    let d = env.add_domain(host, "acme").await;
    env.set_ownership(&d).await;
    env.wait_state(host, "pending_routing", STEP_TIMEOUT).await;
    // A/AAAA answers but no CNAME: what a CDN-proxied name looks like.
    env.dns.set_a(host, &["127.0.0.1"]).await;
    let d = env
        .wait_for(host, "last_error mentioning `proxied`", STEP_TIMEOUT, |d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.to_ascii_lowercase().contains("proxied"))
        })
        .await;
    assert_eq!(d["state"], "pending_routing", "{d}");
    assert_ne!(record(&d, 1)["status"], "ok", "{d}");
    // Replacing the A record with the routing CNAME fixes it.
    env.dns.clear_a(host).await;
    env.set_routing(host).await;
    env.wait_state(host, "active", ACTIVE_TIMEOUT).await;
}

#[tokio::test]
async fn acme_outage_fails_then_recovers() {
    let mut env = DomainEnv::start().await;
    let host = "links.outage.test";
    let d = env.add_domain(host, "acme").await;
    env.set_ownership(&d).await;
    env.wait_state(host, "pending_routing", STEP_TIMEOUT).await;

    env.pebble.stop();
    env.set_routing(host).await;
    let d = env.wait_state(host, "failed", STEP_TIMEOUT).await;
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| !e.trim().is_empty()),
        "{d}"
    );
    assert!(d["certificate"].is_null(), "{d}");

    // Back up on the same ports: new root, no accounts. Retries with backoff recover.
    env.pebble.start_again().await;
    let d = env
        .wait_state(host, "active", Duration::from_secs(90))
        .await;
    assert!(
        d["last_error"].is_null(),
        "last_error kept after recovery: {d}"
    );
    let chain = env.served(host).await.unwrap_or_else(|e| {
        panic!(
            "handshake trusting the new pebble root: {e}\n{}",
            env.diag()
        )
    });
    assert!(cert_dns_names(&chain[0]).iter().any(|n| n == host));
}

#[tokio::test]
async fn restart_keeps_active_domain_certificate_and_account() {
    let mut env = DomainEnv::start().await;
    let host = "links.restart.test";
    env.activate(host).await;
    let before = env.served(host).await.expect("served before restart");

    env.gw.restart().await;
    // Right after /readyz: still active, same certificate, no new account.
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "active", "{d}\n{}", env.diag());
    let after = env
        .served(host)
        .await
        .unwrap_or_else(|e| panic!("handshake after restart: {e}\n{}", env.diag()));
    assert_eq!(before[0], after[0], "a different certificate after restart");
    // Give the background loops a moment to do anything they would do at start-up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "active", "{d}");
    assert_eq!(
        env.served(host).await.expect("served")[0],
        before[0],
        "certificate replaced after restart"
    );
    assert_eq!(
        env.account_creations(),
        1,
        "`{ACCOUNT_CREATED_LOG}` lines over both runs\n{}",
        env.diag()
    );
}

#[tokio::test]
async fn delete_stops_serving_at_once() {
    let env = DomainEnv::start().await;
    let host = "links.delete.test";
    env.activate(host).await;
    assert!(env.served(host).await.is_ok());

    let r = env
        .gw
        .admin(reqwest::Method::DELETE, &format!("/v1/domains/{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let r = tls_handshake(env.gw.https_port, Some(host)).await;
    assert!(r.is_err(), "handshake for a deleted domain succeeded");
    let r = env
        .gw
        .admin(reqwest::Method::GET, &format!("/v1/domains/{host}"))
        .send()
        .await
        .unwrap();
    expect_admin_error(r, 404, "not_found").await;
    // The static host is unaffected.
    assert!(tls_handshake(env.gw.https_port, Some("links.acme.test"))
        .await
        .is_ok());
}

#[tokio::test]
async fn routing_removed_marks_moved_and_keeps_serving() {
    let env = DomainEnv::start().await;
    let host = "links.moved.test";
    env.activate(host).await;
    let cert = env.served(host).await.expect("served")[0].clone();

    env.dns.clear_cname(host).await;
    // One failed check is not enough: it takes three consecutive ones.
    let d = env.check(host).await;
    assert_eq!(
        d["state"], "active",
        "moved after a single failed check: {d}"
    );
    let d = env.wait_state(host, "moved", STEP_TIMEOUT).await;
    assert_ne!(record(&d, 1)["status"], "ok", "{d}");
    let now_served = env
        .served(host)
        .await
        .unwrap_or_else(|e| panic!("moved domain no longer served: {e}"));
    assert_eq!(now_served[0], cert);
}

#[tokio::test]
async fn renewal_swaps_certificate_without_failed_handshakes() {
    let env = DomainEnv::start_with(DomainOpts {
        renew_before: "2000d".into(),
        ..DomainOpts::default()
    })
    .await;
    let host = "links.renewal.test";
    let d = env.add_domain(host, "acme").await;
    env.set_ownership(&d).await;
    env.set_routing(host).await;

    // Catch the first certificate as soon as it is served (renewal follows right away).
    let root = env.pebble.root_der();
    let port = env.gw.https_port;
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    let first = loop {
        if let Ok(chain) = served_chain(port, host, &root).await {
            break cert_serial(&chain[0]);
        }
        if Instant::now() > deadline {
            panic!("{host} never served\n{}", env.diag());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Background handshakes every ~200 ms for the whole renewal.
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
    let bg = {
        let (stop, log, root, host) = (stop.clone(), log.clone(), root.clone(), host.to_string());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = served_chain_blocking(port, &host, &root).map(|c| cert_serial(&c[0]));
                log.lock().unwrap().push(r);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(90);
    let second = loop {
        let last = log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|r| r.clone().ok());
        if let Some(s) = last.filter(|s| *s != first) {
            break s;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "certificate not renewed within 90 s (serial {first})\n{}",
                env.diag()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Keep probing a little after the swap: no further renewal within the hour.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    bg.join().unwrap();

    let results = log.lock().unwrap().clone();
    eprintln!(
        "renewal: first serial {first}, renewed serial {second}, {} background handshakes",
        results.len()
    );
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} handshakes failed during renewal: {:?}",
        failures.len(),
        results.len(),
        failures
    );
    let mut serials: Vec<String> = results.into_iter().filter_map(Result::ok).collect();
    serials.dedup();
    assert_eq!(
        serials.last(),
        Some(&second),
        "served serials in order: {serials:?}"
    );
    assert!(
        serials.len() <= 2,
        "more than one renewal in a few seconds: {serials:?}"
    );
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "active", "{d}");
    let m = env.gw.metrics().await;
    assert_eq!(
        metric(&m, "linkgate_acme_orders_total", &[("result", "ok")]),
        Some(2.0),
        "one issuance and one renewal\n{m}"
    );
}

#[tokio::test]
async fn hostname_validation_and_conflicts() {
    let env = DomainEnv::start().await;
    for bad in [
        "*.example.test",
        "10.0.0.1",
        "bad_name!",
        EDGE_TARGET,
        "-lead.example.test",
        "links..example.test",
    ] {
        let r = env
            .gw
            .admin_post("/v1/domains", &json!({"hostname": bad, "tenant": "acme"}))
            .await;
        let st = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{bad:?}: {text}"));
        assert_eq!(
            (st.as_u16(), v["error"].as_str()),
            (400, Some("invalid_hostname")),
            "hostname {bad:?}: {text}"
        );
    }
    let r = env
        .gw
        .admin_post(
            "/v1/domains",
            &json!({"hostname": "links.nobody.test", "tenant": "nobody"}),
        )
        .await;
    expect_admin_error(r, 400, "unknown_tenant").await;

    // Upper case accepted, stored lower-case; names compare case-insensitively.
    let d = env.add_domain("LINKS.Validation.test", "acme").await;
    assert_eq!(d["hostname"], "links.validation.test", "{d}");
    assert_eq!(
        record(&d, 0)["name"],
        "_linkgate.links.validation.test",
        "{d}"
    );
    let got = env.get_domain("links.validation.test").await;
    assert_eq!(got["hostname"], "links.validation.test");
    for dup in ["links.validation.test", "Links.Validation.Test"] {
        let r = env
            .gw
            .admin_post("/v1/domains", &json!({"hostname": dup, "tenant": "acme"}))
            .await;
        expect_admin_error(r, 409, "hostname_taken").await;
    }
    // Nothing was created by the refused requests.
    let list = env.list_domains().await;
    let names: Vec<&str> = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["hostname"].as_str())
        .collect();
    assert!(!names.contains(&"links.nobody.test"), "{names:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "links.validation.test")
            .count(),
        1,
        "{names:?}"
    );
}

/// Lines of the gateway log containing every one of `parts`.
fn log_lines(env: &DomainEnv, parts: &[&str]) -> usize {
    env.gw
        .log()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

#[tokio::test]
async fn order_outliving_its_registration_is_discarded() {
    let env = DomainEnv::start_with(DomainOpts {
        tenants: vec!["acme", "globex"],
        ..DomainOpts::default()
    })
    .await;
    // A first activation creates (and caches) the ACME account.
    env.activate("links.warmup.test").await;
    let host = "links.reregistered.test";
    let first = env.add_domain(host, "acme").await;

    // Pebble frozen: the order for `acme`'s registration starts and hangs on the CA.
    env.pebble.pause();
    env.set_ownership(&first).await;
    env.set_routing(host).await;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while log_lines(&env, &["ordering a certificate", host]) == 0 {
        assert!(
            Instant::now() < deadline,
            "no order started for {host}\n{}",
            env.diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Meanwhile the domain is deleted and registered again, by another tenant whose
    // ownership record does not exist.
    let r = env
        .gw
        .admin(reqwest::Method::DELETE, &format!("/v1/domains/{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let second = env.add_domain(host, "globex").await;
    assert_ne!(record(&first, 0)["value"], record(&second, 0)["value"]);

    // The CA answers; the order completes for the old registration.
    env.pebble.resume();
    let d = env
        .wait_for(
            host,
            "the old order's result stored or discarded",
            ACTIVE_TIMEOUT,
            |d| !d["certificate"].is_null() || log_lines(&env, &["result discarded", host]) > 0,
        )
        .await;
    assert_eq!(d["tenant"], "globex", "{d}");
    assert!(
        d["certificate"].is_null(),
        "the new registration got the old order's certificate: {d}\n{}",
        env.diag()
    );
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert_eq!(record(&d, 0)["status"], "wrong_value", "{d}");
    assert!(
        tls_handshake(env.gw.https_port, Some(host)).await.is_err(),
        "the new registration is served without its DNS being checked"
    );
    // Checks keep it pending (nothing was left behind by the discarded order).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = env.check(host).await;
    assert_eq!(d["state"], "pending_ownership", "{d}");
    assert!(d["certificate"].is_null(), "{d}");
}

#[tokio::test]
async fn renewal_needs_only_the_routing_record_once_active() {
    // renew_before longer than pebble's validity: renewal is due right after activation.
    let env = DomainEnv::start_with(DomainOpts {
        renew_before: "2000d".into(),
        ..DomainOpts::default()
    })
    .await;
    let host = "links.renewnoowner.test";
    let d = env.add_domain(host, "acme").await;
    env.set_ownership(&d).await;
    env.set_routing(host).await;
    // Once the order runs, the customer removes the ownership record (it was proven).
    env.wait_for(host, "issuing or active", ACTIVE_TIMEOUT, |d| {
        d["state"] == "issuing" || d["state"] == "active"
    })
    .await;
    env.dns
        .clear_cname(record(&d, 0)["name"].as_str().unwrap())
        .await;
    env.wait_state(host, "active", ACTIVE_TIMEOUT).await;
    let first = env.served(host).await.expect("served");

    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let m = env.gw.metrics().await;
        if metric(&m, "linkgate_acme_orders_total", &[("result", "ok")]) >= Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal without the ownership record\n{m}\n{}",
            env.diag()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "active", "{d}");
    assert_eq!(record(&d, 0)["status"], "missing", "{d}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while env.served(host).await.expect("served")[0] == first[0] {
        assert!(Instant::now() < deadline, "renewed certificate not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn domain_paths_accept_every_spelling_of_the_name() {
    let env = DomainEnv::start().await;
    let d = env.add_domain("Bücher.Paths.test", "acme").await;
    let stored = "xn--bcher-kva.paths.test";
    assert_eq!(d["hostname"], stored, "{d}");
    for spelling in [
        stored,
        "xn--bcher-kva.paths.test.",
        "XN--BCHER-KVA.Paths.Test",
        "bücher.paths.test",
        "BÜCHER.paths.test.",
    ] {
        let d = env.get_domain(spelling).await;
        assert_eq!(d["hostname"], stored, "GET {spelling}: {d}");
        let d = env.check(spelling).await;
        assert_eq!(d["hostname"], stored, "check {spelling}: {d}");
    }
    for (method, path) in [
        (reqwest::Method::GET, "/v1/domains/bad_name!.paths.test"),
        (reqwest::Method::GET, "/v1/domains/%ff.paths.test"),
        (reqwest::Method::DELETE, "/v1/domains/*.paths.test"),
        (reqwest::Method::POST, "/v1/domains/a..b.paths.test/check"),
    ] {
        let r = env.gw.admin(method, path).send().await.unwrap();
        expect_admin_error(r, 404, "not_found").await;
    }
    let r = env
        .gw
        .admin(reqwest::Method::DELETE, "/v1/domains/Bücher.paths.test.")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let r = env
        .gw
        .admin(reqwest::Method::GET, &format!("/v1/domains/{stored}"))
        .send()
        .await
        .unwrap();
    expect_admin_error(r, 404, "not_found").await;
}

#[tokio::test]
async fn sighup_keeps_serving_domains_made_active_through_the_api() {
    let env = DomainEnv::start().await;
    let host = "links.reload.test";
    env.activate(host).await;
    let client = env.client_for(host);
    let base = format!("https://{host}:{}", env.gw.https_port);
    // Routed to the tenant: no session yet (an unknown host would get 421).
    let r = client.get(format!("{base}/app")).send().await.unwrap();
    expect_error(r, 401, "session_required").await;
    let active = |m: &str| metric(m, "linkgate_domains", &[("state", "active")]);
    let before = active(&env.gw.metrics().await);

    assert_eq!(env.gw.reload().await, Some(true), "{}", env.diag());
    let r = client.get(format!("{base}/app")).send().await.unwrap();
    expect_error(r, 401, "session_required").await;
    // A magic link for the custom domain still turns into a session that is forwarded.
    let r = env
        .gw
        .admin_post(
            "/v1/links",
            &json!({"tenant": "acme", "sub": "dora", "host": format!("{host}:{}", env.gw.https_port)}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    let tok = v["token"].as_str().expect("token");
    let r = client
        .get(format!("{base}/login/{tok}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "redeem after SIGHUP\n{}", env.diag());
    let cookie = session_cookie(&r).expect("session cookie").value;
    let r = client
        .get(format!("{base}/app/page"))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok /app/page");
    assert!(
        env.served(host).await.is_ok(),
        "certificate gone after SIGHUP"
    );
    assert_eq!(
        active(&env.gw.metrics().await),
        before,
        "linkgate_domains{{state=active}} changed by a reload that changed nothing"
    );
    // The static domain is still served too.
    assert!(tls_handshake(env.gw.https_port, Some("links.acme.test"))
        .await
        .is_ok());
}

#[tokio::test]
async fn config_domains_are_listed_once() {
    // `links.extra.test` is a [[domains]] entry without a static certificate: it goes through
    // the DNS and ACME flow (a store row) and must not also be listed as a static domain.
    let env = DomainEnv::start_with(DomainOpts {
        extra_toml: "\n[[domains]]\nhostname = \"links.extra.test\"\ntenant = \"acme\"\n".into(),
        ..DomainOpts::default()
    })
    .await;
    let list = env.list_domains().await;
    let all = list["domains"].as_array().expect("domains list");
    let count = |h: &str| all.iter().filter(|d| d["hostname"] == h).count();
    assert_eq!(count("links.extra.test"), 1, "{list}");
    assert_eq!(count("links.acme.test"), 1, "{list}");
    let extra = all
        .iter()
        .find(|d| d["hostname"] == "links.extra.test")
        .unwrap();
    assert_eq!(extra["state"], "pending_ownership", "{list}");
    assert_eq!(extra["records"].as_array().map(Vec::len), Some(2), "{list}");
    let stat = all
        .iter()
        .find(|d| d["hostname"] == "links.acme.test")
        .unwrap();
    assert_eq!(stat["state"], "active", "{list}");
    // The static domain is found by any spelling of its name, as stored domains are.
    for spelling in ["links.acme.test", "LINKS.Acme.test.", "links%2Eacme.test"] {
        let body = env.get_domain(spelling).await;
        assert_eq!(body["hostname"], "links.acme.test", "{spelling}");
    }
}

#[tokio::test]
async fn sighup_onboards_config_domains_it_adds() {
    let mut env = DomainEnv::start().await;
    let host = "links.added.test";
    env.gw.p.cfg.tail += &format!("\n[[domains]]\nhostname = \"{host}\"\ntenant = \"acme\"\n");
    env.gw.p.write_config();
    assert_eq!(env.gw.reload().await, Some(true), "{}", env.diag());
    // Stored within a scheduler tick, then onboarded like a domain made through the API.
    env.wait_status(host, 200).await;
    let d = env
        .wait_for(host, "checked", STEP_TIMEOUT, |d| {
            d["records"].as_array().is_some_and(|r| r.len() == 2)
        })
        .await;
    assert_eq!(d["state"], "pending_ownership", "{d}");
    env.set_ownership(&d).await;
    env.set_routing(host).await;
    env.wait_state(host, "active", Duration::from_secs(60))
        .await;
    assert!(env.served(host).await.is_ok(), "{}", env.diag());
}

#[tokio::test]
async fn sighup_stops_serving_a_config_domain_it_removes() {
    let extra = "\n[[domains]]\nhostname = \"links.dropped.test\"\ntenant = \"acme\"\n";
    let mut env = DomainEnv::start_with(DomainOpts {
        extra_toml: extra.into(),
        ..DomainOpts::default()
    })
    .await;
    let host = "links.dropped.test";
    let d = env
        .wait_for(host, "checked", STEP_TIMEOUT, |d| {
            d["records"].as_array().is_some_and(|r| r.len() == 2)
        })
        .await;
    env.set_ownership(&d).await;
    env.set_routing(host).await;
    env.wait_state(host, "active", Duration::from_secs(60))
        .await;
    assert!(env.served(host).await.is_ok(), "{}", env.diag());

    // The entry leaves the file: after SIGHUP the domain is deleted and no longer served
    // (a later renewal or restart must not bring it back).
    env.gw.p.cfg.tail = env.gw.p.cfg.tail.replace(extra, "");
    env.gw.p.write_config();
    assert_eq!(env.gw.reload().await, Some(true), "{}", env.diag());
    env.wait_status(host, 404).await;
    assert!(
        env.served(host).await.is_err(),
        "still served\n{}",
        env.diag()
    );
    env.gw.restart().await;
    let r = env
        .gw
        .admin(reqwest::Method::GET, &format!("/v1/domains/{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "back after a restart");
    assert!(env.served(host).await.is_err(), "served after a restart");
}

#[tokio::test]
async fn http01_is_answered_by_any_node_sharing_the_store() {
    // The CA's HTTP-01 request reaches a node that did not order (behind the routing CNAME
    // any node may get it): that node answers from the shared store.
    let env = DomainEnv::start_with(DomainOpts {
        challenges_via_peer: true,
        ..DomainOpts::default()
    })
    .await;
    let host = "links.twonodes.test";
    env.activate(host).await;
    assert!(env.served(host).await.is_ok(), "{}", env.diag());
    let peer = env.peer.as_ref().expect("second node");
    assert!(
        !peer.log().contains("ordering a certificate"),
        "the peer ordered (ACME is off there)"
    );
    // Answers are withdrawn when the order ends: the peer no longer knows the token.
    let conn = rusqlite::Connection::open(env.gw.p.path("state").join("linkgate.db")).unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM acme_challenges", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "HTTP-01 answers left in the store");
}

#[tokio::test]
async fn an_unusable_stored_certificate_is_ordered_again() {
    let mut env = DomainEnv::start().await;
    let host = "links.damaged.test";
    env.activate(host).await;
    // The stored chain gets damaged; after a restart it is parsed at its first handshake.
    let db = env.gw.p.path("state").join("linkgate.db");
    let n = rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "UPDATE domains SET cert_pem = 'not a certificate' WHERE hostname = ?1",
            [host],
        )
        .unwrap();
    assert_eq!(n, 1);
    env.gw.restart().await;
    assert!(
        env.served(host).await.is_err(),
        "a damaged chain was served"
    );
    // The domain is ordered again at once and served with the new certificate.
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.served(host).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "not served again\n{}",
            env.diag()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let d = env.get_domain(host).await;
    assert_eq!(d["state"], "active", "{d}");
    assert!(env
        .gw
        .log()
        .contains("stored certificate unusable; ordering a new one"));
}
