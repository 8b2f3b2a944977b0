//! Unit tests of configuration validation, hostile input included.

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
        "server:",
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
