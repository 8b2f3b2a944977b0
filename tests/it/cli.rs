//! SPEC section 1: `check-config`, `mint`, signals.

use std::fs;
use std::time::Duration;

use crate::harness::*;
use serde_json::json;

fn url_line(stdout: &str) -> String {
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("https://"))
        .unwrap_or_else(|| panic!("no URL printed: {stdout:?}"))
        .to_string()
}

/// `https://host/path` -> `https://host:<test port>/path`
fn local(gw: &Gateway, url: &str) -> String {
    let rest = url.strip_prefix("https://").unwrap();
    let i = rest.find('/').unwrap_or(rest.len());
    let path = if i == rest.len() { "/" } else { &rest[i..] };
    gw.url_host(rest[..i].split(':').next().unwrap(), path)
}

fn token_of(url: &str) -> String {
    if let Some(i) = url.find("magic_link=") {
        url[i + "magic_link=".len()..]
            .split('&')
            .next()
            .unwrap()
            .to_string()
    } else {
        url.rsplit("/login/")
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_string()
    }
}

#[test]
fn check_config_accepts_good_file() {
    let p = Prepared::new(GatewayCfg::default());
    let (code, out, err) = p.run_cli(&["check-config"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
}

#[test]
fn check_config_reports_every_problem_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    fs::write(d("short.key"), b"too short").unwrap();
    fs::write(d("good.key"), [b'g'; 40]).unwrap();
    let cfg = format!(
        r#"[server]
https_listen = "127.0.0.1:{p1}"
http_listen = "127.0.0.1:{p2}"
admin_listen = "127.0.0.1:{p3}"
threads = 1
state_dir = {state}

[session]
secret_file = {short}

[[tenants]]
id = "acme"
upstream = ["127.0.0.1:9"]

  [[tenants.keys]]
  kid = "k1"
  alg = "HS256"
  secret_file = {good}

  [[tenants.keys]]
  kid = "k2"
  alg = "HS256"
  secret_file = {short}

[[tenants]]
id = "Bad_Tenant!"
upstream = ["127.0.0.1:9"]

  [[tenants.keys]]
  kid = "k1"
  alg = "HS256"
  secret_file = {missing}
"#,
        p1 = free_port(),
        p2 = free_port(),
        p3 = free_port(),
        state = q(&d("state")),
        short = q(&d("short.key")),
        good = q(&d("good.key")),
        missing = q(&d("missing.key")),
    );
    let path = d("broken.toml");
    fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config", &path])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let expected = [
        "session.secret_file",
        "tenants[0].keys[1].secret_file",
        "tenants[1].id",
        "tenants[1].keys[0].secret_file",
    ];
    for key in expected {
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(key)).collect();
        assert!(!lines.is_empty(), "no line names `{key}`; stderr:\n{err}");
    }
    // One line per problem: no line names two of them.
    for l in err.lines() {
        let n = expected.iter().filter(|k| l.contains(*k)).count();
        assert!(n <= 1, "line names several problems: {l}");
    }
    // The valid key is not reported.
    assert!(
        !err.contains("tenants[0].keys[0]"),
        "good key reported:\n{err}"
    );
}

#[test]
fn check_config_rejects_unknown_keys_and_bad_toml() {
    let p = Prepared::new(GatewayCfg::default());
    let good = fs::read_to_string(&p.config_path).unwrap();
    let bad = good.replacen("[server]\n", "[server]\nbogus_setting = 1\n", 1);
    fs::write(&p.config_path, bad).unwrap();
    let (code, _, err) = p.run_cli(&["check-config"]);
    assert_eq!(code, 2, "unknown key accepted: {err}");
    assert!(
        err.contains("bogus_setting"),
        "unknown key not named: {err}"
    );

    fs::write(&p.config_path, "[server\nthis is not toml").unwrap();
    let (code, _, err) = p.run_cli(&["check-config"]);
    assert_eq!(code, 2, "{err}");
    assert!(!err.trim().is_empty());
}

#[test]
fn check_config_never_prints_the_source_of_a_syntax_error() {
    // A bad escape inside an inline secret: the error names the line, not its text.
    let p = Prepared::new(GatewayCfg::default());
    let good = fs::read_to_string(&p.config_path).unwrap();
    let secret = "s3cr3t-never-printed-0123456789abcdef";
    let bad = good.replacen(
        "[server]\n",
        &format!("[server]\nsecret_typo = \"{secret}\\q\"\n"),
        1,
    );
    fs::write(&p.config_path, bad).unwrap();
    let (code, out, err) = p.run_cli(&["check-config"]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(!err.contains("s3cr3t"), "secret printed: {err}");
    assert!(!out.contains("s3cr3t"), "secret printed: {out}");
    assert!(err.contains("line "), "no position: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[tokio::test]
async fn mint_prints_a_working_path_form_url() {
    let p = Prepared::new(GatewayCfg::default());
    let (code, out, err) = p.run_cli(&["mint", "--tenant", "acme", "--sub", "alice"]);
    assert_eq!(code, 0, "{err}");
    let url = url_line(&out);
    // The https_listen port may be included when it is not 443.
    let port = format!("https://links.acme.test:{}/login/", p.https_port);
    assert!(
        url.starts_with("https://links.acme.test/login/") || url.starts_with(&port),
        "{url}"
    );
    let tok = token_of(&url);
    let c = jwt_payload(&tok);
    assert_eq!(c["sub"], "alice");
    let exp = c["exp"].as_i64().unwrap();
    assert!(
        (exp - (now() + 5 * 86400)).abs() <= 30,
        "default TTL 5 days, exp {exp}"
    );

    let gw = Gateway::start_prepared(p).await;
    let r = gw.client().get(local(&gw, &url)).send().await.unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    let cookie = session_cookie(&r).unwrap().value;
    assert_eq!(
        gw.get_with_cookie("acme", "/m", &cookie).await.status(),
        200
    );
    assert_eq!(
        gw.upstream("acme")
            .last("/m")
            .unwrap()
            .header("x-linkgate-subject"),
        Some("alice")
    );
}

#[tokio::test]
async fn mint_query_form_ttl_claims_host_one_time() {
    let mut acme = TenantCfg::new("acme");
    acme.hosts.push("portal.acme.test".into());
    let p = Prepared::new(GatewayCfg::with_tenants(vec![acme]));
    let (code, out, err) = p.run_cli(&[
        "mint",
        "--tenant",
        "acme",
        "--sub",
        "bob",
        "--query",
        "--ttl",
        "1h",
        "--claim",
        "email=bob@acme.example",
        "--host",
        "portal.acme.test",
    ]);
    assert_eq!(code, 0, "{err}");
    let url = url_line(&out);
    let port = format!("https://portal.acme.test:{}/", p.https_port);
    assert!(
        url.starts_with("https://portal.acme.test/") || url.starts_with(&port),
        "{url}"
    );
    assert!(url.contains("magic_link="), "{url}");
    assert!(!url.contains("/login/"), "{url}");
    let c = jwt_payload(&token_of(&url));
    assert_eq!(c["email"], "bob@acme.example");
    assert!((c["exp"].as_i64().unwrap() - (now() + 3600)).abs() <= 30);

    let (code, out, err) = p.run_cli(&["mint", "--tenant", "acme", "--sub", "carol", "--one-time"]);
    assert_eq!(code, 0, "{err}");
    let once = url_line(&out);
    let oc = jwt_payload(&token_of(&once));
    assert_eq!(oc["one_time"], json!(true));
    assert!(
        oc["jti"].as_str().is_some_and(|s| !s.is_empty()),
        "one-time link needs a jti"
    );

    let gw = Gateway::start_prepared(p).await;
    let r = gw.client().get(local(&gw, &url)).send().await.unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    let cookie = session_cookie(&r).unwrap().value;
    assert_eq!(
        gw.get_with_cookie("acme", "/q", &cookie).await.status(),
        200
    );
    assert_eq!(
        gw.upstream("acme")
            .last("/q")
            .unwrap()
            .header("x-linkgate-email"),
        Some("bob@acme.example")
    );
    let r = gw.client().get(local(&gw, &once)).send().await.unwrap();
    assert_eq!(r.status(), 200, "one-time link shows the confirm page");
    assert!(session_cookie(&r).is_none());
}

#[test]
fn mint_refuses_tenant_with_only_public_keys() {
    let p = Prepared::new(GatewayCfg::with_tenants(vec![
        TenantCfg::new("pubco").keys(vec![KeyCfg::ed25519("ed1")])
    ]));
    let (code, out, err) = p.run_cli(&["mint", "--tenant", "pubco", "--sub", "a"]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("https://"), "printed a URL anyway: {out}");
    assert!(!err.trim().is_empty(), "mint must say why");
}

/// SPEC 1: `signal` stops the gateway gracefully: a request in flight completes, exit 0.
async fn finishes_in_flight_requests_and_exits_0(signal: &str) {
    let mut gw = Gateway::default().await;
    let client = gw.client();
    let url = gw.url("acme", "/static/slow");
    let inflight = tokio::spawn(async move { client.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        gw.upstream("acme").last("/static/slow").is_some(),
        "request not in flight yet"
    );
    gw.signal(signal);
    let r = inflight
        .await
        .unwrap()
        .expect("in-flight request must complete");
    assert_eq!(r.status(), 200, "SIG{signal}; log:\n{}", gw.log());
    assert_eq!(r.text().await.unwrap(), "upstream ok /static/slow");
    let code = gw.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "SIG{signal}; log:\n{}", gw.log());
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    finishes_in_flight_requests_and_exits_0("TERM").await;
}

#[tokio::test]
async fn sigint_finishes_in_flight_requests_and_exits_0() {
    finishes_in_flight_requests_and_exits_0("INT").await;
}

#[tokio::test]
async fn sighup_during_start_up_neither_stops_the_gateway_nor_is_lost() {
    let p = Prepared::new(GatewayCfg::default());
    let db = p.path("state").join("linkgate.db");
    let mut gw = Gateway::spawn_prepared(p);
    // The store is opened early in start-up, well before the listeners and background tasks.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !db.exists() {
        assert!(std::time::Instant::now() < deadline, "store never created");
        assert!(gw.is_running(), "exited early; log:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(1));
    }
    gw.signal("HUP");
    gw.wait_ready().await;
    assert!(gw.is_running());
    let reloaded = eventually(Duration::from_secs(5), || async {
        gw.log().contains("configuration reloaded")
    })
    .await;
    assert!(reloaded, "the early SIGHUP was lost; log:\n{}", gw.log());
    let r = gw
        .client()
        .get(gw.url("acme", "/static/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn sighup_reloads_valid_config_and_keeps_running_on_broken_one() {
    let mut gw = Gateway::default().await;
    let pid = gw.pid();
    let r = gw
        .client()
        .get(gw.url("acme", "/newpub"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "session_required").await;

    let text = fs::read_to_string(&gw.config_path).unwrap();
    let new = text.replace(
        r#"public_paths = ["/static/", "/pub"]"#,
        r#"public_paths = ["/static/", "/pub", "/newpub"]"#,
    );
    assert_ne!(text, new);
    fs::write(&gw.config_path, &new).unwrap();
    gw.signal("HUP");
    let ok = eventually(Duration::from_secs(5), || async {
        gw.client()
            .get(gw.url("acme", "/newpub"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    assert!(ok, "reloaded public path not served; log:\n{}", gw.log());
    assert!(gw.is_running());
    assert_eq!(gw.pid(), pid);

    // A broken config is refused; the running one stays.
    let broken = new.replacen("[server]\n", "[server]\nbogus_reload_key = 1\n", 1);
    fs::write(&gw.config_path, broken).unwrap();
    gw.signal("HUP");
    let logged = eventually(Duration::from_secs(5), || async {
        gw.log().contains("bogus_reload_key")
    })
    .await;
    assert!(logged, "reload problem not logged; log:\n{}", gw.log());
    assert!(gw.is_running(), "gateway died on a broken reload");
    let r = gw
        .client()
        .get(gw.url("acme", "/newpub"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = gw.login("acme", "alice").await;
    assert_eq!(
        gw.get_with_cookie("acme", "/y", &cookie).await.status(),
        200
    );
}

#[test]
fn serve_exits_with_the_reason_when_a_listener_port_is_taken() {
    let p = Prepared::new(GatewayCfg::default());
    let _taken = std::net::TcpListener::bind(("127.0.0.1", p.https_port)).unwrap();
    let (code, out, err) = p.run_cli(&["serve"]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let want = format!(
        "server.https_listen = 127.0.0.1:{}: cannot listen",
        p.https_port
    );
    assert!(err.contains(&want), "stderr: {err}");
}

#[tokio::test]
async fn the_harness_moves_off_a_port_taken_before_start() {
    // What `start_prepared` does when another process takes a listener port in the window
    // between `free_port` and linkgate's bind.
    let p = Prepared::new(GatewayCfg::default());
    let taken = p.https_port;
    let _hold = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
    let gw = Gateway::start_prepared(p).await;
    assert_ne!(gw.p.https_port, taken);
    let r = gw
        .client()
        .get(gw.url("acme", "/static/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
