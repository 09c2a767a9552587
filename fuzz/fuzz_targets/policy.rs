//! Any message: the From rewrite leaves exactly one From field and an approved envelope
//! sender, or refuses; never a panic. A From the relay keeps reads, under the strict RFC 5322
//! reader of the tests (written apart from the relay), as exactly the approved mailbox.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use project_relay::Config;
use project_relay::policy::{self, FromDecision};

#[path = "../../tests/common/rfc5322.rs"]
mod rfc5322;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::from_toml_str(
            "[server]\nsupportEmail = \"noreply@example.com\"\napprovedSenderEmails = \"alerts@example.com\"\n[server.capture]\ndir = \"outbox\"\n[projects.acme]\nsmtpHost = \"h\"\nsmtpPort = 25\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@acme.example\"\nsmtpApprovedSenders = \"alice@acme.example\"\n",
            std::path::Path::new("."),
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = policy::decide(config(), data, None) {
        let head = String::from_utf8_lossy(&d.head).into_owned();
        let froms = head
            .split('\n')
            .filter(|l| !l.starts_with([' ', '\t']))
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim_end().eq_ignore_ascii_case("from"))
            .count();
        assert_eq!(froms, 1, "{head}");
        let ok = [
            "alice@acme.example",
            "noreply@acme.example",
            "alerts@example.com",
            "noreply@example.com",
        ];
        assert!(ok.iter().any(|a| a.eq_ignore_ascii_case(&d.envelope_from)));
        if matches!(d.from_decision, FromDecision::Kept | FromDecision::KeptNamed) {
            let value = from_value(&d.head).expect("a From field");
            let list = rfc5322::mailbox_list(value).unwrap_or_else(|| panic!("kept {head}"));
            assert_eq!(list.len(), 1, "{head}");
            assert!(list[0].address.eq_ignore_ascii_case(&d.envelope_from), "{head}");
            assert!(d.envelope_from.eq_ignore_ascii_case("alice@acme.example"));
        }
    }
});

/// The value of the (one) From field in a rewritten header section, folding included.
fn from_value(head: &[u8]) -> Option<&[u8]> {
    let mut start = None;
    let mut pos = 0;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        match start {
            Some(s) if !continuation => return Some(&head[s..pos]),
            None if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:") => {
                start = Some(pos + 5)
            }
            _ => {}
        }
        pos += line.len();
    }
    start.map(|s| &head[s..pos])
}
