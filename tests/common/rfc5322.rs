//! A strict reader of the RFC 5322 §3.4 `mailbox-list` grammar, for tests only: the test
//! oracle the From rule is checked against. It is written from the ABNF, apart from
//! `src/address.rs` and without mail-parser, so that a bug in either cannot hide in both.
//! It takes the grammar as the RFC gives it (nested comments, CFWS inside addresses, quoted
//! local parts, domain literals, the obsolete dots of `obs-phrase`) and nothing lenient: no
//! bare text after an address, no missing `>`, no empty list entries, no groups, no routes.
//! Self-contained (no crate imports), so the fuzz crate can include it by path too.

#![allow(dead_code)]

/// One mailbox as the grammar reads it: the display name as written (not decoded) and the
/// address with its CFWS dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub display_name: Option<String>,
    pub address: String,
}

/// Reads a field value (the bytes after the colon, the final CRLF optional) as a
/// `mailbox-list`; `None` if it is not one.
pub fn mailbox_list(value: &[u8]) -> Option<Vec<Mailbox>> {
    let value = value.strip_suffix(b"\r\n").unwrap_or(value);
    std::str::from_utf8(value).ok()?;
    let (first, mut rest) = mailbox(value)?;
    let mut list = vec![first];
    while let Some(after_comma) = rest.strip_prefix(b",") {
        let (next, r) = mailbox(after_comma)?;
        list.push(next);
        rest = r;
    }
    rest.is_empty().then_some(list)
}

type Parsed<'a, T> = Option<(T, &'a [u8])>;

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn is_vchar(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

fn is_ctext(b: u8) -> bool {
    matches!(b, 33..=39 | 42..=91 | 93..=126) || b >= 0x80
}

fn is_qtext(b: u8) -> bool {
    b == 33 || matches!(b, 35..=91 | 93..=126) || b >= 0x80
}

fn is_dtext(b: u8) -> bool {
    matches!(b, 33..=90 | 94..=126) || b >= 0x80
}

fn take_while(s: &[u8], f: impl Fn(u8) -> bool) -> (&[u8], &[u8]) {
    let n = s.iter().position(|&b| !f(b)).unwrap_or(s.len());
    s.split_at(n)
}

/// `FWS = ([*WSP CRLF] 1*WSP) / obs-FWS`, where `obs-FWS = 1*WSP *(CRLF 1*WSP)`.
fn fws(s: &[u8]) -> Option<&[u8]> {
    let (lead, mut rest) = take_while(s, is_wsp);
    let mut any = !lead.is_empty();
    while let Some(after) = rest.strip_prefix(b"\r\n") {
        let (ws, r) = take_while(after, is_wsp);
        if ws.is_empty() {
            break;
        }
        any = true;
        rest = r;
    }
    any.then_some(rest)
}

fn opt_fws(s: &[u8]) -> &[u8] {
    fws(s).unwrap_or(s)
}

/// `quoted-pair = "\" (VCHAR / WSP)`
fn quoted_pair(s: &[u8]) -> Parsed<'_, u8> {
    match s {
        [b'\\', c, rest @ ..] if is_vchar(*c) || is_wsp(*c) => Some((*c, rest)),
        _ => None,
    }
}

/// `comment = "(" *([FWS] ccontent) [FWS] ")"`, `ccontent = ctext / quoted-pair / comment`.
fn comment(s: &[u8], depth: usize) -> Option<&[u8]> {
    if depth > 32 {
        return None;
    }
    let mut rest = s.strip_prefix(b"(")?;
    loop {
        rest = opt_fws(rest);
        match rest.first()? {
            b')' => return Some(&rest[1..]),
            b'(' => rest = comment(rest, depth + 1)?,
            b'\\' => rest = quoted_pair(rest)?.1,
            c if is_ctext(*c) => rest = &rest[1..],
            _ => return None,
        }
    }
}

/// `CFWS = (1*([FWS] comment) [FWS]) / FWS`
fn cfws(s: &[u8]) -> Option<&[u8]> {
    let mut rest = s;
    let mut any = false;
    loop {
        let after_fws = opt_fws(rest);
        if let Some(r) = comment(after_fws, 0) {
            rest = r;
            any = true;
        } else {
            any |= after_fws.len() < rest.len();
            rest = after_fws;
            return any.then_some(rest);
        }
    }
}

fn opt_cfws(s: &[u8]) -> &[u8] {
    cfws(s).unwrap_or(s)
}

/// `atom = [CFWS] 1*atext [CFWS]`
fn atom(s: &[u8]) -> Parsed<'_, String> {
    let (text, rest) = take_while(opt_cfws(s), is_atext);
    if text.is_empty() {
        return None;
    }
    Some((String::from_utf8_lossy(text).into_owned(), opt_cfws(rest)))
}

/// `dot-atom = [CFWS] dot-atom-text [CFWS]`, `dot-atom-text = 1*atext *("." 1*atext)`
fn dot_atom(s: &[u8]) -> Parsed<'_, String> {
    let mut rest = opt_cfws(s);
    let mut text = String::new();
    loop {
        let (part, r) = take_while(rest, is_atext);
        if part.is_empty() {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(part));
        match r.strip_prefix(b".") {
            Some(after) => {
                text.push('.');
                rest = after;
            }
            None => return Some((text, opt_cfws(r))),
        }
    }
}

/// `quoted-string = [CFWS] DQUOTE *([FWS] qcontent) [FWS] DQUOTE [CFWS]`; the value is the
/// string as written, quotes included.
fn quoted_string(s: &[u8]) -> Parsed<'_, String> {
    let start = opt_cfws(s);
    let mut rest = start.strip_prefix(b"\"")?;
    loop {
        rest = opt_fws(rest);
        match rest.first()? {
            b'"' => {
                let written = &start[..start.len() - rest.len() + 1];
                return Some((
                    String::from_utf8_lossy(written).into_owned(),
                    opt_cfws(&rest[1..]),
                ));
            }
            b'\\' => rest = quoted_pair(rest)?.1,
            c if is_qtext(*c) => rest = &rest[1..],
            _ => return None,
        }
    }
}

/// `word = atom / quoted-string`
fn word(s: &[u8]) -> Parsed<'_, String> {
    atom(s).or_else(|| quoted_string(s))
}

/// `phrase = 1*word / obs-phrase`, `obs-phrase = word *(word / "." / CFWS)`
fn phrase(s: &[u8]) -> Parsed<'_, String> {
    let (first, mut rest) = word(s)?;
    let mut words = vec![first];
    loop {
        if let Some((w, r)) = word(rest) {
            words.push(w);
            rest = r;
        } else if let Some(r) = rest.strip_prefix(b".") {
            words.push(".".into());
            rest = opt_cfws(r);
        } else {
            return Some((words.join(" "), rest));
        }
    }
}

/// `domain-literal = [CFWS] "[" *([FWS] dtext) [FWS] "]" [CFWS]`
fn domain_literal(s: &[u8]) -> Parsed<'_, String> {
    let start = opt_cfws(s);
    let mut rest = start.strip_prefix(b"[")?;
    loop {
        rest = opt_fws(rest);
        match rest.first()? {
            b']' => {
                let written = &start[..start.len() - rest.len() + 1];
                return Some((
                    String::from_utf8_lossy(written).into_owned(),
                    opt_cfws(&rest[1..]),
                ));
            }
            c if is_dtext(*c) => rest = &rest[1..],
            _ => return None,
        }
    }
}

/// `addr-spec = local-part "@" domain`, `local-part = dot-atom / quoted-string`,
/// `domain = dot-atom / domain-literal`
fn addr_spec(s: &[u8]) -> Parsed<'_, String> {
    let (local, rest) = dot_atom(s).or_else(|| quoted_string(s))?;
    let rest = rest.strip_prefix(b"@")?;
    let (domain, rest) = dot_atom(rest).or_else(|| domain_literal(rest))?;
    Some((format!("{local}@{domain}"), rest))
}

/// `angle-addr = [CFWS] "<" addr-spec ">" [CFWS]`
fn angle_addr(s: &[u8]) -> Parsed<'_, String> {
    let rest = opt_cfws(s).strip_prefix(b"<")?;
    let (address, rest) = addr_spec(rest)?;
    let rest = rest.strip_prefix(b">")?;
    Some((address, opt_cfws(rest)))
}

/// `mailbox = name-addr / addr-spec`, `name-addr = [display-name] angle-addr`
fn mailbox(s: &[u8]) -> Parsed<'_, Mailbox> {
    if let Some((display_name, rest)) = phrase(s)
        && let Some((address, rest)) = angle_addr(rest)
    {
        let display_name = Some(display_name);
        return Some((
            Mailbox {
                display_name,
                address,
            },
            rest,
        ));
    }
    if let Some((address, rest)) = angle_addr(s) {
        return Some((
            Mailbox {
                display_name: None,
                address,
            },
            rest,
        ));
    }
    let (address, rest) = addr_spec(s)?;
    Some((
        Mailbox {
            display_name: None,
            address,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: &str) -> Option<String> {
        match mailbox_list(v.as_bytes())?.as_slice() {
            [m] => Some(m.address.clone()),
            _ => None,
        }
    }

    #[test]
    fn reads_the_grammar_and_nothing_else() {
        assert_eq!(
            one(" alice@acme.example").as_deref(),
            Some("alice@acme.example")
        );
        assert_eq!(
            one(" Alice (x (y)) <alice@acme.example> (c)").as_deref(),
            Some("alice@acme.example")
        );
        assert_eq!(
            one(" John Q. Public <alice@acme.example>").as_deref(),
            Some("alice@acme.example")
        );
        assert_eq!(
            one(" \"a, b\"\r\n <alice@acme.example>\r\n").as_deref(),
            Some("alice@acme.example")
        );
        assert_eq!(one(" evil@evil.example <alice@acme.example>"), None);
        assert_eq!(one(" <alice@acme.example"), None);
        assert_eq!(one(" <alice@acme.example> x"), None);
        assert_eq!(one(" team: alice@acme.example;"), None);
        assert_eq!(one(" <@route:alice@acme.example>"), None);
        assert_eq!(mailbox_list(b" alice@acme.example, <>"), None);
        assert_eq!(
            mailbox_list(b" a@x.example, b@x.example").map(|l| l.len()),
            Some(2)
        );
    }
}
