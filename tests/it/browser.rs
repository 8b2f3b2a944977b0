//! End-to-end browser test (SPEC section 3, "Link scanners"): a real headless Chromium,
//! driven through chromedriver (WebDriver) with `fantoccini`, opens a `one_time` magic link,
//! presses the branded confirm page's button, lands on the upstream with a session cookie,
//! reloads, and reopens the used link.
//!
//! Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver);
//! `.ci/run` installs them. Without them the test fails (it does not skip).
//! Screenshots go to `$CARGO_TARGET_DIR/test-artifacts/` (else the system temp dir).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::harness::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const HOST: &str = "links.acme.test";
/// Headers the HTML upstream shows, in this order.
const SHOWN: [&str; 3] = [
    "x-linkgate-subject",
    "x-linkgate-email",
    "x-linkgate-tenant",
];
/// A small logo, served by the upstream under the tenant's public path `/static/`.
const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48"><rect width="48" height="48" rx="10" fill="#5b21b6"/><text x="24" y="32" font-size="22" text-anchor="middle" fill="#fff" font-family="sans-serif">A</text></svg>"##;

// ---------------------------------------------------------------------------------------
// An upstream that shows the identity headers it received as an HTML page
// ---------------------------------------------------------------------------------------

struct HtmlUpstream {
    addr: SocketAddr,
    /// One dump (request line and headers) per request received.
    seen: Arc<Mutex<Vec<String>>>,
    _server: TestHttpServer,
}

impl HtmlUpstream {
    /// A hyper HTTP/1.1 server on its own thread: `/static/logo.svg` is an SVG image, every
    /// other path an HTML page with `<dl>` of the `SHOWN` headers (`<dd id="<name>">`).
    fn start() -> HtmlUpstream {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen2 = seen.clone();
        let server = TestHttpServer::start(
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(),
            move |req| {
                let seen = seen2.clone();
                async move { Ok::<_, std::convert::Infallible>(html_answer(&req, &seen)) }
            },
        );
        HtmlUpstream {
            addr: server.addr,
            seen,
            _server: server,
        }
    }

    fn dump(&self) -> String {
        self.seen.lock().unwrap().join("\n----\n")
    }

    /// Requests for pages (not the logo or favicon).
    fn page_requests(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|d| !d.contains("/static/") && !d.contains("/favicon"))
            .count()
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html_answer<B>(
    req: &hyper::Request<B>,
    seen: &Mutex<Vec<String>>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let mut dump = format!("{} {target}\n", req.method());
    for (n, v) in req.headers() {
        dump.push_str(&format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    seen.lock().unwrap().push(dump);
    let (ctype, body) = if req.uri().path() == "/static/logo.svg" {
        ("image/svg+xml", LOGO_SVG.to_string())
    } else {
        let mut dl = String::new();
        for name in SHOWN {
            let v = req
                .headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            dl += &format!("<dt>{name}</dt><dd id=\"{name}\">{}</dd>", html_escape(&v));
        }
        (
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Upstream app</title></head>\
                 <body><h1>Upstream app</h1><p id=\"path\">{}</p><dl>{dl}</dl></body></html>",
                html_escape(req.uri().path())
            ),
        )
    };
    hyper::Response::builder()
        .status(200)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// chromedriver + Chromium
// ---------------------------------------------------------------------------------------

/// A chromedriver process (in its own process group, with the Chromium it starts) and a
/// fresh profile directory; Drop kills the whole group.
struct Browser {
    driver: Child,
    dir: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver was made a group leader: SIGKILL its group (Chromium and helpers).
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", self.driver.id()))
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chromedriver.log")
    }

    fn log(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        // The verbose log is long; its end is what explains a failure.
        let start = log.len().saturating_sub(6000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        log[start..].to_string()
    }

    /// Starts chromedriver on a free loopback port and opens a WebDriver session with
    /// headless Chromium that resolves `links.acme.test` to 127.0.0.1.
    async fn start() -> (Browser, Client) {
        for (bin, pkg) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(bin).exists(),
                "{bin} not found: the browser tests need Debian's `chromium` and \
                 `chromium-driver` packages (`apt-get install -y chromium chromium-driver`; \
                 .ci/run installs them). Missing package: {pkg}"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("linkgate-browser-")
            .tempdir()
            .unwrap();
        let profile = dir.path().join("profile");
        fs::create_dir_all(&profile).unwrap();
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CHROMEDRIVER}: {e}"));
        let mut b = Browser { driver, dir };

        // Wait for chromedriver to answer /status.
        let status_url = format!("http://127.0.0.1:{port}/status");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = b.driver.try_wait().unwrap() {
                panic!("chromedriver exited at start ({st}); log:\n{}", b.log());
            }
            if let Ok(r) = plain_client().get(&status_url).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not answering on port {port} after 20 s; log:\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1024,768".into(),
            format!("--user-data-dir={}", profile.display()),
            "--ignore-certificate-errors".into(),
            format!("--host-resolver-rules=MAP {HOST} 127.0.0.1"),
        ];
        let caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "WebDriver session with {CHROMIUM} failed: {e}; chromedriver log:\n{}",
                    b.log()
                )
            });
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(Duration::from_secs(10)),
                Some(Duration::from_secs(20)),
                Some(Duration::from_secs(0)),
            ))
            .await
            .unwrap();
        (b, client)
    }
}

/// Where screenshots go: `$CARGO_TARGET_DIR/test-artifacts`, else `<tmp>/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("test-artifacts");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let png = c.screenshot().await.expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
    let path = artifacts_dir().join(name);
    fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("screenshot: {}", path.display());
    path
}

/// HTTP status of the current document (Navigation Timing `responseStatus`; Chromium >= 109).
async fn nav_status(c: &Client) -> Option<u64> {
    c.execute(
        "const n = performance.getEntriesByType('navigation')[0]; \
         return n && n.responseStatus ? n.responseStatus : null;",
        vec![],
    )
    .await
    .expect("execute")
    .as_u64()
}

/// Whether the page's first `<img>` (the branding logo) loaded; null when there is none.
async fn logo_loaded(c: &Client) -> Value {
    c.execute(
        "const i = document.querySelector('img'); \
         return i ? (i.complete && i.naturalWidth > 0) : null;",
        vec![],
    )
    .await
    .expect("execute")
}

async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(e) => panic!(
            "no `{css}` on {}: {e}\npage source:\n{}",
            c.current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default(),
            c.source().await.unwrap_or_default()
        ),
    }
}

async fn body_text(c: &Client) -> String {
    text_of(c, "body").await
}

/// Waits (up to 15 s) until the upstream page is shown, and returns (path, subject, email, tenant).
async fn upstream_page(c: &Client, what: &str) -> (String, String, String, String) {
    if let Err(e) = c
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css("dd#x-linkgate-subject"))
        .await
    {
        panic!(
            "{what}: the upstream page did not appear ({e}); at {}, page source:\n{}",
            c.current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default(),
            c.source().await.unwrap_or_default()
        );
    }
    (
        text_of(c, "#path").await,
        text_of(c, "dd#x-linkgate-subject").await,
        text_of(c, "dd#x-linkgate-email").await,
        text_of(c, "dd#x-linkgate-tenant").await,
    )
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_link_confirm_click_reload_and_reuse() {
    // Browser first: a machine without chromium fails here, with the reason.
    let (browser, c) = Browser::start().await;

    // Gateway: tenant `acme` with branding, its upstream the HTML upstream above; the logo is
    // served through the gateway (public path) so that the confirm page can show it.
    let html = HtmlUpstream::start();
    let mut p = Prepared::new(GatewayCfg::with_tenants(vec![TenantCfg::new("acme")]));
    let logo_url = format!("https://{HOST}:{}/static/logo.svg", p.https_port);
    p.cfg.tenants[0].extra = vec![
        r#"public_paths = ["/static/"]"#.to_string(),
        format!(
            r##"[tenants.branding]
title = "Acme Portal"
description = "Connect your tools to Acme."
logo_url = {}
color = "#5b21b6"
font = "Inter, system-ui, sans-serif"
buttons = [{{ label = "Docs", url = "https://docs.acme.example" }}]"##,
            q(&logo_url)
        ),
    ];
    p.upstream_addrs.insert("acme".into(), html.addr);
    let text = p.render();
    fs::write(&p.config_path, text).unwrap();
    let gw = Gateway::start_prepared(p).await;

    let mut cl = claims("alice");
    cl["one_time"] = json!(true);
    cl["email"] = json!("alice@acme.example");
    let tok = gw.token("acme", &cl);
    let link = gw.url("acme", &format!("/login/{tok}"));
    assert!(link.starts_with(&format!("https://{HOST}:")));

    // 2. The confirm page.
    c.goto(&link).await.expect("goto link");
    let src = c.source().await.unwrap();
    let h1 = text_of(&c, "h1").await;
    assert_eq!(h1, "Continue signing in", "confirm page h1; source:\n{src}");
    let title = c.title().await.unwrap();
    assert!(
        title.contains("Continue signing in") || title.contains("Acme Portal"),
        "confirm page <title> {title:?}"
    );
    let body = body_text(&c).await;
    assert!(
        body.contains("Acme Portal"),
        "branding title not visible on the confirm page: {body:?}"
    );
    assert!(
        !src.contains(&tok),
        "confirm page source contains the token"
    );
    assert!(
        !src.contains("alice@acme.example"),
        "confirm page shows a claim (email)"
    );
    assert_eq!(nav_status(&c).await, Some(200), "confirm page status");
    assert_eq!(
        html.page_requests(),
        0,
        "the confirm page must not reach the upstream: {}",
        html.dump()
    );
    // The branded logo loaded (CSP allows https: images; served through /static/).
    assert_eq!(
        logo_loaded(&c).await,
        json!(true),
        "branding logo not shown on the confirm page (null = no <img>); source:\n{src}"
    );
    let shot = screenshot(&c, "confirm-page.png").await;
    assert!(fs::metadata(&shot).unwrap().len() > 1000);
    assert!(
        c.get_all_cookies().await.unwrap().is_empty(),
        "the confirm page must not set a cookie"
    );

    // 6. Keyboard: the Continue button is displayed, enabled and can take focus.
    let button = c
        .find(Locator::Css("form button[type=submit]"))
        .await
        .expect("confirm page has form button[type=submit]");
    assert_eq!(button.text().await.unwrap(), "Continue");
    assert!(button.is_displayed().await.unwrap(), "button not displayed");
    assert!(button.is_enabled().await.unwrap(), "button not enabled");
    let form_method = c
        .find(Locator::Css("form"))
        .await
        .unwrap()
        .prop("method")
        .await
        .unwrap();
    assert_eq!(form_method.as_deref(), Some("post"), "form method");
    let autofocused = c
        .execute(
            "return document.activeElement === document.querySelector('form button[type=submit]');",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        autofocused == json!(true) || button.attr("autofocus").await.unwrap().is_some(),
        "Continue button neither has autofocus nor holds the focus"
    );
    let focusable = c
        .execute(
            "const b = document.querySelector('form button[type=submit]'); \
             b.focus(); return document.activeElement === b && b.tabIndex >= 0;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(focusable, json!(true), "Continue button cannot take focus");

    // 3. Press Continue: POST, 303 with the session cookie, then the upstream.
    button.click().await.expect("click Continue");
    let (path, sub, email, tenant) = upstream_page(&c, "after Continue").await;
    assert_eq!(path, "/", "landed on the wrong path");
    assert_eq!(sub, "alice", "x-linkgate-subject on the upstream page");
    assert_eq!(email, "alice@acme.example", "x-linkgate-email");
    assert_eq!(tenant, "acme", "x-linkgate-tenant");
    let url = c.current_url().await.unwrap();
    assert!(
        !url.as_str().contains(&tok),
        "URL after redeeming still has the token: {url}"
    );
    assert_eq!(url.host_str(), Some(HOST));
    assert_eq!(url.path(), "/");
    assert_eq!(nav_status(&c).await, Some(200), "upstream page status");
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|k| k.name() == COOKIE)
        .unwrap_or_else(|| panic!("browser holds no {COOKIE} cookie; cookies: {cookies:?}"));
    assert_eq!(session.secure(), Some(true), "cookie Secure: {session:?}");
    assert_eq!(
        session.http_only(),
        Some(true),
        "cookie HttpOnly: {session:?}"
    );
    assert_eq!(session.path(), Some("/"), "cookie Path: {session:?}");
    assert_eq!(
        format!("{:?}", session.same_site()),
        "Some(Lax)",
        "cookie SameSite: {session:?}"
    );
    // The cookie is HttpOnly: page scripts cannot see it.
    let js_cookie = c.execute("return document.cookie;", vec![]).await.unwrap();
    assert!(
        !js_cookie.as_str().unwrap_or_default().contains(COOKIE),
        "session cookie visible to scripts: {js_cookie}"
    );

    // 4. Reload: the cookie alone keeps the session.
    c.refresh().await.expect("refresh");
    let (path, sub, email, _) = upstream_page(&c, "after reload").await;
    assert_eq!((path.as_str(), sub.as_str()), ("/", "alice"));
    assert_eq!(email, "alice@acme.example");
    assert_eq!(
        html.page_requests(),
        2,
        "upstream page requests (Continue, reload): {}",
        html.dump()
    );

    // 5. The used link again: the HTML "Link already used" page (410).
    c.goto(&link).await.expect("goto used link");
    let src = c.source().await.unwrap();
    let h1 = text_of(&c, "h1").await;
    assert_eq!(h1, "Link already used", "reused link h1; source:\n{src}");
    let body = body_text(&c).await;
    assert!(
        body.contains("The link has already been used. Ask for a new one."),
        "reused link message: {body:?}"
    );
    assert!(
        body.contains("Acme Portal"),
        "error page not branded: {body:?}"
    );
    assert!(!src.contains(&tok), "error page source contains the token");
    assert_eq!(nav_status(&c).await, Some(410), "reused link status");
    assert_eq!(
        logo_loaded(&c).await,
        json!(true),
        "branding logo not shown on the error page; source:\n{src}"
    );
    screenshot(&c, "link-used-page.png").await;

    // The token never reached the upstream (SPEC section 3), not even through the `Referer`
    // of the subresource requests (logo, favicon) that the pages at the link URL cause.
    let leaks: Vec<String> = html
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|d| d.contains(&tok))
        .map(|d| {
            let mut lines = d.lines();
            let request_line = lines.next().unwrap_or_default().to_string();
            let carriers: Vec<&str> = lines
                .filter(|l| l.contains(&tok))
                .filter_map(|l| l.split(':').next())
                .collect();
            format!("{request_line} (token in: {})", carriers.join(", "))
        })
        .collect();
    assert_eq!(html.page_requests(), 2, "upstream: {}", html.dump());
    c.close().await.expect("close WebDriver session");
    drop(browser);

    if !leaks.is_empty() {
        // Say which answer let the browser send the link URL as `Referer`.
        let r = gw
            .client()
            .get(&link)
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        panic!(
            "the token reached the upstream in {} request(s): {leaks:#?}\n\
             (the used-link HTML page, {} at the link URL, has Referrer-Policy {:?})",
            leaks.len(),
            r.status(),
            header(&r, "referrer-policy")
        );
    }
    drop(gw);
}
