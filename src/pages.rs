//! What the gateway answers itself: JSON errors, small HTML pages (confirm, error) with a
//! strict Content-Security-Policy, tenant-branded when configured. Every value is escaped;
//! no page ever shows a token or a claim.

use crate::config::Branding;

/// CSP of every HTML page; images only when branding shows a logo.
pub fn csp(with_images: bool) -> &'static str {
    if with_images {
        "default-src 'none'; style-src 'unsafe-inline'; img-src https:; form-action 'self'; frame-ancestors 'none'"
    } else {
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    }
}

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The JSON error body `{"error","message"}`.
pub fn json_error(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": code, "message": message}))
        .expect("static JSON serializes")
}

fn page(branding: Option<&Branding>, heading: &str, body_html: &str) -> Vec<u8> {
    let b = branding.cloned().unwrap_or_default();
    let color = b.color.as_deref().unwrap_or("#1f2937");
    let font = b
        .font
        .as_deref()
        .unwrap_or("system-ui, -apple-system, 'Segoe UI', sans-serif");
    let title = b.title.as_deref().unwrap_or("Sign in");
    let mut html = String::with_capacity(2048);
    html.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    html.push_str("<meta name=\"robots\" content=\"noindex\">");
    html.push_str(&format!(
        "<title>{} – {}</title>",
        escape(heading),
        escape(title)
    ));
    html.push_str(&format!(
        "<style>body{{font-family:{font};background:#f9fafb;color:#111827;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}}\
main{{background:#fff;max-width:28rem;width:100%;padding:2rem;border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.12)}}\
h1{{font-size:1.4rem;margin:.5rem 0 1rem}}p{{line-height:1.5}}\
button{{background:{color};color:#fff;border:0;border-radius:8px;padding:.75rem 1.5rem;font-size:1rem;cursor:pointer}}\
button:focus-visible,a:focus-visible{{outline:3px solid #2563eb;outline-offset:2px}}\
nav a{{margin-right:1rem;color:{color}}}img{{max-height:48px}}</style></head><body><main>",
        font = escape(font),
        color = escape(color),
    ));
    if let Some(logo) = &b.logo_url {
        html.push_str(&format!(
            "<img src=\"{}\" alt=\"{}\">",
            escape(logo),
            escape(title)
        ));
    }
    if let Some(t) = &b.title {
        html.push_str(&format!("<p><strong>{}</strong></p>", escape(t)));
    }
    html.push_str(&format!("<h1>{}</h1>", escape(heading)));
    html.push_str(body_html);
    if let Some(d) = &b.description {
        html.push_str(&format!("<p>{}</p>", escape(d)));
    }
    if !b.buttons.is_empty() {
        html.push_str("<nav>");
        for (label, url) in &b.buttons {
            html.push_str(&format!(
                "<a href=\"{}\">{}</a>",
                escape(url),
                escape(label)
            ));
        }
        html.push_str("</nav>");
    }
    html.push_str("</main></body></html>");
    html.into_bytes()
}

/// The confirm page: one button that POSTs the same URL with an empty form. The form has no
/// `action`, so the token is never written into the page.
pub fn confirm_page(branding: Option<&Branding>) -> Vec<u8> {
    page(
        branding,
        "Continue signing in",
        "<p>Press the button to finish signing in.</p>\
<form method=\"post\"><button type=\"submit\" autofocus>Continue</button></form>",
    )
}

/// An error page with the same message as the JSON error.
pub fn error_page(branding: Option<&Branding>, code: &str, message: &str) -> Vec<u8> {
    let heading = match code {
        "session_required" => "Sign-in required",
        "link_used" => "Link already used",
        "link_expired" => "Link expired",
        _ => "Something went wrong",
    };
    page(
        branding,
        heading,
        &format!("<p role=\"alert\">{}</p>", escape(message)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branding_is_escaped() {
        let b = Branding {
            title: Some("<script>x</script>".into()),
            ..Default::default()
        };
        let p = String::from_utf8(confirm_page(Some(&b))).unwrap();
        assert!(!p.contains("<script>"));
        assert!(p.contains("&lt;script&gt;"));
        assert!(p.contains("<form method=\"post\">"));
        assert!(!p.contains("action="));
    }
}
