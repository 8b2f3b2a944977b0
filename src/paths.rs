//! Request paths: normalisation before any matching (RFC 3986: unreserved characters
//! percent-decoded, `.` and `..` segments removed) and the prefix rule of `public_paths` and
//! `paths`.

use std::borrow::Cow;

/// A path that climbs above `/` or is not a path at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request path is not valid")]
pub struct BadPath;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A byte a path may not hold unencoded.
fn is_forbidden(b: u8) -> bool {
    b.is_ascii_control() || b == b' ' || b == b'#' || b == b'?'
}

/// Normalises `raw` (the path part of a request target, without query).
///
/// Fast path: a path with no `%` and no dot segment is already normal and is returned
/// borrowed.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    if !raw.starts_with('/') {
        return if raw.is_empty() {
            Ok(Cow::Borrowed("/"))
        } else {
            Err(BadPath)
        };
    }
    if !raw.contains("/.") && !raw.bytes().any(|b| b == b'%' || is_forbidden(b)) {
        return Ok(Cow::Borrowed(raw));
    }
    // 1. Decode percent-encoded unreserved characters; keep the rest encoded (upper-case hex).
    // Built as bytes: a raw UTF-8 character passes through whole, and decoding adds only ASCII.
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(BadPath);
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                decoded.push(v);
            } else {
                decoded.push(b'%');
                decoded.push(bytes[i + 1].to_ascii_uppercase());
                decoded.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
        } else {
            if is_forbidden(b) {
                return Err(BadPath);
            }
            decoded.push(b);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| BadPath)?;
    if !decoded.contains("/.") {
        return Ok(Cow::Owned(decoded));
    }
    // 2. Remove dot segments; climbing above the root is refused.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (idx, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = idx == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(BadPath);
                }
                trailing_slash = idx == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing_slash || path.is_empty() {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

/// The prefix rule: a prefix ending in `/` matches everything under it; any other matches
/// itself and everything under `prefix/` (`/app` matches `/app`, `/app/x`, not `/apple`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_decoding() {
        let cases = [
            ("/", "/"),
            ("", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%7Euser/%61pp", "/~user/app"),
            ("/a/%2e%2E/b", "/b"),
            ("/a%2fb", "/a%2Fb"),
            ("/a/%2E/b", "/a/b"),
            ("/..a/b", "/..a/b"),
            // Raw UTF-8 passes whole, on the fast path and the decoding one alike.
            ("/café/x", "/café/x"),
            ("/café/%7E", "/café/~"),
            ("/ü/./ß", "/ü/ß"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).unwrap(), want, "{raw}");
        }
        for bad in [
            "/..",
            "/a/../..",
            "/%2e%2e/x",
            "/%zz",
            "/%4",
            "x",
            "/a b",
            "/a\nb",
        ] {
            assert_eq!(normalize(bad), Err(BadPath), "{bad:?}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(prefix_matches("/app", "/app"));
        assert!(prefix_matches("/app", "/app/x"));
        assert!(!prefix_matches("/app", "/apple"));
        assert!(prefix_matches("/static/", "/static/a.css"));
        assert!(!prefix_matches("/static/", "/static"));
        assert!(prefix_matches("/", "/anything"));
    }

    proptest::proptest! {
        /// Any path: no panic; a normalised path starts with `/`, holds no dot segment, and
        /// normalises to itself.
        #[test]
        fn normalize_is_total_and_idempotent(raw in "(/|[a-z]|\\.|%[0-9a-fA-F]{0,2}|%2[eE]|é| |\\?){0,24}") {
            if let Ok(p) = normalize(&raw) {
                proptest::prop_assert!(p.starts_with('/'));
                for seg in p.split('/') {
                    proptest::prop_assert!(seg != "." && seg != "..", "{raw:?} -> {p:?}");
                }
                proptest::prop_assert_eq!(normalize(&p).unwrap(), p.clone());
            }
        }
    }
}
