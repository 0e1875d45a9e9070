//! The sales email of an Enterprise request, as HTML and plain text. Everything the caller
//! supplied (organization name and id, admin address) is HTML-escaped in the HTML part, so an
//! organization named `<script>…` arrives as text. The subject and the text part carry it as
//! is: they are not interpreted as markup, and validation already refused control characters
//! (no header or line injection).

use shared::db::enterprise_requests::EnterpriseRequest;

/// A rendered email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    /// Subject line.
    pub subject: String,
    /// HTML part.
    pub html: String,
    /// Plain-text part.
    pub text: String,
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The email telling sales about an Enterprise plan request.
pub fn enterprise_request(request: &EnterpriseRequest) -> RenderedEmail {
    let requested_at = request
        .created_at
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string();
    let subject = format!(
        "Enterprise plan request: {} ({} members)",
        request.organization_name, request.member_count
    );
    let rows = [
        ("Organization", request.organization_name.as_str()),
        ("Organization id", request.organization_id.as_str()),
        ("Admin email", request.admin_email.as_str()),
        ("Members", &request.member_count.to_string()),
        ("Requested at", &requested_at),
        ("Request id", &request.id.to_string()),
    ]
    .map(|(label, value)| (label, value.to_owned()));

    let mut html = String::from(
        "<!doctype html>\n<html><body style=\"font-family: sans-serif\">\n\
         <h1 style=\"font-size: 18px\">Enterprise plan request</h1>\n\
         <p>An organization asked for the Enterprise plan. Reply to this email to reach its \
         administrator.</p>\n<table cellpadding=\"4\">\n",
    );
    let mut text = String::from(
        "Enterprise plan request\n\nAn organization asked for the Enterprise plan. \
         Reply to this email to reach its administrator.\n\n",
    );
    for (label, value) in &rows {
        html.push_str(&format!(
            "<tr><th align=\"left\">{label}</th><td>{}</td></tr>\n",
            escape_html(value)
        ));
        text.push_str(&format!("{label}: {value}\n"));
    }
    html.push_str("</table>\n</body></html>\n");
    RenderedEmail {
        subject,
        html,
        text,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use uuid::Uuid;

    use super::*;

    fn request(name: &str) -> EnterpriseRequest {
        EnterpriseRequest {
            id: Uuid::nil(),
            organization_id: "org_\"42\"&co".into(),
            organization_name: name.into(),
            admin_email: "o'brien@acme.example".into(),
            member_count: 250,
            idempotency_key: None,
            created_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 21, 9, 30, 0)
                .single()
                .expect("valid time"),
        }
    }

    #[test]
    fn html_special_characters_are_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn a_script_in_the_organization_name_arrives_as_text_in_the_html() {
        let email = enterprise_request(&request("<script>alert('x')</script> Corp"));
        assert!(!email.html.contains("<script>"), "{}", email.html);
        assert!(
            email
                .html
                .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Corp"),
            "{}",
            email.html
        );
        assert!(email.html.contains("org_&quot;42&quot;&amp;co"));
        assert!(email.html.contains("o&#39;brien@acme.example"));
        // Text and subject are not markup: the name is shown as typed.
        assert!(
            email
                .text
                .contains("Organization: <script>alert('x')</script> Corp")
        );
        assert_eq!(
            email.subject,
            "Enterprise plan request: <script>alert('x')</script> Corp (250 members)"
        );
    }

    #[test]
    fn both_parts_carry_every_detail_of_the_request() {
        let email = enterprise_request(&request("Acme"));
        for part in [&email.html, &email.text] {
            for expected in [
                "Acme",
                "250",
                "2026-11-21 09:30:00 UTC",
                "00000000-0000-0000-0000-000000000000",
            ] {
                assert!(part.contains(expected), "{expected} missing from {part}");
            }
        }
        assert!(email.text.contains("Organization id: org_\"42\"&co"));
        assert!(email.text.contains("Admin email: o'brien@acme.example"));
    }
}
