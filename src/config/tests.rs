//! Unit tests of configuration validation, hostile input included.

use super::validate::without_quoted_values;
use super::*;
use std::io::Write;

fn secret_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&vec![b'k'; len]).unwrap();
    f.write_all(b"\n").unwrap();
    p
}

#[test]
fn minimal_config_gets_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret_file(dir.path(), "s.key", 32);
    let text = format!(
            "[session]\nsecret_file = {s:?}\n[[tenants]]\nid = \"acme\"\nupstream = [\"127.0.0.1:8080\"]\n[[tenants.keys]]\nkid = \"k1\"\nalg = \"HS256\"\nsecret = \"{}\"\n",
            "x".repeat(32)
        );
    let c = Config::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(c.server.https_listen.port(), 443);
    assert_eq!(c.session.cookie_name, "__Host-linkgate");
    assert_eq!(c.session.ttl, Duration::from_secs(12 * 3600));
    assert_eq!(c.session.secret.0.len(), 32, "one trailing newline ignored");
    assert_eq!(
        c.store,
        StoreUrl::Sqlite(PathBuf::from("/var/lib/linkgate/linkgate.db"))
    );
    let t = &c.tenants[0];
    assert_eq!(t.confirm, ConfirmMode::OneTime);
    assert_eq!(t.headers.len(), 3);
}

#[test]
fn every_problem_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let short = secret_file(dir.path(), "short.key", 10);
    let text = format!(
        r#"
bogus = 1
[server]
https_listen = "nope"
threads = "many"
[session]
secret_file = {short:?}
[[tenants]]
id = "Bad_Id"
upstream = ["127.0.0.1:1"]
confirm = "sometimes"
  [[tenants.keys]]
  kid = "k1"
  alg = "HS256"
  secret = "{ok}"
  [[tenants.keys]]
  kid = "k2"
  alg = "HS256"
  secret_file = {short:?}
  [[tenants.keys]]
  kid = "k3"
  alg = "none"
  secret = "{ok}"
[[domains]]
hostname = "links.example.com"
tenant = "ghost"
"#,
        ok = "y".repeat(40)
    );
    let e = Config::parse(&text, Path::new("t.toml")).unwrap_err();
    let all = e.problems.join("\n");
    for needle in [
        "bogus: unknown key",
        "server.https_listen:",
        "server.threads: invalid type",
        "session.secret_file: must hold at least 32 bytes",
        "tenants[0].id:",
        "tenants[0].confirm:",
        "tenants[0].keys[1].secret_file: must hold at least 32 bytes",
        "tenants[0].keys[2].alg:",
        "domains[0].tenant: no tenant with id `ghost`",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(!all.contains(&"y".repeat(40)), "secret leaked into errors");
}

#[test]
fn unknown_nested_key_named() {
    let text = "[server]\nhttps_listn = \"1.2.3.4:1\"\n";
    let e = Config::parse(text, Path::new("t.toml")).unwrap_err();
    assert!(e
        .problems
        .iter()
        .any(|p| p == "server.https_listn: unknown key"));
}

#[test]
fn hostile_input_never_panics() {
    for text in [
        "",
        "[[[",
        "tenants = 5",
        "[[tenants]]\nid = 7",
        "[session]\nsecret = 1",
        "[[tenants]]\nkeys = \"x\"",
        "[admin]\ntokens = [{name = \"a\", token_sha256 = \"zz\"}]",
        &"a".repeat(100_000),
    ] {
        assert!(Config::parse(text, Path::new("t.toml")).is_err());
    }
}

#[test]
fn hostnames_checked() {
    assert_eq!(
        normalize_hostname("Links.Example.COM.").unwrap(),
        "links.example.com"
    );
    assert!(normalize_hostname("*.example.com").is_err());
    assert!(normalize_hostname("10.0.0.1").is_err());
    assert!(normalize_hostname("bad_name.example.com").is_err());
    assert!(normalize_hostname("-a.example.com").is_err());
}

#[test]
fn syntax_errors_never_quote_the_source() {
    // A bad escape inside a secret: the message names the place, not the text.
    let secret = "hunter2-very-secret-value-0123456789";
    let text = format!("[session]\nttl = \"1h\"\nsecret = \"{secret}\\q\"\n");
    let e = Config::parse(&text, Path::new("t.toml")).unwrap_err();
    assert_eq!(e.problems.len(), 1, "{:?}", e.problems);
    let p = &e.problems[0];
    assert!(!p.contains("hunter2"), "secret leaked: {p}");
    assert!(!p.contains('\n'), "not one line: {p}");
    assert!(p.starts_with("t.toml: "), "{p}");
    assert!(p.contains("line 3, column"), "no position: {p}");
    // Multi-byte text before the error: positions stay character-based and nothing panics.
    let text = "# é ü\nkey = \"ä\\q\"\n";
    let e = Config::parse(text, Path::new("t.toml")).unwrap_err();
    assert!(e.problems[0].contains("line 2"), "{:?}", e.problems);
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("abc", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
    assert_eq!(
        line_column("é\nx", 1),
        (1, 1),
        "inside a character: rounded down"
    );
    assert_eq!(line_column("é\nx", 2), (1, 2));
    assert_eq!(line_column("ab", 99), (1, 3), "past the end: clamped");
}

/// A valid base: session secret and tenant `acme` with one key; `extra` is appended.
fn with_base(extra: &str) -> String {
    format!(
        "[session]\nsecret = \"{s}\"\n[[tenants]]\nid = \"acme\"\nupstream = [\"127.0.0.1:1\"]\n\
         [[tenants.keys]]\nkid = \"k1\"\nalg = \"HS256\"\nsecret = \"{s}\"\n{extra}",
        s = "x".repeat(32)
    )
}

fn problems(text: &str) -> Vec<String> {
    Config::parse(text, Path::new("t.toml"))
        .err()
        .map(|e| e.problems)
        .unwrap_or_default()
}

#[test]
fn type_errors_are_named_by_their_key_path() {
    let p = problems("[server]\nthreads = \"many\"\n[session]\nsecret = 5\n");
    assert!(
        p.iter()
            .any(|l| l.starts_with("server.threads: invalid type: string, expected")),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|l| l == "session.secret: must be a string"),
        "{p:#?}"
    );
    assert!(!p.iter().any(|l| l.starts_with("server:")), "{p:#?}");
    // No follow-on problem for the replaced values (secret too short, say).
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn values_in_the_wrong_place_are_never_quoted() {
    // A secret pasted where a table belongs: the problem is named, the value is not printed.
    let secret = "hunter2-\\\"quoted\\\"-secret-0123456789abcdef";
    let text = format!(
        "[session]\nsecret = \"{s}\"\n[[tenants]]\nid = \"acme\"\nupstream = [\"127.0.0.1:1\"]\n\
         keys = [\"{secret}\"]\n",
        s = "x".repeat(32)
    );
    let p = problems(&text);
    assert!(!p.is_empty());
    assert!(
        p.iter()
            .any(|l| l.starts_with("tenants[0].keys[0]: invalid type: string, expected")),
        "{p:#?}"
    );
    assert!(
        !p.iter()
            .any(|l| l.contains("hunter2") || l.contains("secret-0123")),
        "{p:#?}"
    );
    assert_eq!(without_quoted_values(r#"a "x\"y" b "z""#), "a b");
    assert_eq!(without_quoted_values(r#"open "never closed"#), "open");
}

#[test]
fn every_unknown_key_of_a_table_is_reported() {
    let p = problems(&format!(
        "[server]\nbogus_one = 1\nthreads = 2\nbogus_two = \"x\"\n{}",
        with_base("")
    ));
    assert_eq!(
        p,
        [
            "server.bogus_one: unknown key",
            "server.bogus_two: unknown key"
        ],
        "{p:#?}"
    );
}

#[test]
fn a_problem_in_a_tenant_table_does_not_hide_its_other_problems() {
    let text = format!(
        "[session]\nsecret = \"{s}\"\n[[tenants]]\nid = \"acme\"\nupstream = [\"127.0.0.1:1\"]\n\
         bogus = 1\nconfirm = \"sometimes\"\nupstream_tls = \"yes\"\nheaders = {{ sub = 5 }}\n\
         branding = {{ color = \"red\", buttons = [{{ label = \"a\", url = \"/b\", x = 1 }}] }}\n\
         [[tenants.keys]]\nkid = \"k1\"\nalg = \"HS256\"\nsecret = \"short\"\n\
         [[domains]]\nhostname = \"links.acme.test\"\ntenant = \"acme\"\n",
        s = "x".repeat(32)
    );
    let p = problems(&text);
    let all = p.join("\n");
    for needle in [
        "tenants[0].bogus: unknown key",
        "tenants[0].upstream_tls: invalid type",
        "tenants[0].headers.sub: invalid type",
        "tenants[0].branding.buttons[0].x: unknown key",
        "tenants[0].confirm: `sometimes` is not one of",
        "tenants[0].branding.color: must be",
        "tenants[0].keys[0].secret: must hold at least 32 bytes",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(
        !all.contains("domains[0].tenant"),
        "false `no tenant` line:\n{all}"
    );
}

#[test]
fn every_missing_key_is_reported_once() {
    let p = problems(&with_base("[[domains]]\n[[tenants]]\nupstream = 5\n"));
    let all = p.join("\n");
    for needle in [
        "domains[0].hostname: required",
        "domains[0].tenant: required",
        "tenants[1].id: required",
        "tenants[1].upstream: invalid type",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    // Nothing about the placeholders put in their place.
    assert_eq!(p.len(), 5, "{all}");
    assert!(
        all.contains("tenants[1].keys: at least one key is required"),
        "{all}"
    );
}

#[test]
fn a_table_that_is_not_a_table_is_one_problem() {
    let p = problems(&format!("server = 5\n{}", with_base("")));
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("server: invalid type"), "{p:#?}");
}

#[test]
fn domain_problems_are_named_by_their_place_in_the_file() {
    // domains[0] is broken (no hostname); domains[1] could never be served (no certificate,
    // ACME off): its problem names domains[1], not the place it has among the good entries.
    let p = problems(&with_base(
        "[[domains]]\ntenant = \"acme\"\n[[domains]]\nhostname = \"links.acme.test\"\ntenant = \"acme\"\n",
    ));
    assert!(
        p.contains(&"domains[0].hostname: required".to_string()),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|l| l
            .starts_with("domains[1].hostname: `links.acme.test` has no [[certificates]] entry")),
        "{p:#?}"
    );
}
