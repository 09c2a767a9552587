//! Any line: the command parser answers with a command or a reply, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use project_relay::smtp::command::{self, Command};

fuzz_target!(|line: &[u8]| {
    if let Ok(Command::Mail(m)) = command::parse(line) {
        assert!(!m.address.contains(['\r', '\n', '<', '>']));
    }
    if let Ok(Command::Rcpt(r)) = command::parse(line) {
        assert!(!r.contains(['\r', '\n', '<', '>']));
    }
});
