//! RFC 5322 mailboxes: parsing a header value (through mail-parser), rendering a `From:` value,
//! and the comma-separated approved-sender lists of the spec.

use base64::Engine;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, HeaderValue};

/// One mailbox: an optional display name and the bare address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: String,
}

impl Mailbox {
    /// Renders the mailbox for a header field, quoting or encoding the display name as needed.
    pub fn render(&self) -> String {
        match self
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            None => self.address.clone(),
            Some(name) => format!("{} <{}>", render_display_name(name), self.address),
        }
    }

    pub fn with_name(&self, name: Option<&str>) -> Mailbox {
        Mailbox {
            name: name.map(str::to_owned),
            address: self.address.clone(),
        }
    }
}

fn render_display_name(name: &str) -> String {
    const ATEXT_SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~ ";
    if name.is_ascii()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ATEXT_SPECIALS.contains(c))
    {
        name.to_owned()
    } else if name.is_ascii() && !name.chars().any(|c| c.is_ascii_control()) {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    } else {
        // RFC 2047 encoded word: safe for any text, and needs no SMTPUTF8 upstream.
        let b64 = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        format!("=?UTF-8?B?{b64}?=")
    }
}

/// Parses a header value (the bytes after the colon, folding included) into its mailboxes.
/// `None` for a group (`team: a@x;`), which a From field may not hold (RFC 5322 §3.6.2).
pub fn parse_list(value: &[u8]) -> Option<Vec<Mailbox>> {
    let mut owned;
    let value = if value.ends_with(b"\n") {
        value
    } else {
        // mail-parser reads up to the end of the field, which it finds at a newline.
        owned = value.to_vec();
        owned.extend_from_slice(b"\r\n");
        &owned[..]
    };
    let addrs = match MessageStream::new(value).parse_address() {
        HeaderValue::Address(Address::List(list)) => list,
        HeaderValue::Address(Address::Group(_)) => return None,
        _ => Vec::new(),
    };
    let list = addrs
        .into_iter()
        .map(|a| Mailbox {
            name: a.name.map(|n| n.into_owned()),
            address: a.address.map(|a| a.into_owned()).unwrap_or_default(),
        })
        .collect();
    Some(list)
}

/// The one mailbox of a From field, read strictly (RFC 5322 §3.4): `Some` only if the whole
/// value is exactly one `mailbox` and nothing in it lets another reader see another address.
/// A field that readers can read differently is one we must not forward, because which reader
/// the receiving system, a DMARC filter or a webmail client uses is not ours to know. So
/// beyond the grammar this refuses a route, white space or comments inside the address, a
/// quoted or encoded-word local part, a domain literal, a non-ASCII address, a comment that
/// holds address punctuation, and any field on which mail-parser reads another address.
/// Encoded words count only in the display name.
pub fn strict_mailbox(value: &[u8]) -> Option<Mailbox> {
    let unfolded = unfold_strict(value)?;
    let mut r = Strict {
        s: unfolded.as_bytes(),
        i: 0,
    };
    let (named, address) = r.mailbox()?;
    let mut lenient = parse_list(value)?;
    let other = lenient.pop().filter(|_| lenient.is_empty())?;
    if other.address != address {
        return None;
    }
    Some(Mailbox {
        name: other.name.filter(|_| named),
        address,
    })
}

/// The field value without its folding: every line break must be CRLF followed by white space
/// (FWS), and no other control character than a tab may appear.
fn unfold_strict(value: &[u8]) -> Option<String> {
    let value = value.strip_suffix(b"\r\n").unwrap_or(value);
    let text = std::str::from_utf8(value).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n']) {
        let (line, tail) = rest.split_at(at);
        let tail = tail.strip_prefix("\r\n")?;
        if !tail.starts_with([' ', '\t']) {
            return None;
        }
        out.push_str(line);
        rest = tail;
    }
    out.push_str(rest);
    (!out.chars().any(|c| c.is_control() && c != '\t')).then_some(out)
}

/// A cursor over an unfolded From value, for [`strict_mailbox`].
struct Strict<'a> {
    s: &'a [u8],
    i: usize,
}

/// `atext` (RFC 5322 §3.2.3), with the UTF-8 of RFC 6532 for display names.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

impl Strict<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn at_end(&self) -> bool {
        self.i == self.s.len()
    }

    /// `[CFWS]`: white space and comments. A comment may hold only plain words, since some
    /// readers take a comment for a display name and others for the address.
    fn cfws(&mut self) -> Option<()> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t') => self.i += 1,
                Some(b'(') => {
                    let len = self.s[self.i..].iter().position(|&b| b == b')')?;
                    let inner = &self.s[self.i + 1..self.i + len];
                    if inner.iter().any(|b| b"()<>@,;:\\\"[]".contains(b)) {
                        return None;
                    }
                    self.i += len + 1;
                }
                _ => return Some(()),
            }
        }
    }

    fn atom(&mut self) -> &[u8] {
        let start = self.i;
        while self.peek().is_some_and(is_atext) {
            self.i += 1;
        }
        &self.s[start..self.i]
    }

    /// `dot-atom-text`, ASCII only, and not an encoded word (`=?`), which some readers decode.
    fn dot_atom_text(&mut self) -> Option<&str> {
        let start = self.i;
        loop {
            if self.atom().is_empty() {
                return None;
            }
            if self.peek() != Some(b'.') {
                break;
            }
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        (text.is_ascii() && !text.contains("=?")).then_some(text)
    }

    fn addr_spec(&mut self) -> Option<String> {
        let local = self.dot_atom_text()?.to_owned();
        if self.peek() != Some(b'@') {
            return None;
        }
        self.i += 1;
        let domain = self.dot_atom_text()?;
        (local.len() <= 64 && domain.len() <= 255).then(|| format!("{local}@{domain}"))
    }

    /// `quoted-string` (a display name word): qtext, quoted pairs of a visible character or
    /// white space, and white space.
    fn quoted_string(&mut self) -> Option<()> {
        self.i += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    let next = *self.s.get(self.i + 1)?;
                    if !(next == b' ' || next == b'\t' || next.is_ascii_graphic() || next >= 0x80) {
                        return None;
                    }
                    self.i += 2;
                }
                _ => self.i += 1,
            }
        }
    }

    /// `mailbox = name-addr / addr-spec`, spanning the whole value. Returns whether it has a
    /// display name, and the address. `phrase` takes the obsolete dots of §4.1
    /// (`John Q. Public`), which cannot change the address.
    fn mailbox(&mut self) -> Option<(bool, String)> {
        self.cfws()?;
        let start = self.i;
        if let Some(address) = self.addr_spec() {
            self.cfws()?;
            if self.at_end() {
                return Some((false, address));
            }
        }
        self.i = start;
        let mut words = 0;
        loop {
            match self.peek()? {
                b'<' => break,
                b'"' => self.quoted_string()?,
                b'.' if words > 0 => self.i += 1,
                b if is_atext(b) => {
                    self.atom();
                }
                _ => return None,
            }
            words += 1;
            self.cfws()?;
        }
        self.i += 1;
        let address = self.addr_spec()?;
        if self.peek() != Some(b'>') {
            return None;
        }
        self.i += 1;
        self.cfws()?;
        self.at_end().then_some((words > 0, address))
    }
}

/// Parses exactly one mailbox with a plausible address, as config values need.
pub fn parse_one(value: &str) -> Option<Mailbox> {
    if value.chars().any(|c| c.is_control()) {
        return None;
    }
    let mut list = parse_list(value.as_bytes())?;
    if list.len() != 1 {
        return None;
    }
    let mb = list.pop()?;
    is_plausible_address(&mb.address).then_some(mb)
}

/// A bare address we would put in a header and an envelope: `local@domain`, no spaces or
/// control characters, no brackets.
pub fn is_plausible_address(addr: &str) -> bool {
    match addr.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !addr
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>,;".contains(c))
        }
        None => false,
    }
}

/// A name fit for EHLO (RFC 5321 §4.1.1.1): a domain of letters, digits and hyphens, or an
/// address literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
pub fn is_helo_name(name: &str) -> bool {
    if let Some(literal) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        let ip = literal.strip_prefix("IPv6:").unwrap_or(literal);
        return ip.parse::<std::net::IpAddr>().is_ok();
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What submission services accept before AUTH: a fully qualified domain name (two labels or
/// more, a top-level label that is not all digits, not `localhost`) or an address literal.
pub fn is_fqdn_helo(name: &str) -> bool {
    if !is_helo_name(name) {
        return false;
    }
    if name.starts_with('[') {
        return true;
    }
    let name = name.trim_end_matches('.');
    let labels: Vec<&str> = name.split('.').collect();
    let top = labels.last().copied().unwrap_or_default();
    labels.len() >= 2
        && !top.bytes().all(|b| b.is_ascii_digit())
        && !top.eq_ignore_ascii_case("localhost")
        && !top.eq_ignore_ascii_case("localdomain")
}

/// An approved-sender list: entries trimmed, empty entries ignored, bare address kept
/// (an entry may be written `Name <addr>`), compared case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovedList(Vec<String>);

impl ApprovedList {
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a str>) -> ApprovedList {
        ApprovedList(
            entries
                .into_iter()
                .flat_map(|e| e.split(','))
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| match (e.rfind('<'), e.rfind('>')) {
                    (Some(a), Some(b)) if a < b => e[a + 1..b].trim().to_owned(),
                    _ => e.to_owned(),
                })
                .collect(),
        )
    }

    pub fn contains(&self, address: &str) -> bool {
        let address = address.trim();
        self.0.iter().any(|e| e.eq_ignore_ascii_case(address))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn helo_names() {
        use super::{is_fqdn_helo, is_helo_name};
        for ok in [
            "mta.example.com",
            "printer",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "a-b.c",
        ] {
            assert!(is_helo_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "-x.example",
            "x..example",
            "[not-an-ip]",
            "a_b.example",
        ] {
            assert!(!is_helo_name(bad), "{bad}");
        }
        for fq in ["mta.example.com", "relay.test", "[192.0.2.1]"] {
            assert!(is_fqdn_helo(fq), "{fq}");
        }
        for not in [
            "printer",
            "localhost",
            "box.localdomain",
            "10.0.0.1",
            "relay.localhost",
        ] {
            assert!(!is_fqdn_helo(not), "{not}");
        }
    }

    use super::*;

    #[test]
    fn parses_named_and_bare() {
        assert_eq!(
            parse_one("Acme <noreply@acme.example>"),
            Some(Mailbox {
                name: Some("Acme".into()),
                address: "noreply@acme.example".into()
            })
        );
        assert_eq!(parse_one("noreply@acme.example").unwrap().name, None);
        assert_eq!(parse_one("a@x.example, b@x.example"), None);
        assert_eq!(parse_one("not an address"), None);
        assert_eq!(parse_one("A <a@x.example>\r\nBcc: evil@x.example"), None);
    }

    #[test]
    fn parses_folded_and_encoded_values() {
        let list = parse_list(b" =?UTF-8?B?SsO2cmc=?=\r\n <jorg@x.example>\r\n").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name.as_deref(), Some("Jörg"));
        assert_eq!(list[0].address, "jorg@x.example");
    }

    #[test]
    fn groups_are_not_mailbox_lists() {
        assert_eq!(parse_list(b" team: a@x.example;\r\n"), None);
        assert_eq!(
            parse_list(b" a@x.example, b@x.example\r\n").unwrap().len(),
            2
        );
    }

    #[test]
    fn strict_from_keeps_one_plain_mailbox() {
        let addr = |v: &str| strict_mailbox(v.as_bytes()).map(|m| (m.name, m.address));
        let alice =
            |name: Option<&str>| Some((name.map(str::to_owned), "alice@acme.example".into()));
        assert_eq!(addr(" alice@acme.example\r\n"), alice(None));
        assert_eq!(addr(" <alice@acme.example>"), alice(None));
        assert_eq!(addr(" Alice <alice@acme.example>"), alice(Some("Alice")));
        assert_eq!(
            addr(" \"Al, ice\" <alice@acme.example>"),
            alice(Some("Al, ice"))
        );
        assert_eq!(
            addr(" John Q. Public <alice@acme.example>"),
            alice(Some("John Q. Public"))
        );
        assert_eq!(
            addr(" =?UTF-8?B?SsO2cmc=?=\r\n <alice@acme.example>\r\n"),
            alice(Some("Jörg"))
        );
        // A display name that looks like an address is only a display name.
        assert_eq!(
            addr(" \"bob@evil.example\" <alice@acme.example>"),
            alice(Some("bob@evil.example"))
        );
        assert_eq!(
            addr(" =?utf-8?q?bob=40evil.example?= <alice@acme.example>"),
            alice(Some("bob@evil.example"))
        );
        // A comment of plain words is no display name of ours.
        assert_eq!(addr(" alice@acme.example (Alice)"), alice(None));
    }

    #[test]
    fn strict_from_refuses_what_readers_can_read_differently() {
        for value in [
            " evil@evil.example <alice@acme.example>",
            " Alice <alice@acme.example",
            " <alice@acme.example> evil@evil.example",
            " <alice@acme.example> =?utf-8?q?x?=",
            " <alice@acme.example>>",
            " =?utf-8?q?alice?=@acme.example",
            " <=?utf-8?q?evil?=@acme.example>",
            " alice@acme.example, <>",
            " alice@acme.example,",
            " , alice@acme.example",
            " team: alice@acme.example;",
            " <@evil.example:alice@acme.example>",
            " (evil@evil.example) alice@acme.example",
            " alice@acme.example (<evil@evil.example>)",
            " Alice <alice@acme.example> (a (nested) comment)",
            " Alice <alice @acme.example>",
            " Alice <alice@acme.example (c)>",
            " \"alice\"@acme.example",
            " alice@[10.0.0.1]",
            " \"alice@acme.example\" evil@evil.example",
            " alice@acme.example\nBcc: evil@evil.example",
            " alice@acme.example\r\nBcc: evil@evil.example",
            " alice@acme.example\r",
            " Al\0ice <alice@acme.example>",
            " alice@acmé.example",
            " .Alice <alice@acme.example>",
            " \"Alice <alice@acme.example>",
            "",
            " ",
        ] {
            assert_eq!(strict_mailbox(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn renders_names_safely() {
        let mb = |n: &str| Mailbox {
            name: Some(n.into()),
            address: "a@x.example".into(),
        };
        assert_eq!(mb("Acme Health").render(), "Acme Health <a@x.example>");
        assert_eq!(mb("Acme, Inc.").render(), "\"Acme, Inc.\" <a@x.example>");
        assert_eq!(
            mb("Say \"hi\"").render(),
            "\"Say \\\"hi\\\"\" <a@x.example>"
        );
        assert_eq!(mb("Jörg").render(), "=?UTF-8?B?SsO2cmc=?= <a@x.example>");
        assert_eq!(mb("").render(), "a@x.example");
        // What we render parses back to the same mailbox.
        for name in ["Acme, Inc.", "Say \"hi\"", "Jörg", "Acme Health"] {
            assert_eq!(parse_one(&mb(name).render()), Some(mb(name)), "{name}");
        }
    }

    #[test]
    fn approved_list_rules() {
        let list = ApprovedList::from_entries([
            " Alice@Acme.example , ,bob@acme.example",
            "Carol <carol@acme.example>",
        ]);
        assert_eq!(list.len(), 3);
        assert!(list.contains("alice@acme.example"));
        assert!(list.contains("BOB@ACME.EXAMPLE"));
        assert!(list.contains("carol@acme.example"));
        assert!(!list.contains("mallory@acme.example"));
        assert!(!list.contains(""));
    }
}
