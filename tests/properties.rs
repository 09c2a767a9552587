//! Property tests (proptest) for the three pieces that parse hostile input: the command
//! parser, the DATA reader, and the From rewrite.

use std::path::Path;

use project_relay::Config;
use project_relay::policy::{self, Transport};
use project_relay::smtp::command::{self, Command};
use project_relay::smtp::data::{DataReader, MAX_LINE};
use proptest::prelude::*;

#[path = "common/rfc5322.rs"]
mod rfc5322;

fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = true;
    for &b in body {
        if start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn read_in_pieces(input: &[u8], cuts: &[usize]) -> Option<(usize, Result<Vec<u8>, u16>)> {
    let mut reader = DataReader::new(1 << 20, None);
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    let mut pos = 0;
    for cut in cuts {
        // Like a socket: the reader sees what arrived since it last stopped.
        while pos < cut {
            let (used, done) = reader.feed(&input[pos..cut]);
            pos += used;
            if let Some(result) = done {
                return Some((pos, result.map_err(|r| r.code)));
            }
            if used == 0 {
                break;
            }
        }
    }
    None
}

/// Lines of "clean" message text: CRLF endings, no NUL, within the line limit.
fn clean_body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::collection::vec(
            prop_oneof![Just(b'.'), Just(b' '), 0x21u8..0x7f, 0x80u8..=0xff],
            0..120,
        ),
        0..40,
    )
    .prop_map(|lines| {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(b"\r\n");
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn command_parser_never_panics_and_keeps_addresses_clean(line in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(cmd) = command::parse(&line) {
            let addr = match &cmd {
                Command::Mail(m) => Some(m.address.clone()),
                Command::Rcpt(r) => Some(r.clone()),
                _ => None,
            };
            if let Some(a) = addr {
                prop_assert!(!a.contains(['\r', '\n', '\0', '<', '>']), "{a:?}");
            }
        }
    }

    #[test]
    fn command_parser_reads_what_a_client_writes(local in "[a-z0-9][a-z0-9.+_-]{0,20}[a-z0-9]", domain in "[a-z0-9]{1,10}(\\.[a-z]{2,5}){1,2}") {
        let addr = format!("{local}@{domain}");
        prop_assume!(!local.contains(".."));
        let line = format!("MAIL FROM:<{addr}> SIZE=100");
        match command::parse(line.as_bytes()) {
            Ok(Command::Mail(m)) => prop_assert_eq!(m.address, addr),
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn data_reader_gives_the_same_answer_however_the_bytes_arrive(
        data in prop::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), any::<u8>()], 0..400),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut input = data.clone();
        input.extend_from_slice(b"\r\n.\r\n");
        let whole = read_in_pieces(&input, &[]);
        let pieces = read_in_pieces(&input, &cuts);
        prop_assert_eq!(&whole, &pieces);
        let (used, result) = whole.expect("the final CRLF.CRLF always ends the data");
        prop_assert!(used <= input.len());
        if let Ok(out) = result {
            // Never a bare CR or LF in what goes upstream.
            for (i, &b) in out.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert_eq!(out.get(i + 1), Some(&b'\n')); }
            }
        }
    }

    #[test]
    fn data_reader_undoes_stuffing_exactly(body in clean_body(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let wire = stuff(&body);
        let (used, result) = read_in_pieces(&wire, &cuts).expect("end found");
        prop_assert_eq!(used, wire.len());
        let too_long = body.split(|b| *b == b'\n').any(|l| l.len().saturating_sub(1) + usize::from(l.first() == Some(&b'.')) > MAX_LINE);
        if !too_long {
            prop_assert_eq!(result.unwrap(), body);
        }
    }
}

const CONFIG: &str = r#"
[server]
supportEmail = "Example <noreply@example.com>"
approvedSenderEmails = "alerts@example.com"
[server.capture]
dir = "outbox"
[projects.acme]
smtpHost = "smtp.acme.example"
smtpPort = 587
smtpUsername = "u"
smtpPassword = "p"
smtpFromAddress = "Acme <noreply@acme.example>"
smtpApprovedSenders = "alice@acme.example, bob@acme.example"
"#;

fn header_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z-]{1,12}: [ -~]{0,40}".prop_map(|h| format!("{h}\r\n")),
        "[ -~]{0,30}".prop_map(|v| format!("From: {v}\r\n")),
        prop::sample::select(vec![
            "From: alice@acme.example\r\n",
            "From: Bob <BOB@acme.example>\r\n",
            "From: Mallory <mallory@acme.example>\r\n",
            "From: alice@acme.example, bob@acme.example\r\n",
            "from: \"Alice\"\r\n <alice@acme.example>\r\n",
            "Sender: someone@x.example\r\n",
            "X-Project-Id: acme\r\n",
        ])
        .prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn from_rewrite_leaves_one_approved_from_and_everything_else_alone(
        headers in prop::collection::vec(header_line(), 0..8),
        body in "[ -~\r\n]{0,200}",
    ) {
        let config = Config::from_toml_str(CONFIG, Path::new(".")).unwrap();
        let mut msg = headers.concat();
        msg.push_str("\r\n");
        msg.push_str(&body);
        let Ok(d) = policy::decide(&config, msg.as_bytes(), None) else {
            // Refusals (two project headers) are fine; nothing is sent.
            return Ok(());
        };
        let out = String::from_utf8(d.assemble(msg.as_bytes())).unwrap();
        let (head, out_body) = out.split_once("\r\n\r\n").map(|(h, b)| (format!("{h}\r\n"), b.to_owned())).unwrap_or((out.clone(), String::new()));
        // The body is untouched.
        prop_assert_eq!(out_body, body);
        // Exactly one From field, and its address is approved or the default.
        let froms: Vec<&str> = head.split("\r\n").filter(|l| l.len() >= 5 && l[..5].eq_ignore_ascii_case("from:")).collect();
        prop_assert_eq!(froms.len(), 1, "{}", head);
        let approved = match d.transport {
            Transport::Project { .. } => ["alice@acme.example", "bob@acme.example", "noreply@acme.example"],
            Transport::Server(_) => ["alerts@example.com", "noreply@example.com", "noreply@example.com"],
        };
        prop_assert!(approved.iter().any(|a| a.eq_ignore_ascii_case(&d.envelope_from)), "{}", d.envelope_from);
        prop_assert!(!head.to_ascii_lowercase().contains("x-project-id"));
        // Every other header field is still there, in order.
        let kept: Vec<&String> = headers.iter().filter(|h| {
            let l = h.to_ascii_lowercase();
            !l.starts_with("from:") && !l.starts_with("sender:") && !l.starts_with("x-project-id:")
        }).collect();
        let mut rest = head.as_str();
        for h in kept {
            let at = rest.find(h.as_str());
            prop_assert!(at.is_some(), "{h:?} lost from {head:?}");
            rest = &rest[at.unwrap() + h.len()..];
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The admin API's `since` parser takes any text: an answer or a refusal, never a panic.
    #[test]
    fn since_parsing_never_panics(t in any::<String>(), prefix in "[0-9T:-]{0,12}") {
        let _ = project_relay::capture::sortable_time(&t);
        let _ = project_relay::capture::sortable_time(&format!("{prefix}{t}"));
    }
}

/// Pieces of From values that readers are known to disagree on, to be strung together.
fn from_value() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "alice@acme.example",
        "bob@acme.example",
        "evil@evil.example",
        "<alice@acme.example>",
        "<bob@acme.example>",
        "<evil@evil.example>",
        "Alice",
        "\"Al, ice\"",
        "\"bob@acme.example\"",
        "=?UTF-8?B?SsO2cmc=?=",
        "=?utf-8?q?evil=40evil.example?=",
        "(c)",
        "(evil@evil.example)",
        "(",
        ")",
        ",",
        "<",
        ">",
        " ",
        "\r\n ",
        ":",
        ";",
        "@",
        "\"",
        ".",
        "<>",
        "\\",
        "[10.0.0.1]",
        "alice",
        "acme.example",
        "\t",
        "Q.",
    ]);
    prop::collection::vec(piece, 1..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Every From the relay keeps (or keeps and names) reads, under a strict RFC 5322 reader
    /// written apart from the relay, as exactly one mailbox: the approved address that also
    /// goes upstream as MAIL FROM.
    #[test]
    fn a_kept_from_is_exactly_the_approved_mailbox_to_a_strict_reader(
        value in prop_oneof![from_value(), "[ -~]{0,40}"],
        named in any::<bool>(),
    ) {
        let config = if named { format!("{CONFIG}appName = \"Acme App\"\n") } else { CONFIG.to_owned() };
        let config = Config::from_toml_str(&config, Path::new(".")).unwrap();
        let msg = format!("X-Project-Id: acme\r\nFrom: {value}\r\nSubject: s\r\n\r\nbody\r\n");
        let Ok(d) = policy::decide(&config, msg.as_bytes(), None) else { return Ok(()) };
        let head = d.assemble(msg.as_bytes());
        let head = String::from_utf8_lossy(&head);
        let field = head.split("\r\nSubject:").next().unwrap();
        let from = field.strip_prefix("From:").unwrap_or_else(|| panic!("{head}"));
        let strict = rfc5322::mailbox_list(from.as_bytes());
        match d.from_decision {
            policy::FromDecision::Kept | policy::FromDecision::KeptNamed => {
                let strict = strict.unwrap_or_else(|| panic!("kept {from:?}, not RFC 5322"));
                prop_assert_eq!(strict.len(), 1, "{:?}", from);
                prop_assert!(strict[0].address.eq_ignore_ascii_case(&d.envelope_from));
                prop_assert!(["alice@acme.example", "bob@acme.example"].iter().any(|a| a.eq_ignore_ascii_case(&d.envelope_from)));
            }
            _ => {
                // The default From went instead, and it reads as one mailbox too.
                prop_assert_eq!(d.envelope_from.as_str(), "noreply@acme.example");
                prop_assert_eq!(strict.map(|l| l.len()), Some(1), "{:?}", from);
            }
        }
    }
}
