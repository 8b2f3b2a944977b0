//! Unit tests of the proxy's request handling helpers, hostile input included.

use super::*;

#[test]
fn token_found_in_path_or_query() {
    assert_eq!(find_token("/login/abc", None), Some(("abc".into(), true)));
    assert_eq!(
        find_token("/x", Some("a=1&magic_link=tok&b=2")),
        Some(("tok".into(), false))
    );
    assert_eq!(
        find_token("/login/p", Some("magic_link=q")),
        Some(("p".into(), true))
    );
    assert_eq!(find_token("/login/", None), None);
    assert_eq!(find_token("/x", Some("a=1")), None);
    // The name spelled with percent-escapes is still the name (the upstream would decode it).
    for (q, rest) in [
        ("magic%5Flink=tok", None),
        ("m%61gic_link=tok", None),
        ("a=%20&magic%5flink=tok", Some("a=%20")),
    ] {
        assert_eq!(
            find_token("/x", Some(q)),
            Some(("tok".into(), false)),
            "{q}"
        );
        assert_eq!(query_without_token(Some(q)).as_deref(), rest, "{q}");
    }
    assert_eq!(find_token("/x", Some("magic%5Flinks=tok")), None);
}

#[test]
fn redirect_after_redemption_stays_on_the_site() {
    assert_eq!(same_site_path("/app/x"), "/app/x");
    assert_eq!(same_site_path("/"), "/");
    assert_eq!(same_site_path("//evil.example/"), "/evil.example/");
    assert_eq!(same_site_path("///evil.example"), "/evil.example");
    assert_eq!(same_site_path("/\\evil.example"), "/evil.example");
    assert_eq!(
        same_site_path("/\\/\\evil.example/a//b"),
        "/evil.example/a//b"
    );
}

#[test]
fn token_removed_from_query() {
    assert_eq!(
        query_without_token(Some("a=1&magic_link=t&b=%20")).as_deref(),
        Some("a=1&b=%20")
    );
    assert_eq!(query_without_token(Some("magic_link=t")), None);
    assert_eq!(query_without_token(Some("magic%5Flink=t")), None);
}

#[test]
fn ip_header_value_matches_display() {
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.0.100.9",
        "127.0.0.1",
        "192.168.10.99",
        "1.20.203.4",
        "::1",
        "2001:db8::8a2e:370:7334",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(ip_header_value(ip).unwrap(), ip.to_string().as_str());
    }
}

#[test]
fn request_host_is_lower_case_without_port() {
    let host = |authority: Option<&str>, host: Option<&[u8]>| {
        let mut req = RequestHeader::build("GET", b"/p", None).unwrap();
        if let Some(a) = authority {
            req.set_uri(format!("https://{a}/p").parse().unwrap());
        }
        if let Some(h) = host {
            req.insert_header("host", HeaderValue::from_bytes(h).unwrap())
                .unwrap();
        }
        let mut buf = [0u8; HOST_BUF];
        request_host(&req, &mut buf).map(|h| h.into_owned())
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        host(None, Some(b"links.acme.test")),
        some("links.acme.test")
    );
    assert_eq!(
        host(None, Some(b"Links.ACME.test:8443")),
        some("links.acme.test")
    );
    assert_eq!(
        host(None, Some(b"links.acme.test.")),
        some("links.acme.test")
    );
    assert_eq!(
        host(Some("LINKS.acme.test:443"), None),
        some("links.acme.test")
    );
    // `:authority` wins over `Host`.
    assert_eq!(host(Some("a.test"), Some(b"b.test")), some("a.test"));
    assert_eq!(host(None, None), None);
    assert_eq!(host(None, Some(b"")), None);
    assert_eq!(host(None, Some(b":443")), None);
    assert_eq!(host(None, Some(b"\xe9.test")), None);
    // Longer than the stack buffer: lower-cased all the same.
    let long = format!("{}.TEST", "A".repeat(300));
    assert_eq!(
        host(None, Some(long.as_bytes())),
        Some(long.to_ascii_lowercase())
    );
}

#[test]
fn identity_headers_and_session_cookie_stripped() {
    let t = Tenant::for_test(
        "acme",
        "127.0.0.1:1".parse().unwrap(),
        &[("email", "Remote-Email")],
    );
    let mut req = RequestHeader::build("GET", b"/", None).unwrap();
    for h in [
        "X-Linkgate-Subject",
        "x_linkgate_subject",
        "X-LINKGATE-EMAIL",
        "remote_email",
        "X-Forwarded-For",
        "x_forwarded_host",
        "Forwarded",
    ] {
        req.append_header(h.to_string(), "forged").unwrap();
    }
    req.append_header("x-linkgatex", "kept").unwrap();
    req.append_header("accept", "kept").unwrap();
    req.append_header("cookie", "a=1; __Host-linkgate=s; b=2")
        .unwrap();
    req.append_header("cookie", "__Host-linkgate=s").unwrap();
    req.append_header("cookie", "c=3").unwrap();
    // Lines that are not UTF-8 (obs-text): kept as they are, less the session cookie.
    let latin1 = HeaderValue::from_bytes(b"d=\xe9t\xe9").unwrap();
    req.append_header("cookie", latin1.clone()).unwrap();
    let latin1_session = HeaderValue::from_bytes(b"e=\xe9; __Host-linkgate=s").unwrap();
    req.append_header("cookie", latin1_session).unwrap();
    let uri: http::Uri = "/p?q=1".parse().unwrap();
    let parts = upstream_header(&req, uri, &t, "__Host-linkgate", 4);
    let mut left: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
    left.sort();
    assert_eq!(left, vec!["accept", "cookie", "x-linkgatex"]);
    let cookies: Vec<&[u8]> = parts
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(
        cookies,
        vec![
            &b"a=1; b=2"[..],
            &b"c=3"[..],
            latin1.as_bytes(),
            &b"e=\xe9"[..]
        ]
    );
    assert_eq!(parts.uri, "/p?q=1");
    assert_eq!(parts.method, http::Method::GET);
}

proptest::proptest! {
    /// A redemption's `Location` never leaves the site, whatever the path; the query never
    /// keeps a parameter named `magic_link`, however it is spelled.
    #[test]
    fn locations_stay_on_the_site(
        path in "[/\\\\a-z.%]{0,16}",
        query in proptest::collection::vec(
            proptest::sample::select(vec![
                "magic_link", "magic%5Flink", "m%61gic_link", "magic_lin", "=", "&", "x", "%",
                "%5", "%zz",
            ]),
            0..10,
        )
    ) {
        let query = query.concat();
        let path = format!("/{path}");
        let loc = same_site_path(&path);
        proptest::prop_assert!(loc.starts_with('/'));
        proptest::prop_assert!(!loc.starts_with("//") && !loc.starts_with("/\\"), "{loc}");
        if let Some(q) = query_without_token(Some(&query)) {
            proptest::prop_assert!(
                form_urlencoded::parse(q.as_bytes()).all(|(k, _)| k != "magic_link"),
                "{query} -> {q}"
            );
        }
        let _ = find_token(&loc, Some(&query));
    }
}
