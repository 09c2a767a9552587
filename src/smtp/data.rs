//! The DATA reader: finds the end of the message (only CRLF.CRLF), removes dot-stuffing,
//! normalises bare CR and bare LF to CRLF, and bounds size and line length (RFC 5321 §4.5.2).
//!
//! Why normalise rather than pass through: a bare CR or LF forwarded raw lets a lenient next hop
//! see a message boundary that we did not (SMTP smuggling). After normalisation the upstream gets
//! a message where every line ends in CRLF, and the client's `\n.\n` or `\r\n.\r\r\n` becomes an
//! ordinary content line (which the upstream client stuffs again), never an end of data.

use super::reply::Reply;

/// RFC 5321 §4.5.3.1.6: 1000 octets per line including the CRLF.
pub const MAX_LINE: usize = 998;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line; `after_crlf` is false when the previous line ended in a bare
    /// CR or LF, because only a dot line between two real CRLFs ends the data.
    LineStart {
        after_crlf: bool,
    },
    /// A line that began with a dot; the dot is held back until we know whether it is
    /// stuffing, a lone content dot, or the end marker.
    Dot {
        after_crlf: bool,
    },
    DotCr {
        after_crlf: bool,
    },
    InLine,
    Cr,
}

/// What a message gets to start with when its size is not declared: a typical mail fits.
const INITIAL_ROOM: usize = 8 * 1024;
/// The most a declared SIZE reserves in advance.
const DECLARED_ROOM_MAX: usize = 1024 * 1024;

#[derive(Debug)]
pub struct DataReader {
    state: State,
    out: Vec<u8>,
    max_size: usize,
    line_len: usize,
    /// Set once the message is refused for its size or abandoned: the rest is read and
    /// dropped, so the session stays in step, and this is the answer at the end.
    refused: Option<Reply>,
    long_line: bool,
    nul: bool,
}

/// The finished message: its unstuffed bytes, every line ending in CRLF (the CRLF before the
/// end marker belongs to the last line), or the reply that refuses it.
pub type DataResult = Result<Vec<u8>, Reply>;

impl DataReader {
    /// `declared` is the client's SIZE, if it gave one: room for that much is taken at once
    /// (up to `DECLARED_ROOM_MAX`, since a client can declare anything), otherwise the room
    /// grows with the message from what most messages need.
    pub fn new(max_size: usize, declared: Option<u64>) -> DataReader {
        let room = declared
            .map_or(INITIAL_ROOM, |n| {
                usize::try_from(n).unwrap_or(usize::MAX).saturating_add(2)
            })
            .min(DECLARED_ROOM_MAX)
            .min(max_size);
        DataReader {
            state: State::LineStart { after_crlf: true },
            out: Vec::with_capacity(room),
            max_size,
            line_len: 0,
            refused: None,
            long_line: false,
            nul: false,
        }
    }

    /// Consumes bytes up to and including the end marker. Returns how many bytes were used and,
    /// once the end marker has been seen, the result; the bytes after it are the next command.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<DataResult>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::InLine => {
                    // Copy the run of ordinary bytes in one go.
                    let run =
                        memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.push(&input[i..i + run]);
                        self.line_len += run;
                        i += run;
                        continue;
                    }
                    match b {
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.end_line(false),
                        _ => {
                            self.nul = true;
                            self.line_len += 1;
                        }
                    }
                    i += 1;
                }
                State::Cr => {
                    if b == b'\n' {
                        self.end_line(true);
                        i += 1;
                    } else {
                        // A bare CR ends the line; this byte starts the next one.
                        self.end_line(false);
                    }
                }
                State::LineStart { after_crlf } => {
                    if b == b'.' {
                        self.state = State::Dot { after_crlf };
                        self.line_len = 1;
                        i += 1;
                    } else {
                        self.state = State::InLine;
                    }
                }
                State::Dot { after_crlf } => match b {
                    b'\r' => {
                        self.state = State::DotCr { after_crlf };
                        i += 1;
                    }
                    b'\n' => {
                        // `.` ended by a bare LF: content, never the end.
                        self.push(b".");
                        self.end_line(false);
                        i += 1;
                    }
                    _ => {
                        // Dot-stuffing: drop the leading dot, the rest of the line is content.
                        self.state = State::InLine;
                    }
                },
                State::DotCr { after_crlf } => {
                    if b == b'\n' && after_crlf {
                        i += 1;
                        return (i, Some(self.finish()));
                    }
                    self.push(b".");
                    if b == b'\n' {
                        self.end_line(true);
                        i += 1;
                    } else {
                        self.end_line(false);
                    }
                }
            }
        }
        (i, None)
    }

    /// Memory the message holds so far.
    pub fn buffered(&self) -> usize {
        self.out.capacity()
    }

    /// Gives up on this message: its bytes are dropped now and `reply` ends it.
    pub fn abandon(&mut self, reply: Reply) {
        self.refused.get_or_insert(reply);
        self.out = Vec::new();
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        if self.out.len() + bytes.len() > self.max_size {
            self.abandon(Reply::TOO_LARGE);
            return;
        }
        self.out.extend_from_slice(bytes);
    }

    fn end_line(&mut self, real_crlf: bool) {
        if self.line_len > MAX_LINE {
            self.long_line = true;
        }
        self.push(b"\r\n");
        self.line_len = 0;
        self.state = State::LineStart {
            after_crlf: real_crlf,
        };
    }

    fn finish(&mut self) -> DataResult {
        if let Some(reply) = self.refused.take() {
            Err(reply)
        } else if self.nul {
            Err(Reply::NUL_IN_DATA)
        } else if self.long_line {
            Err(Reply::LONG_TEXT_LINE)
        } else {
            Ok(std::mem::take(&mut self.out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole, then byte by byte, and checks both give the same answer.
    fn read(input: &[u8]) -> Option<(usize, DataResult)> {
        let mut whole = DataReader::new(1 << 20, None);
        let (n, result) = whole.feed(input);
        let whole_result = result.map(|r| (n, r));

        let mut bytewise = DataReader::new(1 << 20, None);
        let mut split_result = None;
        for (i, b) in input.iter().enumerate() {
            let (used, result) = bytewise.feed(std::slice::from_ref(b));
            assert_eq!(used, 1);
            if let Some(r) = result {
                split_result = Some((i + 1, r));
                break;
            }
        }
        assert_eq!(whole_result, split_result, "split feeding disagrees");
        whole_result
    }

    fn body(input: &[u8]) -> Vec<u8> {
        let (n, r) = read(input).expect("end of data");
        assert_eq!(n, input.len(), "end marker should be the last bytes");
        r.expect("accepted")
    }

    #[test]
    fn plain_message() {
        assert_eq!(
            body(b"Subject: x\r\n\r\nhi\r\n.\r\n"),
            b"Subject: x\r\n\r\nhi\r\n"
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(body(b".\r\n"), b"");
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(
            body(b"..\r\n..x\r\n.y\r\nz.\r\n.\r\n"),
            b".\r\n.x\r\ny\r\nz.\r\n"
        );
    }

    #[test]
    fn bytes_after_end_are_left() {
        let (n, r) = read(b"a\r\n.\r\nQUIT\r\n").unwrap();
        assert_eq!(n, 6);
        assert_eq!(r.unwrap(), b"a\r\n");
    }

    #[test]
    fn eight_bit_passes() {
        assert_eq!(body("é ü\r\n.\r\n".as_bytes()), "é ü\r\n".as_bytes());
    }

    #[test]
    fn bare_lf_and_cr_are_normalised() {
        assert_eq!(
            body(b"a\nb\rc\r\r\nd\r\n.\r\n"),
            b"a\r\nb\r\nc\r\n\r\nd\r\n"
        );
    }

    /// Every smuggling sequence the issue names, in the middle of a body and as the first bytes
    /// after the 354: none may end the data, and the smuggled commands stay content.
    #[test]
    fn smuggling_sequences_never_end_data() {
        let fakes: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n.\r\r\n",
            b"\r\n\x00.\r\n",
            b"\r.\r",
            b"\n.\r",
        ];
        let smuggled = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n";
        for fake in fakes {
            for prefix in [&b"Subject: a\r\n\r\nbody"[..], &b""[..]] {
                let mut input = prefix.to_vec();
                input.extend_from_slice(fake);
                input.extend_from_slice(smuggled);
                input.extend_from_slice(b"tail\r\n.\r\n");
                let (n, result) = read(&input).expect("real end found");
                assert_eq!(n, input.len(), "{fake:?} ended data early");
                if let Ok(out) = result {
                    // Never a bare CR or LF left, and no line is a lone dot after CRLF framing
                    // other than as content the upstream client will stuff.
                    assert!(
                        !has_bare_cr_or_lf(&out),
                        "{fake:?} left bare CR/LF: {out:?}"
                    );
                    assert!(out.ends_with(b"tail\r\n"));
                    let text = String::from_utf8_lossy(&out);
                    assert!(text.contains("MAIL FROM:<evil@x.example>\r\n"));
                }
            }
        }
    }

    fn has_bare_cr_or_lf(b: &[u8]) -> bool {
        b.iter().enumerate().any(|(i, &c)| {
            (c == b'\r' && b.get(i + 1) != Some(&b'\n'))
                || (c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
        })
    }

    #[test]
    fn lone_dot_between_bare_endings_is_content() {
        assert_eq!(body(b"a\n.\nb\r\n.\r\n"), b"a\r\n.\r\nb\r\n");
        assert_eq!(body(b"a\r\n.\r\r\nb\r\n.\r\n"), b"a\r\n.\r\n\r\nb\r\n");
    }

    #[test]
    fn nul_is_refused() {
        let (_, r) = read(b"a\x00b\r\n.\r\n").unwrap();
        assert_eq!(r.unwrap_err().code, 550);
    }

    #[test]
    fn room_follows_the_declared_size_within_bounds() {
        // Declared: taken at once, so a large message is not copied as it grows.
        assert!(DataReader::new(1 << 30, Some(300_000)).buffered() >= 300_002);
        // A client can declare anything: neither the limit nor the cap is passed.
        assert!(DataReader::new(1 << 30, Some(u64::MAX)).buffered() <= DECLARED_ROOM_MAX);
        assert!(DataReader::new(5_000, Some(4_000_000)).buffered() <= 5_000);
        // Undeclared: what a typical mail needs, not room for a large one.
        assert!(DataReader::new(1 << 30, None).buffered() <= INITIAL_ROOM);
    }

    #[test]
    fn size_cap() {
        let mut r = DataReader::new(10, None);
        let (_, res) = r.feed(b"0123456789\r\n.\r\n");
        assert_eq!(res.unwrap().unwrap_err(), Reply::TOO_LARGE);
        let mut r = DataReader::new(12, None);
        let (_, res) = r.feed(b"0123456789\r\n.\r\n");
        assert_eq!(res.unwrap().unwrap(), b"0123456789\r\n");
    }

    #[test]
    fn abandoned_message_is_read_to_its_end_and_refused() {
        let mut r = DataReader::new(1000, None);
        let (_, done) = r.feed(b"first part\r\n");
        assert!(done.is_none());
        assert!(r.buffered() > 0);
        r.abandon(Reply::INSUFFICIENT_STORAGE);
        assert_eq!(r.buffered(), 0);
        let (n, done) = r.feed(b"more\r\n.\r\nNOOP\r\n");
        assert_eq!(n, 9);
        assert_eq!(done.unwrap().unwrap_err(), Reply::INSUFFICIENT_STORAGE);
    }

    #[test]
    fn line_length_limit() {
        let mut ok = vec![b'a'; MAX_LINE];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(read(&ok).unwrap().1.is_ok());
        let mut long = vec![b'a'; MAX_LINE + 1];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&long).unwrap().1.unwrap_err(), Reply::LONG_TEXT_LINE);
        // The stuffed dot counts: it is on the wire.
        let mut stuffed = vec![b'.'; MAX_LINE + 1];
        stuffed.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            read(&stuffed).unwrap().1.unwrap_err(),
            Reply::LONG_TEXT_LINE
        );
    }

    #[test]
    fn incomplete_needs_more() {
        assert!(read(b"a\r\n.\r").is_none());
        assert!(read(b"a\r\n").is_none());
    }
}
