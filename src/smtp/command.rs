//! One command line (without its CRLF) to a `Command`, or the syntax-error `Reply` (RFC 5321 §4.1).

use super::reply::Reply;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(String),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954).
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// Known SMTP verbs this relay does not offer (EXPN, TURN, ETRN, BDAT, AUTH ...): 502.
    NotImplemented,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailFrom {
    /// The reverse path without angle brackets; empty for the null sender `<>`.
    pub address: String,
    pub size: Option<u64>,
    pub smtputf8: bool,
}

/// Parses one command line. `line` excludes the line terminator.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let line = std::str::from_utf8(line).map_err(|_| Reply::BAD_UTF8)?;
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(Reply::SYNTAX)
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => domain_arg(rest).map(Command::Ehlo),
        "HELO" => domain_arg(rest).map(Command::Helo),
        "MAIL" => parse_mail(rest).map(Command::Mail),
        "RCPT" => parse_rcpt(rest).map(Command::Rcpt),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        // NOOP, VRFY and HELP may carry an argument that we ignore (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "VRFY" if !rest.trim().is_empty() => Ok(Command::Vrfy),
        "VRFY" => Err(Reply::SYNTAX),
        "HELP" => Ok(Command::Help),
        "AUTH" => {
            let mut words = rest.split_ascii_whitespace();
            let mechanism = words.next().ok_or(Reply::SYNTAX)?.to_owned();
            let initial = words.next().map(str::to_owned);
            if words.next().is_some() {
                return Err(Reply::SYNTAX);
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "EXPN" | "TURN" | "ETRN" | "BDAT" | "ATRN" | "SEND" | "SOML" | "SAML" => {
            Ok(Command::NotImplemented)
        }
        _ => Err(Reply::UNRECOGNIZED),
    }
}

fn domain_arg(rest: &str) -> Result<String, Reply> {
    let arg = rest.trim();
    if arg.is_empty() || arg.contains(' ') {
        return Err(Reply::SYNTAX);
    }
    Ok(arg.to_owned())
}

/// Strips a case-insensitive keyword such as `FROM:`; tolerates spaces after the colon,
/// which many real clients send.
fn keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    let head = rest.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw)
        .then(|| rest[kw.len()..].trim_start())
}

/// Splits `<path> params` into the path (brackets removed) and the parameter words.
fn split_path(arg: &str) -> Result<(&str, &str), Reply> {
    if let Some(stripped) = arg.strip_prefix('<') {
        let end = stripped.find('>').ok_or(Reply::BAD_ADDRESS)?;
        let path = &stripped[..end];
        let rest = &stripped[end + 1..];
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return Err(Reply::BAD_ADDRESS);
        }
        // A source route (`@a,@b:user@c`) is to be ignored (RFC 5321 §4.1.1.3).
        let path = match path.strip_prefix('@') {
            Some(_) => path.split_once(':').ok_or(Reply::BAD_ADDRESS)?.1,
            None => path,
        };
        Ok((path, rest))
    } else {
        // Lenient: a bare address without brackets, as some legacy clients send.
        let (path, rest) = arg.split_once(' ').unwrap_or((arg, ""));
        if path.is_empty() {
            return Err(Reply::BAD_ADDRESS);
        }
        Ok((path, rest))
    }
}

fn parse_mail(rest: &str) -> Result<MailFrom, Reply> {
    let arg = keyword(rest, "FROM:").ok_or(Reply::SYNTAX)?;
    let (path, params) = split_path(arg)?;
    if !path.is_empty() {
        check_mailbox(path)?;
    }
    let mut mail = MailFrom {
        address: path.to_owned(),
        ..MailFrom::default()
    };
    for param in params.split_ascii_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                let n = v.parse::<u64>().map_err(|_| Reply::SYNTAX)?;
                mail.size = Some(n);
            }
            ("BODY", Some(v))
                if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
            ("SMTPUTF8", None) => mail.smtputf8 = true,
            _ => return Err(Reply::UNKNOWN_PARAMETER),
        }
    }
    if !mail.smtputf8 && !mail.address.is_ascii() {
        return Err(Reply::SMTPUTF8_NOT_DECLARED);
    }
    Ok(mail)
}

fn parse_rcpt(rest: &str) -> Result<String, Reply> {
    let arg = keyword(rest, "TO:").ok_or(Reply::SYNTAX)?;
    let (path, params) = split_path(arg)?;
    if !params.trim().is_empty() {
        return Err(Reply::UNKNOWN_PARAMETER);
    }
    if path.is_empty() {
        return Err(Reply::BAD_ADDRESS);
    }
    check_mailbox(path)?;
    Ok(path.to_owned())
}

/// RFC 5321 §4.1.2 Mailbox, checked loosely enough for real clients and strictly enough that
/// nothing which could break the upstream command line gets through.
pub fn check_mailbox(addr: &str) -> Result<(), Reply> {
    let (local, domain) = addr.rsplit_once('@').ok_or(Reply::BAD_ADDRESS)?;
    let local_ok = if local.starts_with('"') && local.ends_with('"') && local.len() >= 2 {
        // RFC 5321 allows brackets inside quotes, but a next hop that parses paths loosely
        // could take them for the path's end: not worth the risk.
        local[1..local.len() - 1]
            .chars()
            .all(|c| !c.is_control() && c != '<' && c != '>')
    } else {
        !local.is_empty()
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local.chars().all(|c| {
                c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii()
            })
    };
    let domain_ok = if domain.starts_with('[') && domain.ends_with(']') {
        domain.len() > 2
            && domain[1..domain.len() - 1]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:-".contains(c))
    } else {
        !domain.is_empty()
            && domain.len() <= 255
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
            })
    };
    if local_ok && domain_ok && local.len() <= 64 {
        Ok(())
    } else {
        Err(Reply::BAD_ADDRESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(addr: &str) -> Command {
        Command::Mail(MailFrom {
            address: addr.into(),
            ..MailFrom::default()
        })
    }

    #[test]
    fn table() {
        let ok: &[(&str, Command)] = &[
            (
                "EHLO client.example",
                Command::Ehlo("client.example".into()),
            ),
            ("ehlo [127.0.0.1]", Command::Ehlo("[127.0.0.1]".into())),
            ("HELO x", Command::Helo("x".into())),
            ("MAIL FROM:<a@b.example>", mail("a@b.example")),
            ("mail from: <a@b.example>", mail("a@b.example")),
            ("MAIL FROM:<>", mail("")),
            ("MAIL FROM:a@b.example", mail("a@b.example")),
            (
                "MAIL FROM:<@relay.example:a@b.example>",
                mail("a@b.example"),
            ),
            (
                "MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME",
                Command::Mail(MailFrom {
                    address: "a@b.example".into(),
                    size: Some(1000),
                    smtputf8: false,
                }),
            ),
            (
                "MAIL FROM:<jörg@bü.example> SMTPUTF8",
                Command::Mail(MailFrom {
                    address: "jörg@bü.example".into(),
                    size: None,
                    smtputf8: true,
                }),
            ),
            ("RCPT TO:<c@d.example>", Command::Rcpt("c@d.example".into())),
            (
                "rcpt to:<\"odd name\"@d.example>",
                Command::Rcpt("\"odd name\"@d.example".into()),
            ),
            ("DATA", Command::Data),
            ("data  ", Command::Data),
            ("RSET", Command::Rset),
            ("NOOP", Command::Noop),
            ("NOOP anything", Command::Noop),
            ("QUIT", Command::Quit),
            ("VRFY bob", Command::Vrfy),
            ("HELP", Command::Help),
            ("STARTTLS", Command::StartTls),
            ("EXPN list", Command::NotImplemented),
            (
                "AUTH PLAIN AAAA",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AAAA".into()),
                },
            ),
            (
                "auth login",
                Command::Auth {
                    mechanism: "login".into(),
                    initial: None,
                },
            ),
        ];
        for (line, want) in ok {
            assert_eq!(parse(line.as_bytes()).as_ref(), Ok(want), "{line}");
        }
        let err: &[(&str, u16, &str)] = &[
            ("", 500, "5.5.1"),
            ("FOO", 500, "5.5.1"),
            ("EHLO", 501, "5.5.4"),
            ("EHLO a b", 501, "5.5.4"),
            ("MAIL", 501, "5.5.4"),
            ("MAIL TO:<a@b>", 501, "5.5.4"),
            ("MAIL FROM:<a@b.example", 501, "5.1.3"),
            ("MAIL FROM:<a b@c>", 501, "5.1.3"),
            ("MAIL FROM:<nodomain>", 501, "5.1.3"),
            ("MAIL FROM:<a@b.example> SIZE=x", 501, "5.5.4"),
            ("MAIL FROM:<a@b.example> RET=FULL", 555, "5.5.4"),
            ("MAIL FROM:<jörg@bü.example>", 553, "5.6.7"),
            ("RCPT TO:<>", 501, "5.1.3"),
            ("RCPT TO:<a@b.example> NOTIFY=NEVER", 555, "5.5.4"),
            ("RCPT TO:<a@-b.example>", 501, "5.1.3"),
            ("RCPT TO:<a@b..example>", 501, "5.1.3"),
            ("RCPT TO:<.a@b.example>", 501, "5.1.3"),
            // Found by the fuzzer: a bracket inside a quoted local part, no angle brackets.
            ("RCPT TO:\"7\u{e0b}>7:\"@L", 501, "5.1.3"),
            ("RCPT TO:<\"a>b\"@x.example>", 501, "5.1.3"),
            ("RCPT FROM:<a@b.example>", 501, "5.5.4"),
            ("DATA now", 501, "5.5.4"),
            ("VRFY", 501, "5.5.4"),
            ("AUTH", 501, "5.5.4"),
            ("AUTH PLAIN a b", 501, "5.5.4"),
        ];
        for (line, code, enhanced) in err {
            let reply = parse(line.as_bytes()).expect_err(line);
            assert_eq!(
                (reply.code, reply.enhanced.as_deref()),
                (*code, Some(*enhanced)),
                "{line}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_a_syntax_error() {
        assert_eq!(parse(b"EHLO \xff").unwrap_err().code, 500);
    }
}
