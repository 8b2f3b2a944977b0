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

/// The page templates, compiled into the binary; HTML auto-escaping on.
fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, source) in [
            ("base.html", include_str!("templates/base.html")),
            ("confirm.html", include_str!("templates/confirm.html")),
            ("error.html", include_str!("templates/error.html")),
        ] {
            env.add_template(name, source)
                .expect("built-in templates parse");
        }
        env
    })
}

/// Black or white, whichever reads better on `hex` (WCAG relative luminance).
fn readable_on(hex: &str) -> &'static str {
    let h = hex.trim_start_matches('#');
    let full: String = if h.len() == 3 {
        h.chars().flat_map(|c| [c, c]).collect()
    } else {
        h.to_string()
    };
    let channel = |i: usize| {
        let v =
            u8::from_str_radix(full.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0) as f64 / 255.0;
        if v <= 0.03928 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * channel(0) + 0.7152 * channel(2) + 0.0722 * channel(4);
    // Contrast with white is (1.05)/(l+0.05); with black (l+0.05)/0.05.
    if 1.05 / (l + 0.05) >= (l + 0.05) / 0.05 {
        "#ffffff"
    } else {
        "#000000"
    }
}

fn render(template: &str, branding: Option<&Branding>, heading: &str, message: &str) -> Vec<u8> {
    let b = branding.cloned().unwrap_or_default();
    let color = b.color.clone().unwrap_or_else(|| "#1f2937".to_string());
    let brand = serde_json::json!({
        "title": b.title,
        "description": b.description,
        "logo_url": b.logo_url,
        "on_color": readable_on(&color),
        "color": color,
        "font": b.font.unwrap_or_else(|| "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif".into()),
        "buttons": b.buttons.iter().map(|(label, url)| serde_json::json!({"label": label, "url": url})).collect::<Vec<_>>(),
    });
    let ctx = minijinja::context! { brand => brand, heading => heading, message => message };
    match templates()
        .get_template(template)
        .and_then(|t| t.render(ctx))
    {
        Ok(html) => html.into_bytes(),
        Err(e) => {
            tracing::error!(error = %e, "page template failed");
            format!(
                "<!doctype html><title>{0}</title><h1>{0}</h1><p>{1}</p>",
                escape(heading),
                escape(message)
            )
            .into_bytes()
        }
    }
}

/// The confirm page: one button that POSTs the same URL with an empty form. The form has no
/// `action`, so the token is never written into the page.
pub fn confirm_page(branding: Option<&Branding>) -> Vec<u8> {
    render("confirm.html", branding, "Continue signing in", "")
}

/// An error page with the same message as the JSON error.
pub fn error_page(branding: Option<&Branding>, code: &str, message: &str) -> Vec<u8> {
    let heading = match code {
        "session_required" | "session_invalid" => "Sign-in required",
        "link_used" => "Link already used",
        "link_expired" => "Link expired",
        "link_revoked" => "Link revoked",
        "forbidden_path" => "Not allowed",
        "upstream_unavailable" => "Temporarily unavailable",
        _ => "This link cannot be used",
    };
    render("error.html", branding, heading, message)
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
        let e = String::from_utf8(error_page(None, "link_used", "a <b> message")).unwrap();
        assert!(e.contains("Link already used"));
        assert!(e.contains("a &lt;b&gt; message"));
    }

    #[test]
    fn button_text_contrast() {
        assert_eq!(readable_on("#5b21b6"), "#ffffff");
        assert_eq!(readable_on("#fde047"), "#000000");
        assert_eq!(readable_on("#fff"), "#000000");
    }
}
