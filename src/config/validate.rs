//! Validation of a parsed TOML table into a [`Config`]: every problem reported at once, each
//! named by its key path as written in the file.

use std::collections::HashSet;

use serde::de::DeserializeOwned;

use super::*;

#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<String>,
    /// Paths whose value was missing or bad and was replaced by a placeholder to check the
    /// rest of its table: problems under them are consequences, not reported again.
    masked: Vec<String>,
}

/// Values tried in turn in place of a missing or bad one, until its table deserializes.
fn placeholders() -> [toml::Value; 5] {
    [
        toml::Value::String(String::new()),
        toml::Value::Array(Vec::new()),
        toml::Value::Table(toml::Table::new()),
        toml::Value::Integer(0),
        toml::Value::Boolean(false),
    ]
}

/// `msg` with every double-quoted value taken out (`invalid type: string "…", expected …`
/// becomes `invalid type: string, expected …`): the value may be a secret in the wrong place.
pub(super) fn without_quoted_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // Skip to the closing quote (serde escapes quotes inside as `\"`).
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        let kept = out.trim_end_matches(' ').len();
        out.truncate(kept);
    }
    out
}

/// The text between `prefix` and the next backtick of `msg`, when `msg` starts with `prefix`.
fn quoted_after<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    msg.strip_prefix(prefix)?.split_once('`').map(|(k, _)| k)
}

/// The value at `segments` under `v`.
fn value_at<'a>(
    mut v: &'a mut toml::Value,
    segments: &[serde_path_to_error::Segment],
) -> Option<&'a mut toml::Value> {
    use serde_path_to_error::Segment;
    for s in segments {
        v = match (s, v) {
            (Segment::Map { key }, toml::Value::Table(t)) => t.get_mut(key)?,
            (Segment::Seq { index }, toml::Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(v)
}

/// `path` followed by `segments` as written in the file: `tenants[0].headers.sub`.
fn join_path(path: &str, segments: &[serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut out = path.to_string();
    for s in segments {
        match s {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out.push('.');
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

impl Validator {
    fn err(&mut self, path: impl std::fmt::Display, msg: impl std::fmt::Display) {
        let path = path.to_string();
        if !self.is_masked(&path) {
            self.problems.push(format!("{path}: {msg}"));
        }
    }

    /// True when `path` is a masked path or under one.
    fn is_masked(&self, path: &str) -> bool {
        self.masked.iter().any(|m| {
            path.strip_prefix(m.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }

    /// Deserializes one table, reporting every unknown key, missing key and bad value by its
    /// path. Unknown keys are dropped and missing or bad values replaced by placeholders
    /// (masked) until the table deserializes, so the caller can go on checking the rest of it;
    /// `None` only when the value cannot be made to fit at all (not a table, say).
    fn section<T: DeserializeOwned>(&mut self, mut value: toml::Value, path: &str) -> Option<T> {
        use std::collections::HashMap;
        // Placeholders tried per path; every round fixes one key, so this bounds the work.
        let mut tried: HashMap<String, usize> = HashMap::new();
        for _ in 0..1000 {
            let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let mut segments: Vec<_> = e.path().iter().cloned().collect();
            let msg = one_line(e.inner().message());
            if let Some(key) = quoted_after(&msg, "unknown field `") {
                if matches!(segments.last(), Some(serde_path_to_error::Segment::Map { key: k }) if k == key)
                {
                    segments.pop();
                }
                let at = join_path(path, &segments);
                let removed = match value_at(&mut value, &segments) {
                    Some(toml::Value::Table(t)) => t.remove(key).is_some(),
                    _ => false,
                };
                self.err(format!("{at}.{key}"), "unknown key");
                if !removed {
                    return None;
                }
                continue;
            }
            let missing = quoted_after(&msg, "missing field `").map(str::to_string);
            let at = match &missing {
                Some(key) => format!("{}.{key}", join_path(path, &segments)),
                None => join_path(path, &segments),
            };
            let n = tried.entry(at.clone()).or_insert(0);
            if *n == 0 {
                let why = match &missing {
                    Some(_) => "required".to_string(),
                    // A secret's value is never quoted, even a mistyped one.
                    None if at
                        .rsplit('.')
                        .next()
                        .is_some_and(|k| k.starts_with("secret")) =>
                    {
                        "must be a string".to_string()
                    }
                    // Nor any other value: a secret may sit where a table was expected.
                    None => without_quoted_values(&msg),
                };
                self.err(&at, why);
                self.masked.push(at.clone());
            }
            let placeholder = placeholders().into_iter().nth(*n)?;
            *n += 1;
            let slot = match &missing {
                Some(key) => match value_at(&mut value, &segments) {
                    Some(toml::Value::Table(t)) => {
                        t.entry(key.clone()).or_insert(placeholder.clone())
                    }
                    _ => return None,
                },
                None if segments.is_empty() => return None,
                None => value_at(&mut value, &segments)?,
            };
            *slot = placeholder;
        }
        None
    }

    fn duration(&mut self, v: Option<String>, default: &str, path: &str) -> Duration {
        let s = v.unwrap_or_else(|| default.to_string());
        match parse_duration(&s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(path, "must be longer than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.err(path, e);
                Duration::from_secs(1)
            }
        }
    }

    fn addr(&mut self, v: Option<String>, default: &str, path: &str) -> SocketAddr {
        let s = v.unwrap_or_else(|| default.to_string());
        match s.parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(path, format!("`{s}` is not an IP:port address"));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// Resolves one of `secret` / `secret_file` / `secret_env`.
    fn secret(
        &mut self,
        path: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        env: Option<String>,
        min_len: usize,
    ) -> Option<Secret> {
        let given = inline.is_some() as u8 + file.is_some() as u8 + env.is_some() as u8;
        if given == 0 {
            self.err(
                format!("{path}.secret_file"),
                "required (or `secret`, or `secret_env`)",
            );
            return None;
        }
        if given > 1 {
            self.err(
                path,
                "give only one of `secret`, `secret_file`, `secret_env`",
            );
            return None;
        }
        let (key, bytes) = if let Some(s) = inline {
            ("secret", s.into_bytes())
        } else if let Some(f) = file {
            match read_limited(&f, MAX_SECRET_BYTES) {
                Ok(mut b) => {
                    if b.last() == Some(&b'\n') {
                        b.pop();
                    }
                    ("secret_file", b)
                }
                Err(e) => {
                    self.err(
                        format!("{path}.secret_file"),
                        format!("cannot read {}: {e}", f.display()),
                    );
                    return None;
                }
            }
        } else {
            let name = env.unwrap_or_default();
            match std::env::var_os(&name) {
                Some(v) => ("secret_env", v.into_encoded_bytes()),
                None => {
                    self.err(
                        format!("{path}.secret_env"),
                        format!("environment variable `{name}` is not set"),
                    );
                    return None;
                }
            }
        };
        if bytes.len() < min_len {
            self.err(
                format!("{path}.{key}"),
                format!("must hold at least {min_len} bytes"),
            );
            return None;
        }
        Some(Secret(bytes))
    }

    pub(super) fn config(&mut self, mut root: toml::Table, path: &Path) -> Option<Config> {
        const SECTIONS: [&str; 10] = [
            "server",
            "store",
            "admin",
            "session",
            "acme",
            "dns",
            "webhooks",
            "certificates",
            "tenants",
            "domains",
        ];
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                self.problems.push(format!("{key}: unknown key"));
            }
        }
        let mut take = |k: &str| root.remove(k);

        let server: raw::Server = take("server")
            .and_then(|v| self.section(v, "server"))
            .unwrap_or_default();
        let store: raw::Store = take("store")
            .and_then(|v| self.section(v, "store"))
            .unwrap_or_default();
        let admin: raw::Admin = take("admin")
            .and_then(|v| self.section(v, "admin"))
            .unwrap_or_default();
        let session_raw = take("session");
        let acme: raw::Acme = take("acme")
            .and_then(|v| self.section(v, "acme"))
            .unwrap_or_default();
        let dns: raw::Dns = take("dns")
            .and_then(|v| self.section(v, "dns"))
            .unwrap_or_default();
        let webhooks: raw::Webhooks = take("webhooks")
            .and_then(|v| self.section(v, "webhooks"))
            .unwrap_or_default();
        let certificates = self.array(take("certificates"), "certificates");
        let tenants = self.array(take("tenants"), "tenants");
        let domains = self.array(take("domains"), "domains");

        // [server]
        let server = ServerConfig {
            https_listen: self.addr(server.https_listen, "0.0.0.0:443", "server.https_listen"),
            http_listen: self.addr(server.http_listen, "0.0.0.0:80", "server.http_listen"),
            admin_listen: self.addr(server.admin_listen, "127.0.0.1:9090", "server.admin_listen"),
            threads: server.threads.unwrap_or(0),
            state_dir: server
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/linkgate")),
        };
        if server.threads > 1024 {
            self.err("server.threads", "must be at most 1024");
        }

        // [store]
        let url = store
            .url
            .unwrap_or_else(|| "sqlite://linkgate.db".to_string());
        let store = if let Some(p) = url.strip_prefix("sqlite://") {
            if p.is_empty() {
                self.err("store.url", "sqlite:// needs a file path");
            }
            Some(StoreUrl::Sqlite(server.state_dir.join(p)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            self.err(
                "store.url",
                "PostgreSQL is not supported by this build yet; use sqlite://",
            );
            None
        } else {
            self.err(
                "store.url",
                "must start with sqlite:// (or postgres:// once supported)",
            );
            None
        };

        // [admin]
        let mut admin_tokens = Vec::new();
        let mut token_names = HashSet::new();
        for (i, t) in admin.tokens.into_iter().enumerate() {
            let p = format!("admin.tokens[{i}]");
            let Some(t) = self.section::<raw::AdminToken>(t, &p) else {
                continue;
            };
            if !token_names.insert(t.name.clone()) {
                self.err(format!("{p}.name"), "duplicate token name");
            }
            match decode_hex32(&t.token_sha256) {
                Some(h) => admin_tokens.push(AdminToken {
                    name: t.name,
                    sha256: h,
                }),
                None => self.err(
                    format!("{p}.token_sha256"),
                    "must be 64 hex digits (sha256 of the token)",
                ),
            }
        }

        // [session]
        let session = match session_raw {
            None => {
                self.err("session.secret_file", "required");
                None
            }
            Some(v) => self
                .section::<raw::Session>(v, "session")
                .and_then(|s| self.session(s)),
        };

        // [acme] / [dns]
        if let Some(c) = acme.challenge.as_deref().filter(|c| *c != "http-01") {
            self.err(
                "acme.challenge",
                format!("`{c}` is not supported; use http-01"),
            );
        }
        let acme = AcmeConfig {
            enabled: acme.enabled.unwrap_or(false),
            directory: acme
                .directory
                .unwrap_or_else(|| "https://acme-v02.api.letsencrypt.org/directory".to_string()),
            contact: acme.contact.unwrap_or_default(),
            ca_file: acme.ca_file.filter(|p| !p.as_os_str().is_empty()),
            renew_before: self.duration(acme.renew_before, "30d", "acme.renew_before"),
            orders_per_minute: acme.orders_per_minute.unwrap_or(10),
        };
        if acme.orders_per_minute == 0 || acme.orders_per_minute > 10_000 {
            self.err("acme.orders_per_minute", "must be between 1 and 10000");
        }
        if acme.enabled {
            if !(acme.directory.starts_with("https://") || acme.directory.starts_with("http://")) {
                self.err("acme.directory", "must be an http(s) URL");
            }
            if let Some(f) = &acme.ca_file {
                if let Err(e) = read_limited(f, MAX_SECRET_BYTES) {
                    self.err("acme.ca_file", format!("cannot read {}: {e}", f.display()));
                }
            }
        }
        let mut nameservers = Vec::new();
        for (i, ns) in dns.nameservers.unwrap_or_default().iter().enumerate() {
            let parsed = ns.parse::<SocketAddr>().or_else(|_| {
                ns.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Ok(a) => nameservers.push(a),
                Err(_) => self.err(
                    format!("dns.nameservers[{i}]"),
                    format!("`{ns}` is not an IP or IP:port"),
                ),
            }
        }
        let dns = DnsConfig {
            nameservers,
            edge_target: dns.edge_target.unwrap_or_default().to_ascii_lowercase(),
            verify_zone: dns.verify_zone.unwrap_or_default().to_ascii_lowercase(),
            check_interval: self.duration(dns.check_interval, "30s", "dns.check_interval"),
        };
        if acme.enabled {
            if dns.edge_target.is_empty() {
                self.err("dns.edge_target", "required when acme.enabled");
            }
            if dns.verify_zone.is_empty() {
                self.err("dns.verify_zone", "required when acme.enabled");
            }
            for (key, v) in [
                ("dns.edge_target", &dns.edge_target),
                ("dns.verify_zone", &dns.verify_zone),
            ] {
                if !v.is_empty() && normalize_hostname(v).is_err() {
                    self.err(key, format!("`{v}` is not a valid DNS name"));
                }
            }
        }
        let webhooks = WebhooksConfig {
            allow_private_targets: webhooks.allow_private_targets.unwrap_or(false),
            timeout: self.duration(webhooks.timeout, "10s", "webhooks.timeout"),
        };

        // [[certificates]]
        let mut certs = Vec::new();
        for (i, c) in certificates.into_iter().enumerate() {
            let p = format!("certificates[{i}]");
            if let Some(c) = self.section::<raw::Certificate>(c, &p) {
                if let Some(c) = self.certificate(c, &p) {
                    certs.push(c);
                }
            }
        }

        // [[tenants]]
        let default_ttl = session
            .as_ref()
            .map(|s| s.ttl)
            .unwrap_or(Duration::from_secs(12 * 3600));
        let mut tenant_cfgs = Vec::new();
        let mut ids = HashSet::new();
        for (i, t) in tenants.into_iter().enumerate() {
            let p = format!("tenants[{i}]");
            // The id is recorded before the table is checked: a problem elsewhere in it must
            // not make its domains look like they name no tenant.
            if let Some(id) = t.get("id").and_then(toml::Value::as_str) {
                if !ids.insert(id.to_string()) {
                    self.err(format!("{p}.id"), format!("duplicate tenant id `{id}`"));
                }
            }
            if let Some(t) = self.section::<raw::Tenant>(t, &p) {
                if let Some(t) = self.tenant(t, &p, default_ttl) {
                    tenant_cfgs.push(t);
                }
            }
        }

        // [[domains]]
        let mut domain_cfgs = Vec::new();
        let mut hosts = HashSet::new();
        for (i, d) in domains.into_iter().enumerate() {
            let p = format!("domains[{i}]");
            let Some(d) = self.section::<raw::Domain>(d, &p) else {
                continue;
            };
            let hostname = match normalize_hostname(&d.hostname) {
                Ok(h) => h,
                Err(e) => {
                    self.err(format!("{p}.hostname"), e);
                    continue;
                }
            };
            if !hosts.insert(hostname.clone()) {
                self.err(
                    format!("{p}.hostname"),
                    format!("`{hostname}` is listed twice"),
                );
            }
            if !ids.contains(&d.tenant) {
                self.err(
                    format!("{p}.tenant"),
                    format!("no tenant with id `{}`", d.tenant),
                );
            }
            let covered = certs
                .iter()
                .any(|c| c.hostnames.iter().any(|h| h == &hostname));
            if !covered && !acme.enabled {
                self.err(
                    format!("{p}.hostname"),
                    format!(
                        "`{hostname}` has no [[certificates]] entry and acme.enabled is false: it could never be served"
                    ),
                );
            }
            domain_cfgs.push(DomainConfig {
                hostname,
                tenant: d.tenant,
            });
        }

        Some(Config {
            path: path.to_path_buf(),
            server,
            store: store?,
            admin_tokens,
            session: session?,
            acme,
            dns,
            webhooks,
            certificates: certs,
            tenants: tenant_cfgs,
            domains: domain_cfgs,
        })
    }

    fn array(&mut self, v: Option<toml::Value>, path: &str) -> Vec<toml::Value> {
        match v {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a,
            Some(_) => {
                self.err(path, "must be an array of tables ([[...]])");
                Vec::new()
            }
        }
    }

    fn session(&mut self, s: raw::Session) -> Option<SessionConfig> {
        let cookie_name = s
            .cookie_name
            .unwrap_or_else(|| "__Host-linkgate".to_string());
        if cookie_name.is_empty()
            || cookie_name.len() > 64
            || !cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            self.err(
                "session.cookie_name",
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            );
        }
        let ttl = self.duration(s.ttl, "12h", "session.ttl");
        let secret = self.secret(
            "session",
            s.secret,
            s.secret_file,
            s.secret_env,
            MIN_SECRET_BYTES,
        )?;
        Some(SessionConfig {
            cookie_name,
            ttl,
            secret,
        })
    }

    fn certificate(&mut self, c: raw::Certificate, p: &str) -> Option<CertificateConfig> {
        let mut hostnames = Vec::new();
        if c.hostnames.is_empty() {
            self.err(format!("{p}.hostnames"), "must list at least one hostname");
        }
        for (j, h) in c.hostnames.iter().enumerate() {
            match normalize_hostname(h) {
                Ok(h) => hostnames.push(h),
                Err(e) => self.err(format!("{p}.hostnames[{j}]"), e),
            }
        }
        let cert_pem = match read_limited(&c.cert_file, MAX_SECRET_BYTES) {
            Ok(b) => b,
            Err(e) => {
                self.err(
                    format!("{p}.cert_file"),
                    format!("cannot read {}: {e}", c.cert_file.display()),
                );
                return None;
            }
        };
        let key_pem = match read_limited(&c.key_file, MAX_SECRET_BYTES) {
            Ok(b) => b,
            Err(e) => {
                self.err(
                    format!("{p}.key_file"),
                    format!("cannot read {}: {e}", c.key_file.display()),
                );
                return None;
            }
        };
        if let Err(e) = crate::tls::certified_key_from_pem(&cert_pem, &key_pem) {
            self.err(p, e);
            return None;
        }
        Some(CertificateConfig {
            hostnames,
            cert_file: c.cert_file,
            key_file: c.key_file,
            cert_pem,
            key_pem: Secret(key_pem),
        })
    }

    fn tenant(&mut self, t: raw::Tenant, p: &str, default_ttl: Duration) -> Option<TenantConfig> {
        let before = self.problems.len();
        if !valid_tenant_id(&t.id) {
            self.err(format!("{p}.id"), "must match [a-z0-9-]{1,63}");
        }
        if t.upstream.is_empty() {
            self.err(format!("{p}.upstream"), "must list at least one address");
        }
        let mut upstream = Vec::new();
        for (j, u) in t.upstream.iter().enumerate() {
            match u.parse::<SocketAddr>() {
                Ok(a) => upstream.push(a),
                Err(_) => self.err(
                    format!("{p}.upstream[{j}]"),
                    format!("`{u}` is not an IP:port address"),
                ),
            }
        }
        let public_paths = t.public_paths.unwrap_or_default();
        for (j, pp) in public_paths.iter().enumerate() {
            if !pp.starts_with('/') || pp.contains(['?', '#']) {
                self.err(
                    format!("{p}.public_paths[{j}]"),
                    "must be a path starting with / (no query)",
                );
            }
        }
        let login_url = t.login_url.filter(|s| !s.is_empty());
        if let Some(u) = &login_url {
            let ok = (u.starts_with("https://") || u.starts_with("http://") || u.starts_with('/'))
                && !u.bytes().any(|b| b.is_ascii_control() || b == b' ');
            if !ok {
                self.err(
                    format!("{p}.login_url"),
                    "must be an absolute http(s) URL or a path starting with /",
                );
            }
        }
        let confirm = match t.confirm.as_deref().unwrap_or("one_time") {
            "one_time" => ConfirmMode::OneTime,
            "always" => ConfirmMode::Always,
            "never" => ConfirmMode::Never,
            other => {
                self.err(
                    format!("{p}.confirm"),
                    format!("`{other}` is not one of one_time, always, never"),
                );
                ConfirmMode::OneTime
            }
        };
        let session_ttl = match t.session_ttl.filter(|s| !s.is_empty()) {
            Some(s) => self.duration(Some(s), "", &format!("{p}.session_ttl")),
            None => default_ttl,
        };
        let headers_map = t.headers.unwrap_or_else(|| {
            [
                ("sub", "X-Linkgate-Subject"),
                ("email", "X-Linkgate-Email"),
                ("name", "X-Linkgate-Name"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
        });
        let mut headers = Vec::new();
        for (claim, header) in headers_map {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                self.err(
                    format!("{p}.headers.{claim}"),
                    format!("`{header}` is not a valid header name"),
                );
            } else if is_reserved_header(&header) {
                self.err(
                    format!("{p}.headers.{claim}"),
                    format!("`{header}` is a hop-by-hop or gateway-owned header"),
                );
            } else {
                headers.push((claim, header));
            }
        }
        if t.keys.is_empty() {
            self.err(format!("{p}.keys"), "at least one key is required");
        }
        let mut keys = Vec::new();
        let mut kids = HashSet::new();
        for (j, k) in t.keys.into_iter().enumerate() {
            let kp = format!("{p}.keys[{j}]");
            let Some(k) = self.section::<raw::Key>(k, &kp) else {
                continue;
            };
            if k.kid.is_empty() || k.kid.len() > 128 {
                self.err(format!("{kp}.kid"), "must be 1-128 characters");
            }
            if !kids.insert(k.kid.clone()) {
                self.err(format!("{kp}.kid"), format!("duplicate kid `{}`", k.kid));
            }
            let Some(alg) = KeyAlg::parse(&k.alg) else {
                self.err(
                    format!("{kp}.alg"),
                    format!(
                        "`{}` is not one of HS256, HS384, HS512, RS256, ES256, EdDSA",
                        k.alg
                    ),
                );
                continue;
            };
            let material = if alg.is_hmac() {
                if k.public_key_file.is_some() {
                    self.err(
                        format!("{kp}.public_key_file"),
                        format!("{} keys take a secret, not a public key", alg.as_str()),
                    );
                    continue;
                }
                match self.secret(&kp, k.secret, k.secret_file, k.secret_env, MIN_SECRET_BYTES) {
                    Some(s) => KeyMaterial::Secret(s),
                    None => continue,
                }
            } else {
                if k.secret.is_some() || k.secret_file.is_some() || k.secret_env.is_some() {
                    self.err(
                        &kp,
                        format!("{} keys take public_key_file, not a secret", alg.as_str()),
                    );
                    continue;
                }
                let Some(f) = k.public_key_file else {
                    self.err(format!("{kp}.public_key_file"), "required for this alg");
                    continue;
                };
                match read_limited(&f, MAX_SECRET_BYTES) {
                    Ok(pem) => {
                        if let Err(e) =
                            crate::link::decoding_key(alg, &KeyMaterial::PublicPem(pem.clone()))
                        {
                            self.err(format!("{kp}.public_key_file"), e);
                            continue;
                        }
                        KeyMaterial::PublicPem(pem)
                    }
                    Err(e) => {
                        self.err(
                            format!("{kp}.public_key_file"),
                            format!("cannot read {}: {e}", f.display()),
                        );
                        continue;
                    }
                }
            };
            keys.push(KeyConfig {
                kid: k.kid,
                alg,
                material,
            });
        }
        let branding = t
            .branding
            .and_then(|b| self.section::<raw::Branding>(b, &format!("{p}.branding")))
            .map(|b| {
                if let Some(c) = &b.color {
                    if !valid_css_color(c) {
                        self.err(
                            format!("{p}.branding.color"),
                            "must be a #rgb or #rrggbb colour",
                        );
                    }
                }
                if let Some(u) = &b.logo_url {
                    if !u.starts_with("https://") {
                        self.err(format!("{p}.branding.logo_url"), "must be an https:// URL");
                    }
                }
                for (j, btn) in b.buttons.iter().enumerate() {
                    let u = &btn.url;
                    if !(u.starts_with("https://")
                        || u.starts_with("mailto:")
                        || u.starts_with('/'))
                    {
                        self.err(
                            format!("{p}.branding.buttons[{j}].url"),
                            "must be https://, mailto: or a path",
                        );
                    }
                }
                Branding {
                    title: b.title,
                    description: b.description,
                    logo_url: b.logo_url,
                    color: b.color,
                    font: b.font,
                    buttons: b.buttons.into_iter().map(|b| (b.label, b.url)).collect(),
                }
            });
        let mut webhooks = Vec::new();
        for (j, w) in t.webhooks.into_iter().enumerate() {
            let wp = format!("{p}.webhooks[{j}]");
            let Some(w) = self.section::<raw::Webhook>(w, &wp) else {
                continue;
            };
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                self.err(format!("{wp}.url"), "must be an http(s) URL");
            }
            for (k, e) in w.events.iter().enumerate() {
                if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                    self.err(
                        format!("{wp}.events[{k}]"),
                        format!("unknown event `{e}`; known: {}", WEBHOOK_EVENTS.join(", ")),
                    );
                }
            }
            if let Some(secret) = self.secret(&wp, w.secret, w.secret_file, w.secret_env, 16) {
                webhooks.push(WebhookConfig {
                    url: w.url,
                    secret,
                    events: w.events,
                });
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Some(TenantConfig {
            id: t.id,
            upstream,
            upstream_tls: t.upstream_tls.unwrap_or(false),
            public_paths,
            login_url,
            confirm,
            session_ttl,
            headers,
            keys,
            branding,
            webhooks,
        })
    }
}

/// Headers a tenant may not map claims onto.
fn is_reserved_header(h: &str) -> bool {
    const RESERVED: [&str; 12] = [
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    let l = h.to_ascii_lowercase();
    RESERVED.contains(&l.as_str()) || l == "x-linkgate-tenant" || l == "x-linkgate-assertion"
}

fn valid_css_color(c: &str) -> bool {
    let Some(hex) = c.strip_prefix('#') else {
        return false;
    };
    (hex.len() == 3 || hex.len() == 6) && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// True for ids matching `[a-z0-9-]{1,63}`.
pub fn valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Lower-cases and checks a DNS hostname: letters, digits and hyphens in dot-separated labels,
/// at least two labels, no wildcard, no IP literal, no trailing dot kept.
pub fn normalize_hostname(h: &str) -> Result<String, String> {
    let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
    if h.is_empty() || h.len() > 253 {
        return Err("must be a hostname of 1-253 characters".into());
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("`{h}` is an IP address, not a hostname"));
    }
    if h.contains('*') {
        return Err(format!("`{h}`: wildcards are not supported"));
    }
    let labels: Vec<&str> = h.split('.').collect();
    if labels.len() < 2 && h != "localhost" {
        return Err(format!("`{h}` needs at least two labels"));
    }
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!("`{h}` is not a valid hostname"));
        }
    }
    Ok(h)
}
