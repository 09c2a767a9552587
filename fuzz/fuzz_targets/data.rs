//! Any byte stream, cut anywhere: the DATA reader gives the same answer whole or in pieces,
//! and what it accepts has no bare CR or LF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use project_relay::smtp::data::DataReader;

fn read(input: &[u8], cut: usize) -> Option<(usize, Result<Vec<u8>, u16>)> {
    let mut reader = DataReader::new(1 << 16);
    let mut pos = 0;
    for end in [cut.min(input.len()), input.len()] {
        while pos < end {
            let (used, done) = reader.feed(&input[pos..end]);
            pos += used;
            if let Some(r) = done {
                return Some((pos, r.map_err(|reply| reply.code)));
            }
            if used == 0 {
                break;
            }
        }
    }
    None
}

fuzz_target!(|input: &[u8]| {
    let cut = input.first().copied().unwrap_or(0) as usize;
    let whole = read(input, input.len());
    assert_eq!(whole, read(input, cut));
    if let Some((_, Ok(out))) = whole {
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r');
            }
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'));
            }
        }
    }
});
