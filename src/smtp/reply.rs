//! Every reply the relay can send, by name, in one place (RFC 5321 §4.2, RFC 3463 enhanced codes).

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply. Multi-line replies keep their lines in `text`, split on `\n`.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 enhanced status code, e.g. `"5.5.1"`; absent on greetings and EHLO.
    pub enhanced: Option<Cow<'static, str>>,
    pub text: Cow<'static, str>,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "Reply({} {} {})", self.code, e, self.text),
            None => write!(f, "Reply({} {})", self.code, self.text),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(String::from_utf8_lossy(&out).trim_end())
    }
}

const fn r(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
    Reply {
        code,
        enhanced: Some(Cow::Borrowed(enhanced)),
        text: Cow::Borrowed(text),
    }
}

/// Keeps text that came from outside (an upstream's reply, a config value) from breaking
/// the reply framing: control characters would let a peer inject reply lines.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

impl Reply {
    pub fn new(code: u16, enhanced: impl Into<Cow<'static, str>>, text: &str) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced.into()),
            text: Cow::Owned(clean(text)),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form: `CODE-` on every line but the last, `CODE ` on the last.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(sep as u8);
            if let Some(e) = &self.enhanced {
                out.extend_from_slice(e.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    // ----- session -----

    pub fn greeting(hostname: &str) -> Reply {
        Reply {
            code: 220,
            enhanced: None,
            text: Cow::Owned(format!("{hostname} ESMTP project-relay")),
        }
    }

    pub fn helo(hostname: &str) -> Reply {
        Reply {
            code: 250,
            enhanced: None,
            text: Cow::Owned(hostname.to_owned()),
        }
    }

    /// EHLO reply: the hostname line, then one line per extension keyword.
    pub fn ehlo(hostname: &str, extensions: &[String]) -> Reply {
        let mut text = hostname.to_owned();
        for ext in extensions {
            text.push('\n');
            text.push_str(ext);
        }
        Reply {
            code: 250,
            enhanced: None,
            text: Cow::Owned(text),
        }
    }

    pub const OK: Reply = r(250, "2.0.0", "Ok");
    pub const SENDER_OK: Reply = r(250, "2.1.0", "Sender ok");
    pub const RECIPIENT_OK: Reply = r(250, "2.1.5", "Recipient ok");
    pub const START_DATA: Reply = Reply {
        code: 354,
        enhanced: None,
        text: Cow::Borrowed("End data with <CR><LF>.<CR><LF>"),
    };
    pub const BYE: Reply = r(221, "2.0.0", "Bye");
    pub const VRFY: Reply = r(
        252,
        "2.5.0",
        "Cannot VRFY user, but will accept message and attempt delivery",
    );
    pub const HELP: Reply = r(
        214,
        "2.0.0",
        "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
    );
    pub const READY_TLS: Reply = r(220, "2.0.0", "Ready to start TLS");
    pub const SHUTTING_DOWN: Reply = r(421, "4.3.0", "Service shutting down, closing connection");
    pub const IDLE_TIMEOUT: Reply = r(421, "4.4.2", "Idle timeout, closing connection");
    pub const SESSION_TIMEOUT: Reply = r(
        421,
        "4.4.2",
        "Session time limit reached, closing connection",
    );
    pub const TOO_MANY_ERRORS: Reply = r(421, "4.7.0", "Too many errors, closing connection");

    // ----- command errors -----

    pub const UNRECOGNIZED: Reply = r(500, "5.5.1", "Command unrecognized");
    pub const LINE_TOO_LONG: Reply = r(500, "5.5.2", "Line too long");
    pub const BAD_UTF8: Reply = r(500, "5.5.2", "Command is not valid UTF-8");
    pub const SYNTAX: Reply = r(501, "5.5.4", "Syntax error in parameters or arguments");
    pub const BAD_ADDRESS: Reply = r(501, "5.1.3", "Bad address syntax");
    pub const NOT_IMPLEMENTED: Reply = r(502, "5.5.1", "Command not implemented");
    pub const NEED_HELO: Reply = r(503, "5.5.1", "Send EHLO or HELO first");
    pub const NESTED_MAIL: Reply = r(503, "5.5.1", "Sender already specified");
    pub const NEED_MAIL: Reply = r(503, "5.5.1", "Send MAIL first");
    pub const NEED_RCPT: Reply = r(503, "5.5.1", "Send RCPT first");
    pub const TLS_ACTIVE: Reply = r(503, "5.5.1", "TLS already active");
    pub const TLS_UNAVAILABLE: Reply = r(454, "4.7.0", "TLS not available");
    pub const UNKNOWN_PARAMETER: Reply = r(555, "5.5.4", "Unsupported MAIL or RCPT parameter");
    pub const SMTPUTF8_NOT_DECLARED: Reply = r(
        553,
        "5.6.7",
        "Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
    );
    pub const TOO_MANY_RECIPIENTS: Reply = r(452, "4.5.3", "Too many recipients");

    // ----- access and AUTH (RFC 4954) -----

    pub const ACCESS_DENIED: Reply = r(
        554,
        "5.7.1",
        "Access denied: this client may not relay without AUTH",
    );
    pub const AUTH_REQUIRED: Reply = r(530, "5.7.0", "Authentication required");
    pub const AUTH_OK: Reply = r(235, "2.7.0", "Authentication successful");
    pub const AUTH_FAILED: Reply = r(535, "5.7.8", "Authentication credentials invalid");
    pub const AUTH_CANCELLED: Reply = r(501, "5.7.0", "Authentication cancelled");
    pub const AUTH_BAD_BASE64: Reply = r(501, "5.5.2", "Cannot decode the base64 response");
    pub const AUTH_MECHANISM: Reply = r(
        504,
        "5.5.4",
        "Unsupported authentication mechanism; use PLAIN or LOGIN",
    );
    pub const AUTH_IN_TRANSACTION: Reply = r(
        503,
        "5.5.1",
        "AUTH is not allowed during a mail transaction",
    );
    pub const ALREADY_AUTHENTICATED: Reply = r(503, "5.5.1", "Already authenticated");
    pub const ENCRYPTION_REQUIRED: Reply = r(
        538,
        "5.7.11",
        "Encryption required for requested authentication mechanism: use STARTTLS",
    );
    pub const TOO_MANY_AUTH_FAILURES: Reply = r(
        421,
        "4.7.0",
        "Too many authentication failures, closing connection",
    );
    pub const PEER_NOT_ALLOWED: Reply = r(
        554,
        "5.7.1",
        "Access denied: this client may not use this relay",
    );
    pub const TOO_MANY_FROM_PEER: Reply = r(
        421,
        "4.7.0",
        "Too many connections from your address, try again later",
    );
    pub const TOO_MANY_CONNECTIONS: Reply =
        r(421, "4.7.0", "Too many connections, try again later");

    /// A 334 challenge: base64 text, or empty for "send your response".
    pub fn auth_challenge(b64: &str) -> Reply {
        Reply {
            code: 334,
            enhanced: None,
            text: Cow::Owned(b64.to_owned()),
        }
    }

    pub fn wrong_project(authenticated: &str, header: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            &format!(
                "Authenticated for project {authenticated}, but the message names another project in {header}"
            ),
        )
    }

    // ----- message content -----

    pub const INSUFFICIENT_STORAGE: Reply =
        r(452, "4.3.1", "Insufficient system storage, try again later");
    pub const TOO_LARGE: Reply = r(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    );
    pub const LONG_TEXT_LINE: Reply = r(
        550,
        "5.6.0",
        "Message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)",
    );
    pub const NUL_IN_DATA: Reply = r(550, "5.6.0", "Message contains NUL octets");
    pub const BAD_HEADER: Reply = r(550, "5.6.0", "Message header section cannot be parsed");

    // ----- policy -----

    pub fn duplicate_project_header(header: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            &format!("Message has more than one {header} header"),
        )
    }

    pub fn bad_project_header(header: &str) -> Reply {
        Reply::new(550, "5.7.1", &format!("Invalid {header} header value"))
    }

    /// The spec's failure behaviour: a misconfigured project never falls back to the server.
    pub fn project_misconfigured(project: &str, bad_entries: &[String]) -> Reply {
        Reply::new(
            451,
            "4.3.5",
            &format!(
                "Project SMTP configuration is incomplete or invalid: {} (project {project})",
                bad_entries.join(", ")
            ),
        )
    }

    /// Medplum will not let the relay read the project (bad client, not an admin, another
    /// project's client): a configuration problem, so never the server provider instead.
    pub fn project_unreadable(project: &str, why: &str) -> Reply {
        Reply::new(
            451,
            "4.3.5",
            &format!("Project SMTP configuration cannot be read: {why} (project {project})"),
        )
    }

    /// Medplum cannot be reached and no recent secrets are left (RFC 3463 4.4.3: directory
    /// server failure).
    pub fn secrets_unavailable(project: &str) -> Reply {
        Reply::new(
            451,
            "4.4.3",
            &format!(
                "Project secrets cannot be read from Medplum now; try again later (project {project})"
            ),
        )
    }

    pub const NO_SERVER_PROVIDER: Reply = r(
        451,
        "4.3.5",
        "Server email provider is not configured ([server.smtp] or [server.capture])",
    );
    pub const NO_SERVER_SENDER: Reply = r(
        451,
        "4.3.5",
        "Server sender is not configured (supportEmail)",
    );

    // ----- upstream -----

    pub fn delivered(upstream_text: &str) -> Reply {
        let text = clean(upstream_text);
        // The upstream's own enhanced code would only repeat ours.
        let text = match text.split_once(' ') {
            Some((first, rest)) if is_enhanced(first, 250) => rest.to_owned(),
            _ => text,
        };
        if text.is_empty() {
            Reply::new(250, "2.0.0", "Ok: accepted by upstream")
        } else {
            Reply::new(250, "2.0.0", &format!("Ok: upstream said: {text}"))
        }
    }

    /// The upstream refused: its code class reaches the client, with its own text. An
    /// upstream's `421` closes only the upstream's channel (RFC 5321 §3.8): the client gets
    /// `451` and its session goes on; the relay says `421` only when it closes the client's
    /// connection itself.
    pub fn upstream_refused(code: u16, upstream_text: &str) -> Reply {
        let code = if code == 421 { 451 } else { code };
        let text = clean(upstream_text);
        // Reuse the upstream's enhanced code when it gave one of the right class.
        let (enhanced, rest) = match text.split_once(' ') {
            Some((first, rest)) if is_enhanced(first, code) => (first.to_owned(), rest),
            _ => (format!("{}.0.0", code / 100), text.as_str()),
        };
        Reply::new(code, enhanced, &format!("Upstream refused: {rest}"))
    }

    pub fn captured(path: &str) -> Reply {
        Reply::new(250, "2.0.0", &format!("Ok: captured as {path}"))
    }

    pub fn upstream_unreachable(detail: &str) -> Reply {
        Reply::new(451, "4.4.1", &format!("Upstream unreachable: {detail}"))
    }

    pub fn upstream_lost(detail: &str) -> Reply {
        Reply::new(451, "4.4.2", &format!("Upstream connection lost: {detail}"))
    }

    /// Every connection the relay may open to the upstream stayed busy (RFC 3463 4.4.5:
    /// system congestion).
    pub fn upstream_busy(detail: &str) -> Reply {
        Reply::new(
            451,
            "4.4.5",
            &format!("Upstream connection limit reached: {detail}"),
        )
    }

    /// A sender's own limit (`smtpRateLimit`, `smtpMaxConnections`) held the message back
    /// for the whole wait; nothing was sent.
    pub fn limit_reached(detail: &str) -> Reply {
        Reply::new(
            451,
            "4.4.5",
            &format!("Sending limit reached: {detail}; try again later"),
        )
    }

    /// Larger than the upstream's advertised SIZE (RFC 1870): refused before any of it is sent.
    pub fn upstream_too_large(host: &str, size: u64, limit: u64) -> Reply {
        Reply::new(
            552,
            "5.3.4",
            &format!(
                "Message too big for the upstream: {size} octets, {host} accepts at most {limit}"
            ),
        )
    }

    pub fn upstream_timeout(detail: &str) -> Reply {
        Reply::new(451, "4.4.2", &format!("Upstream timed out: {detail}"))
    }

    pub fn upstream_tls(detail: &str) -> Reply {
        Reply::new(451, "4.7.5", &format!("Upstream TLS failed: {detail}"))
    }

    pub fn upstream_auth(detail: &str) -> Reply {
        Reply::new(
            451,
            "4.7.0",
            &format!("Upstream refused the relay's credentials: {detail}"),
        )
    }

    pub fn upstream_cannot_carry(detail: &str) -> Reply {
        Reply::new(
            554,
            "5.3.3",
            &format!("Upstream cannot carry this message: {detail}"),
        )
    }

    pub fn upstream_protocol(detail: &str) -> Reply {
        Reply::new(451, "4.4.0", &format!("Upstream error: {detail}"))
    }

    pub fn bad_upstream_address(address: &str, detail: &str) -> Reply {
        Reply::new(
            553,
            "5.1.3",
            &format!("Address <{address}> cannot be relayed: {detail}"),
        )
    }

    pub fn capture_failed(detail: &str) -> Reply {
        Reply::new(
            451,
            "4.3.0",
            &format!("Could not write captured message: {detail}"),
        )
    }
}

fn is_enhanced(word: &str, code: u16) -> bool {
    let mut parts = word.split('.');
    let class = parts.next();
    let ok_class = class == Some(&(code / 100).to_string()[..]);
    let rest: Vec<_> = parts.collect();
    ok_class
        && rest.len() == 2
        && rest
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_wire_form() {
        assert_eq!(Reply::OK.to_bytes(), b"250 2.0.0 Ok\r\n");
    }

    #[test]
    fn multi_line_wire_form() {
        let r = Reply::ehlo("relay.test", &["PIPELINING".into(), "SIZE 10".into()]);
        assert_eq!(
            r.to_bytes(),
            b"250-relay.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn upstream_text_cannot_inject_lines() {
        let r = Reply::upstream_refused(550, "5.1.1 no\r\n250 ok");
        assert_eq!(r.to_bytes(), b"550 5.1.1 Upstream refused: no  250 ok\r\n");
    }

    #[test]
    fn upstream_enhanced_code_reused_only_when_class_matches() {
        assert_eq!(
            Reply::upstream_refused(451, "4.7.1 greylisted")
                .enhanced
                .as_deref(),
            Some("4.7.1")
        );
        assert_eq!(
            Reply::upstream_refused(451, "5.7.1 odd")
                .enhanced
                .as_deref(),
            Some("4.0.0")
        );
        assert_eq!(
            Reply::upstream_refused(550, "mailbox unavailable")
                .enhanced
                .as_deref(),
            Some("5.0.0")
        );
    }
}
