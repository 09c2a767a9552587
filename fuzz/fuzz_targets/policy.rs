//! Any message: the From rewrite leaves exactly one From field and an approved envelope
//! sender, or refuses; never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use project_relay::Config;
use project_relay::policy;

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
    }
});
