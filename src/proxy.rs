//! The HTTPS proxy: one `ProxyHttp` implementation whose `request_filter` decides, per the
//! contract's table, whether a request is answered by the gateway (link redemption, confirm
//! page, refusals) or forwarded with identity headers. Answers are written directly so the
//! connection stays open (pingora's `respond_error` would close it).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorType;
use serde_json::{Map, Value};

use crate::config::ConfirmMode;
use crate::gateway::{now, Gateway, HostRoute, InFlight, Tenant};
use crate::link::{self, LinkContext, LinkError, ValidLink};
use crate::metrics::Outcome;
use crate::pages;
use crate::session::{
    find_cookie, strip_cookie, Cached, CookieStrip, SessionData, MAX_COOKIE_VALUE,
};
use crate::tls::HandshakeSni;

/// Path of the JWKS on every served host.
pub const JWKS_PATH: &str = "/.well-known/linkgate/jwks.json";
const X_LINKGATE_ASSERTION: HeaderName = HeaderName::from_static("x-linkgate-assertion");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Largest request body drained to keep a connection after answering a link `POST`.
const MAX_DRAIN_BYTES: usize = 16 * 1024;

/// The gateway's HTTPS proxy.
pub struct GatewayProxy {
    gw: Arc<Gateway>,
}

impl GatewayProxy {
    /// A proxy over the shared gateway state.
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }
}

/// A session cookie opened once and kept (in [`Gateway::session_cache`]) for its later
/// requests.
pub struct OpenSession {
    data: SessionData,
    /// Unique per cookie (from its nonce), keys the assertion cache.
    id: [u8; 16],
    claims: Arc<Map<String, Value>>,
    /// Identity headers for the upstream, built once.
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    _in_flight: InFlight,
    tenant: Option<Arc<Tenant>>,
    /// The served host's route, once the host is known.
    route: Option<Arc<HostRoute>>,
    outcome: Option<Outcome>,
}

impl RequestCtx {
    /// The request's served host (lower-case, no port), or `""` before it is known.
    fn host(&self) -> &str {
        self.route.as_ref().map_or("", |r| &r.name)
    }
}

/// A refusal of the contract's section 3 or 4 table.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    status: u16,
    code: &'static str,
    message: &'static str,
}

impl Refusal {
    const HOST_MISMATCH: Refusal = Refusal {
        status: 421,
        code: "host_mismatch",
        message: "This connection was opened for another host.",
    };
    const UNKNOWN_HOST: Refusal = Refusal {
        status: 421,
        code: "unknown_host",
        message: "This host is not served here.",
    };
    const BAD_PATH: Refusal = Refusal {
        status: 400,
        code: "bad_path",
        message: "The request path is not valid.",
    };
    const SESSION_REQUIRED: Refusal = Refusal {
        status: 401,
        code: "session_required",
        message: "Sign in with your magic link to continue.",
    };
    const SESSION_INVALID: Refusal = Refusal {
        status: 401,
        code: "session_invalid",
        message: "Your session is no longer valid. Sign in again with a new link.",
    };
    const FORBIDDEN_PATH: Refusal = Refusal {
        status: 403,
        code: "forbidden_path",
        message: "Your session does not give access to this page.",
    };
    const UPSTREAM_UNAVAILABLE: Refusal = Refusal {
        status: 502,
        code: "upstream_unavailable",
        message: "The application is not reachable right now. Try again shortly.",
    };
    const METHOD_NOT_ALLOWED: Refusal = Refusal {
        status: 405,
        code: "method_not_allowed",
        message: "This method is not allowed here.",
    };

    fn link(e: LinkError) -> Refusal {
        Refusal {
            status: e.status(),
            code: e.code(),
            message: e.message(),
        }
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Writes a complete response without closing the connection.
async fn send(
    session: &mut Session,
    status: u16,
    headers: &[(HeaderName, HeaderValue)],
    body: Vec<u8>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (k, v) in headers {
        resp.insert_header(k.clone(), v.clone())?;
    }
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp), false).await?;
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

fn wants_html(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// Answers a refusal as JSON, or HTML when the client accepts it.
async fn refuse(
    session: &mut Session,
    tenant: Option<&Tenant>,
    r: Refusal,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    ctx.outcome = Some(Outcome::Rejected);
    let html = wants_html(session);
    let (ctype, body) = if html {
        let branding = tenant.and_then(|t| t.branding.as_ref());
        let b = pages::error_page(branding, r.code, r.message);
        let ct = HeaderValue::from_static("text/html; charset=utf-8");
        (ct, b)
    } else {
        (
            HeaderValue::from_static("application/json"),
            pages::json_error(r.code, r.message),
        )
    };
    // A refusal may be shown at a link URL: no-referrer keeps the token out of the Referer
    // of anything the page loads (logo, favicon).
    let mut headers = vec![
        (header::CONTENT_TYPE, ctype),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("x-robots-tag"),
            HeaderValue::from_static("noindex"),
        ),
    ];
    if r.status == 405 {
        headers.push((header::ALLOW, HeaderValue::from_static("GET, HEAD, POST")));
    }
    if html || tenant.and_then(|t| t.branding.as_ref()).is_some() {
        let with_img = tenant
            .and_then(|t| t.branding.as_ref())
            .is_some_and(|b| b.logo_url.is_some());
        headers.push((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(pages::csp(with_img)),
        ));
    }
    send(session, r.status, &headers, body).await?;
    Ok(true)
}

/// Room for a hostname lower-cased on the stack (DNS names have at most 253 characters).
const HOST_BUF: usize = 255;

/// `Host` (or `:authority`) without port and trailing dot, lower-case: borrowed from the
/// request when it already is (the usual case), else lower-cased into `buf` (or, past its
/// size, into a `String`). `None` when absent or empty.
fn request_host<'a>(req: &'a RequestHeader, buf: &'a mut [u8; HOST_BUF]) -> Option<Cow<'a, str>> {
    let raw = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))?;
    let (name, _) = crate::mint::split_host_port(raw);
    let name = name.trim_end_matches('.');
    if name.is_empty() {
        return None;
    }
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(Cow::Borrowed(name));
    }
    if name.len() > HOST_BUF {
        return Some(Cow::Owned(name.to_ascii_lowercase()));
    }
    let lower = &mut buf[..name.len()];
    lower.copy_from_slice(name.as_bytes());
    lower.make_ascii_lowercase();
    // ASCII case changes keep UTF-8 valid.
    std::str::from_utf8(lower).ok().map(Cow::Borrowed)
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| link::canonical_ip(a.ip()))
}

/// True for a client-sent header the gateway never forwards: `X-Linkgate-*`, the tenant's
/// `headers` names (compared case-insensitively with `_` as `-`), `X-Forwarded-*` and
/// `Forwarded`. Names from the `http` crate are already lower-case.
fn is_identity_header(name: &HeaderName, tenant: &Tenant) -> bool {
    let n = name.as_str().as_bytes();
    // Compares `n` with a lower-case, `-`-separated name prefix, `_` matching `-`.
    let starts_with = |prefix: &[u8]| {
        n.len() >= prefix.len()
            && n.iter()
                .zip(prefix)
                .all(|(&b, &c)| b == c || (c == b'-' && b == b'_'))
    };
    starts_with(b"x-linkgate-")
        || starts_with(b"x-forwarded-")
        || n == b"forwarded"
        || tenant
            .strip_names
            .iter()
            .any(|s| s.len() == n.len() && starts_with(s.as_bytes()))
}

/// The request sent upstream, as parts to add headers to: `req` without client-sent identity
/// headers and without the session cookie, with room for `extra` more headers, and with
/// `uri` as its target. `RequestHeader::from` the parts gives what pingora sends.
///
/// Built in one pass into a map sized up front. Header-name case is not kept (HTTP field
/// names are case-insensitive; HAProxy lower-cases them too), which spares pingora's second,
/// case-preserving map and its growth on every inserted header.
fn upstream_header(
    req: &RequestHeader,
    uri: http::Uri,
    tenant: &Tenant,
    cookie_name: &str,
    extra: usize,
) -> http::request::Parts {
    let mut headers = http::HeaderMap::with_capacity(req.headers.len() + extra);
    for (name, value) in req.headers.iter() {
        if is_identity_header(name, tenant) {
            continue;
        }
        if name == header::COOKIE {
            // Bytes, not `to_str`: a field with obs-text elsewhere still loses the session cookie.
            match strip_cookie(value.as_bytes(), cookie_name) {
                CookieStrip::Absent => {}
                CookieStrip::Emptied => continue,
                // Pieces of a valid field joined by `; `: valid too.
                CookieStrip::Rest(rest) => {
                    if let Ok(v) = HeaderValue::from_bytes(&rest) {
                        headers.append(name.clone(), v);
                    }
                    continue;
                }
            }
        }
        headers.append(name.clone(), value.clone());
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = req.method.clone();
    parts.uri = uri;
    parts.version = req.version;
    parts.headers = headers;
    parts.extensions = req.extensions.clone();
    parts
}

/// `ip` as a header value, formatted without a heap-allocated `String` (and, for IPv4, without
/// the formatting machinery, which costs more than the rest of the header).
fn ip_header_value(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        let mut buf = [0u8; 15];
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                buf[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                buf[len] = b'0' + octet / 10 % 10;
                len += 1;
            }
            buf[len] = b'0' + octet % 10;
            len += 1;
        }
        return HeaderValue::from_bytes(&buf[..len]).ok();
    }
    let mut buf = [0u8; 46];
    let mut w = &mut buf[..];
    write!(w, "{ip}").ok()?;
    let len = 46 - w.len();
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// The magic-link token of a request, and whether it came in the path form.
fn find_token(path: &str, query: Option<&str>) -> Option<(String, bool)> {
    if let Some(t) = path.strip_prefix("/login/") {
        if !t.is_empty() {
            return Some((t.to_string(), true));
        }
    }
    let q = query?;
    // A shortcut for the usual query; a `%` may spell the name (`magic%5Flink`), which the
    // parse below, like the upstream's, reads as `magic_link`.
    if !q.contains("magic_link") && !q.contains('%') {
        return None;
    }
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "magic_link")
        .map(|(_, v)| (v.into_owned(), false))
}

/// `query` without any `magic_link` parameter (other parameters kept as sent).
fn query_without_token(query: Option<&str>) -> Option<String> {
    let q = query?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty()
                && percent_encoding::percent_decode_str(key).decode_utf8_lossy() != "magic_link"
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `path` as a `Location` that stays on this site: leading `/` and `\` collapsed into one
/// `/`, since browsers read `//host/...` (and `/\host/...`) as another site.
fn same_site_path(path: &str) -> Cow<'_, str> {
    let rest = path.trim_start_matches(['/', '\\']);
    if rest.len() + 1 == path.len() {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(format!("/{rest}"))
    }
}

fn claim_header_value(v: &Value) -> Option<HeaderValue> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        other => other.to_string(),
    };
    HeaderValue::from_bytes(s.as_bytes()).ok()
}

impl GatewayProxy {
    async fn handle(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let gw = &self.gw;
        // The host is compared and looked up where it lies (no allocation): the route found
        // carries the owned name on.
        let routed = {
            let mut buf = [0u8; HOST_BUF];
            let sni = session
                .digest()
                .and_then(|d| d.ssl_digest.as_ref())
                .and_then(|d| d.extension.get::<HandshakeSni>());
            match (request_host(session.req_header(), &mut buf), sni) {
                (None, _) | (Some(_), None) => Err(Refusal::UNKNOWN_HOST),
                (Some(host), Some(sni)) if *sni.0 != *host => Err(Refusal::HOST_MISMATCH),
                (Some(host), Some(_)) => gw.route(&host).ok_or(Refusal::UNKNOWN_HOST),
            }
        };
        let (route, tenant) = match routed {
            Ok(r) => r,
            Err(r) => return refuse(session, None, r, ctx).await,
        };
        ctx.route = Some(route.clone());
        ctx.tenant = Some(tenant.clone());

        // A clone shares the URI's bytes; it lets the path be borrowed across `&mut session`.
        let uri = session.req_header().uri.clone();
        let raw_path = uri.path();
        let query = uri.query();
        let path = match crate::paths::normalize(raw_path) {
            Ok(p) => p,
            Err(_) => return refuse(session, Some(&tenant), Refusal::BAD_PATH, ctx).await,
        };

        if path == JWKS_PATH {
            ctx.outcome = Some(Outcome::Public);
            let headers = [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                ),
            ];
            send(session, 200, &headers, gw.signer.jwks().to_vec()).await?;
            return Ok(true);
        }

        if let Some((token, path_form)) = find_token(&path, query) {
            return self
                .handle_link(session, ctx, &tenant, &token, path_form, &path, query)
                .await;
        }

        let public = tenant.is_public(&path);
        let now = now();
        let session_data = if public {
            None
        } else {
            match self.session_from_cookie(session, &tenant, now).await {
                Ok(s) => Some(s),
                Err(r) => {
                    if let Some(login) = &tenant.login_url {
                        ctx.outcome = Some(Outcome::Rejected);
                        let headers = [
                            (header::LOCATION, hv(login)),
                            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                        ];
                        send(session, 302, &headers, Vec::new()).await?;
                        return Ok(true);
                    }
                    return refuse(session, Some(&tenant), r, ctx).await;
                }
            }
        };

        let mut identity = None;
        if let Some(open) = session_data.as_ref().map(|c| &c.value) {
            if let Some(Value::Array(allowed)) = open.claims.get("paths") {
                let ok = allowed.iter().any(|p| {
                    p.as_str()
                        .is_some_and(|p| crate::paths::prefix_matches(p, &path))
                });
                if !ok {
                    return refuse(session, Some(&tenant), Refusal::FORBIDDEN_PATH, ctx).await;
                }
            }
            let assertion = gw
                .signer
                .assertion(open.id, &route.name, &tenant.id, now, || {
                    let mut c = (*open.claims).clone();
                    c.insert("sub".into(), open.data.subject.clone().into());
                    c
                });
            identity = Some((&open.headers, assertion));
        }

        // Forward: identity headers stripped then set, session cookie removed,
        // X-Forwarded-* replaced, normalised path.
        let uri = if path == raw_path {
            uri
        } else {
            let pq = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            http::Uri::builder()
                .path_and_query(pq)
                .build()
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad path"))?
        };
        let ip = client_ip(session);
        let extra = identity.as_ref().map_or(0, |(h, _)| h.len() + 1) + 3;
        let mut req = upstream_header(session.req_header(), uri, &tenant, &gw.cookie_name, extra);
        // The names are not in the map (stripped above), so `insert` adds without searching
        // values to replace; plain `http` inserts copy no name bytes.
        let h = &mut req.headers;
        if let Some((headers, assertion)) = identity {
            for (name, value) in headers {
                h.insert(name.clone(), value.clone());
            }
            h.insert(X_LINKGATE_ASSERTION, assertion);
        }
        if let Some(v) = ip.and_then(ip_header_value) {
            h.insert(X_FORWARDED_FOR, v);
        }
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(X_FORWARDED_HOST, route.forwarded_host.clone());
        *session.req_header_mut() = RequestHeader::from(req);
        ctx.outcome = Some(if public && session_data.is_none() {
            Outcome::Public
        } else {
            Outcome::Forwarded
        });
        Ok(false)
    }

    /// Opens and checks the session cookie for `tenant`. A cookie seen before is found in
    /// the session cache (no decryption); expiry, tenant and revocation are checked every time.
    async fn session_from_cookie(
        &self,
        session: &Session,
        tenant: &Tenant,
        now: i64,
    ) -> std::result::Result<Arc<Cached<OpenSession>>, Refusal> {
        let gw = &self.gw;
        let value = session
            .req_header()
            .headers
            .get_all(header::COOKIE)
            .iter()
            .find_map(|c| find_cookie(c.as_bytes(), &gw.cookie_name))
            .ok_or(Refusal::SESSION_REQUIRED)?;
        let open = match gw.session_cache.get(value) {
            Some(c) => c,
            None => {
                let open = self.open_session(value, tenant, now).await?;
                gw.session_cache.insert(value, open)
            }
        };
        let d = &open.value.data;
        if d.expires_at <= now
            || d.tenant != tenant.id
            || gw
                .revocations
                .is_revoked(&d.tenant, &d.subject, d.jti.as_deref(), d.iat)
        {
            return Err(Refusal::SESSION_INVALID);
        }
        Ok(open)
    }

    /// Decrypts a cookie and prepares what forwarding needs (claims, identity headers).
    async fn open_session(
        &self,
        value: &[u8],
        tenant: &Tenant,
        now: i64,
    ) -> std::result::Result<OpenSession, Refusal> {
        let gw = &self.gw;
        let value = std::str::from_utf8(value).map_err(|_| Refusal::SESSION_INVALID)?;
        let (data, id) = gw
            .sealer
            .open(value, now)
            .map_err(|_| Refusal::SESSION_INVALID)?;
        if data.tenant != tenant.id {
            return Err(Refusal::SESSION_INVALID);
        }
        let claims = match (&data.claims, &data.claims_ref) {
            (Some(c), _) => Arc::new(c.clone()),
            (None, Some(r)) => match gw.claims_cache.get(r.as_bytes()).map(|c| c.value.clone()) {
                Some(c) => c,
                None => {
                    let json = gw
                        .store
                        .session_claims(r, now)
                        .await
                        .ok()
                        .flatten()
                        .ok_or(Refusal::SESSION_INVALID)?;
                    let c: Map<String, Value> =
                        serde_json::from_str(&json).map_err(|_| Refusal::SESSION_INVALID)?;
                    let c = Arc::new(c);
                    gw.claims_cache.insert(r.as_bytes(), c.clone());
                    c
                }
            },
            (None, None) => Arc::new(Map::new()),
        };
        let mut headers = Vec::with_capacity(tenant.headers.len() + 1);
        for (claim, name) in &tenant.headers {
            let value = if claim == "sub" {
                HeaderValue::from_bytes(data.subject.as_bytes()).ok()
            } else {
                claims.get(claim).and_then(claim_header_value)
            };
            if let Some(v) = value {
                headers.push((name.clone(), v));
            }
        }
        headers.push((HeaderName::from_static("x-linkgate-tenant"), hv(&tenant.id)));
        Ok(OpenSession {
            data,
            id,
            claims,
            headers,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn handle_link(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: &Arc<Tenant>,
        token: &str,
        path_form: bool,
        path: &str,
        query: Option<&str>,
    ) -> Result<bool> {
        let gw = &self.gw;
        let method = session.req_header().method.clone();
        let is_get = method == http::Method::GET || method == http::Method::HEAD;
        if !is_get && method != http::Method::POST {
            return refuse(session, Some(tenant), Refusal::METHOD_NOT_ALLOWED, ctx).await;
        }
        if method == http::Method::POST {
            self.drain_small_body(session).await;
        }
        let ua = session
            .req_header()
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let lctx = LinkContext {
            tenant: &tenant.id,
            client_ip: client_ip(session),
            user_agent: ua.as_deref(),
            now: now(),
        };
        let link = match link::validate(token, &tenant.keys, &lctx, &gw.revocations) {
            Ok(l) => l,
            Err(e) => {
                gw.metrics.link_validation(e.index());
                return refuse(session, Some(tenant), Refusal::link(e), ctx).await;
            }
        };
        // 10. One-time links: GET/HEAD look, only a redeeming request consumes. HEAD never
        // redeems, whatever the tenant's `confirm`: scanners send it, and it has no page to show.
        let needs_confirm = method == http::Method::HEAD
            || is_get
                && match tenant.confirm {
                    ConfirmMode::Always => true,
                    ConfirmMode::OneTime => link.one_time,
                    ConfirmMode::Never => false,
                };
        let events = if needs_confirm {
            Vec::new()
        } else {
            let data = serde_json::json!({
                "tenant": tenant.id,
                "subject": link.subject,
                "jti": link.jti,
                "host": ctx.host(),
                "client_ip": client_ip(session).map(|ip| ip.to_string()),
                "ctx": link.claims().get("ctx").cloned().unwrap_or(Value::Null),
            });
            crate::webhooks::events_for(&gw.config.load(), &tenant.id, "link.redeemed", data)
        };
        // A used link is refused before anything is made or stored; a fresh one is consumed
        // only once its session exists (a store failure there does not burn the link).
        let jti = link.jti.as_deref().unwrap_or_default();
        if link.one_time {
            let fresh = gw
                .store
                .is_redeemed(jti, &tenant.id)
                .await
                .map(|used| !used);
            if let Some(answer) = self.unless_fresh(session, tenant, ctx, fresh).await {
                return answer;
            }
        }
        let cookie = if needs_confirm {
            None
        } else {
            Some(self.create_session(tenant, &link).await?)
        };
        if link.one_time && cookie.is_some() {
            let fresh = gw
                .store
                .redeem_once(jti, &tenant.id, link.exp, &events)
                .await;
            if let Some(answer) = self.unless_fresh(session, tenant, ctx, fresh).await {
                return answer;
            }
        }
        gw.metrics.link_validation(0);
        // No session made: the request only looks (confirm page).
        let Some(cookie) = cookie else {
            ctx.outcome = Some(Outcome::ConfirmPage);
            let branding = tenant.branding.as_ref();
            let with_img = branding.is_some_and(|b| b.logo_url.is_some());
            let headers = [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                (
                    header::REFERRER_POLICY,
                    HeaderValue::from_static("no-referrer"),
                ),
                (
                    HeaderName::from_static("x-robots-tag"),
                    HeaderValue::from_static("noindex"),
                ),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(pages::csp(with_img)),
                ),
            ];
            send(session, 200, &headers, pages::confirm_page(branding)).await?;
            return Ok(true);
        };
        if !link.one_time && !events.is_empty() {
            if let Err(e) = gw.store.enqueue_webhooks(&events).await {
                tracing::error!(error = %e, "cannot queue link.redeemed webhooks");
            }
        }
        let location = match &link.redirect {
            Some(r) => r.clone(),
            None if path_form => "/".to_string(),
            None => {
                let path = same_site_path(path);
                match query_without_token(query) {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                }
            }
        };
        let ttl = tenant.session_ttl.as_secs();
        let set_cookie = format!(
            "{}={cookie}; Path=/; Max-Age={ttl}; Secure; HttpOnly; SameSite=Lax",
            gw.cookie_name
        );
        let headers = [
            (header::LOCATION, hv(&location)),
            (header::SET_COOKIE, hv(&set_cookie)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ];
        ctx.outcome = Some(Outcome::Redeemed);
        gw.metrics.sessions_created.inc();
        tracing::info!(tenant = %tenant.id, host = %ctx.host(), jti = link.jti.as_deref().unwrap_or("-"), "link redeemed");
        send(session, 303, &headers, Vec::new()).await?;
        Ok(true)
    }

    /// `None` while a one-time link is fresh (`fresh` from the store); otherwise the answer:
    /// `410 link_used`, or an error when the store could not tell.
    async fn unless_fresh(
        &self,
        session: &mut Session,
        tenant: &Tenant,
        ctx: &mut RequestCtx,
        fresh: std::result::Result<bool, crate::store::StoreError>,
    ) -> Option<Result<bool>> {
        match fresh {
            Ok(true) => None,
            Ok(false) => {
                self.gw.metrics.link_validation(LinkError::Used.index());
                Some(refuse(session, Some(tenant), Refusal::link(LinkError::Used), ctx).await)
            }
            Err(e) => {
                tracing::error!(error = %e, "store unavailable while redeeming a link");
                Some(Err(Error::explain(
                    ErrorType::InternalError,
                    "store unavailable",
                )))
            }
        }
    }

    /// Seals a session for `link`; claims that would overflow the cookie go to the store.
    async fn create_session(&self, tenant: &Tenant, link: &ValidLink) -> Result<String> {
        let gw = &self.gw;
        let mut claims = link.claims();
        for k in ["exp", "nbf", "iat"] {
            claims.remove(k);
        }
        let expires_at = now() + tenant.session_ttl.as_secs() as i64;
        let mut data = SessionData {
            tenant: tenant.id.clone(),
            subject: link.subject.clone(),
            jti: link.jti.clone(),
            iat: link.iat,
            expires_at,
            claims: Some(claims),
            claims_ref: None,
        };
        let sealed = gw.sealer.seal(&data);
        if sealed.len() <= MAX_COOKIE_VALUE {
            return Ok(sealed);
        }
        let claims = data.claims.take().unwrap_or_default();
        let id = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            rand::random::<[u8; 18]>(),
        );
        let json = serde_json::to_string(&claims)
            .map_err(|_| Error::explain(ErrorType::InternalError, "claims serialization"))?;
        gw.store
            .put_session_claims(&id, &tenant.id, &json, expires_at)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot store session claims");
                Error::explain(ErrorType::InternalError, "store unavailable")
            })?;
        gw.claims_cache.insert(id.as_bytes(), Arc::new(claims));
        data.claims_ref = Some(id);
        Ok(gw.sealer.seal(&data))
    }

    /// Reads a small request body so the connection can be reused; large ones close it.
    async fn drain_small_body(&self, session: &mut Session) {
        let len = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        match len {
            Some(n) if n <= MAX_DRAIN_BYTES => {
                if session.drain_request_body().await.is_err() {
                    session.set_keepalive(None);
                }
            }
            Some(_) | None if session.is_body_empty() => {}
            _ => session.set_keepalive(None),
        }
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            _in_flight: InFlight::new(&self.gw.in_flight),
            tenant: None,
            route: None,
            outcome: None,
        }
    }

    /// No downstream modules: pingora's default adds a response-compression module (disabled)
    /// whose per-request context is built, called and dropped on every request. linkgate
    /// forwards the upstream's encoding as it is.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.gw.draining.load(std::sync::atomic::Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        self.handle(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let tenant = ctx
            .tenant
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no tenant"))?;
        let addr = tenant
            .upstream
            .select()
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no healthy upstream"))?;
        // SNI only matters (and is only allocated) for a TLS upstream.
        let sni = if tenant.upstream_tls {
            ctx.host().to_string()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, tenant.upstream_tls, sni);
        peer.options.connection_timeout = Some(std::time::Duration::from_secs(5));
        Ok(Box::new(peer))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.esource() {
            pingora::ErrorSource::Downstream => 0,
            _ => 502,
        };
        if code == 0 {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        self.gw.metrics.upstream_errors.inc();
        tracing::warn!(tenant = ctx.tenant.as_ref().map(|t| t.id.as_str()).unwrap_or("-"), error = ?e.etype(), "upstream unavailable");
        let tenant = ctx.tenant.clone();
        let written = session.response_written().is_some();
        let ok = !written
            && refuse(
                session,
                tenant.as_deref(),
                Refusal::UPSTREAM_UNAVAILABLE,
                ctx,
            )
            .await
            .is_ok();
        ctx.outcome = Some(Outcome::Rejected);
        FailToProxy {
            error_code: 502,
            can_reuse_downstream: ok,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let m = &self.gw.metrics;
        m.request_duration
            .observe(ctx.start.elapsed().as_secs_f64());
        m.request(ctx.outcome.unwrap_or(Outcome::Rejected));
        tracing::debug!(
            method = %session.req_header().method,
            host = %ctx.host(),
            status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0),
            outcome = ?ctx.outcome,
            "request"
        );
    }

    /// Never includes the URI: it may carry a magic-link token.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        format!("{} host={}", session.req_header().method, ctx.host())
    }

    /// A client that goes away (closing a keep-alive connection, aborting a request) is not an
    /// error worth a log line per connection.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        matches!(error.esource(), pingora::ErrorSource::Downstream)
            && matches!(
                error.etype(),
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
            )
    }
}

#[cfg(test)]
mod tests;
