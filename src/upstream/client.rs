//! The client side of one upstream SMTP session: greeting, EHLO, STARTTLS, AUTH, one
//! transaction at a time, QUIT. It knows whether its own stream is encrypted, reads replies
//! with bounded lines, and pipelines MAIL and RCPT when the upstream offers PIPELINING
//! (RFC 2920).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Stage, UpstreamError};

/// One reply line longer than this is a broken upstream, not a reason to buffer more.
const MAX_REPLY_LINE: u64 = 4096;
/// Lines in one multi-line reply (an EHLO with many extensions has about twenty).
const MAX_REPLY_LINES: usize = 100;
/// Before the end marker goes out, the message's last stretch of about this size is held back.
const WRITE_CHUNK: usize = 64 * 1024;

/// One reply: its code and its text lines (without the code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The text of all lines on one line.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

/// What the upstream said it can do after EHLO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE n` with n > 0: the largest message it takes. `SIZE` or `SIZE 0`: no fixed limit.
    pub size: Option<u64>,
    pub size_declared: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// Upper-case SASL mechanism names.
    pub auth: Vec<String>,
}

impl Extensions {
    /// From the lines of a positive EHLO reply (the first line is the server's name).
    pub fn parse(lines: &[String]) -> Extensions {
        let mut ext = Extensions::default();
        for line in lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => {
                    ext.size_declared = true;
                    ext.size = words.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0);
                }
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                // `AUTH=PLAIN LOGIN` is the form some old servers still send.
                k if k == "AUTH" || k.starts_with("AUTH=") => {
                    let first = k.strip_prefix("AUTH=").filter(|m| !m.is_empty());
                    for m in first
                        .into_iter()
                        .map(str::to_owned)
                        .chain(words.map(str::to_owned))
                    {
                        let m = m.to_ascii_uppercase();
                        if !ext.auth.contains(&m) {
                            ext.auth.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
        ext
    }
}

/// The transport under the session: TCP until TLS is negotiated.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open SMTP session with an upstream, between transactions.
pub struct Session {
    io: BufReader<Stream>,
    /// True once this session's own TLS handshake (implicit or after STARTTLS) succeeded.
    pub encrypted: bool,
    pub ext: Extensions,
    /// Set when the upstream answered 421: it is closing, the session is not reused.
    pub closing: bool,
    /// Set when a transaction could not be reset: the session is not reused.
    pub dirty: bool,
}

/// How far a transaction got, kept outside it so that a timeout can still tell whether the
/// end of data was sent (and so whether the message may have been delivered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub data_sent: bool,
}

/// The envelope and message of one transaction.
pub struct Envelope<'a> {
    pub from: &'a str,
    pub to: &'a [String],
    /// The unstuffed message in pieces; every line ends in CRLF.
    pub message: &'a [&'a [u8]],
    pub size: u64,
}

fn lost(stage: Stage, e: &io::Error) -> UpstreamError {
    UpstreamError::Lost {
        stage,
        detail: e.to_string(),
    }
}

impl Session {
    /// Reads the greeting, then EHLO (HELO when EHLO is not understood).
    pub async fn open(
        stream: Stream,
        encrypted: bool,
        helo: &str,
    ) -> Result<Session, UpstreamError> {
        let mut s = Session {
            io: BufReader::with_capacity(4096, stream),
            encrypted,
            ext: Extensions::default(),
            closing: false,
            dirty: false,
        };
        let greeting = s.read_reply(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(s.refused(Stage::Greeting, greeting));
        }
        s.hello(helo).await?;
        Ok(s)
    }

    async fn hello(&mut self, helo: &str) -> Result<(), UpstreamError> {
        let reply = self
            .command(Stage::Ehlo, &format!("EHLO {helo}\r\n"))
            .await?;
        if reply.code == 250 {
            self.ext = Extensions::parse(&reply.lines);
            return Ok(());
        }
        if !(500..600).contains(&reply.code) {
            return Err(self.refused(Stage::Ehlo, reply));
        }
        let reply = self
            .command(Stage::Ehlo, &format!("HELO {helo}\r\n"))
            .await?;
        if reply.code != 250 {
            return Err(self.refused(Stage::Ehlo, reply));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    /// STARTTLS, the handshake, and EHLO again (RFC 3207 §4.2: forget what was said in clear).
    pub async fn starttls(
        self,
        tls: &TlsConnector,
        host: &str,
        helo: &str,
    ) -> Result<Session, UpstreamError> {
        let mut s = self;
        let reply = s.command(Stage::StartTls, "STARTTLS\r\n").await?;
        if reply.code != 220 {
            return Err(UpstreamError::Tls(format!(
                "{host}: STARTTLS refused: {} {}",
                reply.code,
                reply.text()
            )));
        }
        // Bytes after the 220, before the handshake, would be an injected reply.
        if !s.io.buffer().is_empty() {
            return Err(UpstreamError::Protocol(format!(
                "{host}: sent data after its STARTTLS reply"
            )));
        }
        let Stream::Plain(tcp) = s.io.into_inner() else {
            return Err(UpstreamError::Tls(format!("{host}: TLS is already active")));
        };
        let stream = handshake(tls, host, tcp).await?;
        let mut s = Session::open_after_tls(stream);
        s.hello(helo).await?;
        Ok(s)
    }

    fn open_after_tls(stream: Stream) -> Session {
        Session {
            io: BufReader::with_capacity(4096, stream),
            encrypted: true,
            ext: Extensions::default(),
            closing: false,
            dirty: false,
        }
    }

    /// AUTH with `mechanism` (PLAIN, LOGIN or XOAUTH2's initial response). `Err` holds the
    /// upstream's refusal, with the secret never in it.
    pub async fn auth(
        &mut self,
        mechanism: Mechanism<'_>,
        user: &str,
    ) -> Result<(), UpstreamError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let reply = match mechanism {
            Mechanism::Plain(password) => {
                let token = b64.encode(format!("\0{user}\0{password}"));
                self.command(Stage::Auth, &format!("AUTH PLAIN {token}\r\n"))
                    .await?
            }
            Mechanism::XOAuth2(token) => {
                let response = b64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
                self.command(Stage::Auth, &format!("AUTH XOAUTH2 {response}\r\n"))
                    .await?
            }
            Mechanism::Login(password) => {
                let first = self.command(Stage::Auth, "AUTH LOGIN\r\n").await?;
                if first.code != 334 {
                    first
                } else {
                    let second = self
                        .command(Stage::Auth, &format!("{}\r\n", b64.encode(user)))
                        .await?;
                    if second.code != 334 {
                        second
                    } else {
                        self.command(Stage::Auth, &format!("{}\r\n", b64.encode(password)))
                            .await?
                    }
                }
            }
        };
        let reply = if reply.code == 334 {
            // A challenge we did not expect, or an error in a challenge (Google answers a
            // refused XOAUTH2 token with a 334 carrying JSON): cancel the exchange with an
            // empty line and read the final reply (RFC 4954 §4).
            self.command(Stage::Auth, "\r\n").await?
        } else {
            reply
        };
        // 235 is the success RFC 4954 names; some servers (Postfix's smtp-sink among them)
        // say 250, and any 2xx accepts.
        if (200..300).contains(&reply.code) {
            Ok(())
        } else {
            Err(self.refused(Stage::Auth, reply))
        }
    }

    /// MAIL, every RCPT, DATA and the message. A refused recipient ends the transaction with
    /// RSET before any data is sent: no message is delivered to only some recipients.
    pub async fn transact(
        &mut self,
        env: &Envelope<'_>,
        progress: &mut Progress,
    ) -> Result<Response, UpstreamError> {
        let mut params = String::new();
        if self.ext.size_declared {
            params.push_str(&format!(" SIZE={}", env.size));
        }
        if !env.message.iter().all(|p| p.is_ascii()) {
            if !self.ext.eight_bit_mime {
                return Err(UpstreamError::CannotCarry(
                    "an 8-bit message needs 8BITMIME, which it does not offer",
                ));
            }
            params.push_str(" BODY=8BITMIME");
        }
        if !env.from.is_ascii() || env.to.iter().any(|t| !t.is_ascii()) {
            if !self.ext.smtputf8 {
                return Err(UpstreamError::CannotCarry(
                    "a non-ASCII address needs SMTPUTF8, which it does not offer",
                ));
            }
            params.push_str(" SMTPUTF8");
        }
        progress.stage = Stage::Mail;
        let mail = format!("MAIL FROM:<{}>{params}\r\n", env.from);
        let rcpts: Vec<String> = env
            .to
            .iter()
            .map(|t| format!("RCPT TO:<{t}>\r\n"))
            .collect();
        if self.ext.pipelining {
            // RFC 2920: the envelope in one write, then its replies in order. With one
            // recipient DATA goes in the batch too: if that recipient is refused, the
            // upstream has no recipient and refuses DATA, so nothing is sent and the
            // connection stays. With several, an upstream that refused only some would still
            // answer DATA with 354, and the only way out of that without delivering to the
            // rest is to drop the connection: DATA then waits for every RCPT reply.
            let with_data = rcpts.len() == 1;
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            if with_data {
                batch.extend_from_slice(b"DATA\r\n");
            }
            self.write(Stage::Mail, &batch).await?;
            let mail_reply = self.read_reply(Stage::Mail).await?;
            progress.stage = Stage::Rcpt;
            let mut refusal = None;
            // After a 421 the upstream says no more (it may have said it unprompted, before
            // closing an idle connection): the rest of the batch gets no replies.
            let mut closing = mail_reply.code == 421;
            for _ in &rcpts {
                if closing {
                    break;
                }
                match self.read_reply(Stage::Rcpt).await {
                    Ok(reply) => {
                        closing = reply.code == 421;
                        if !reply.is_positive() && refusal.is_none() {
                            refusal = Some(reply);
                        }
                    }
                    // The refusal of MAIL is the news, not what followed it.
                    Err(_) if !mail_reply.is_positive() => {
                        self.dirty = true;
                        closing = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            progress.stage = Stage::Data;
            let data_reply = if closing || !with_data {
                None
            } else {
                match self.read_reply(Stage::Data).await {
                    Ok(reply) => Some(reply),
                    Err(_) if !mail_reply.is_positive() || refusal.is_some() => {
                        self.dirty = true;
                        None
                    }
                    Err(e) => return Err(e),
                }
            };
            let ready = data_reply.as_ref().is_some_and(|r| r.code == 354);
            if !mail_reply.is_positive() || refusal.is_some() {
                // Refused, yet an upstream (out of line) waits for the message: it is never
                // sent, not even an empty one. The connection is dropped without the end
                // marker, so the upstream discards the transaction.
                if ready {
                    self.closing = true;
                }
                let (stage, reply) = match refusal {
                    Some(r) if mail_reply.is_positive() => (Stage::Rcpt, r),
                    _ => (Stage::Mail, mail_reply),
                };
                let err = self.refused(stage, reply);
                if !ready && stage == Stage::Rcpt {
                    self.reset_after_refusal().await;
                }
                return Err(err);
            }
            let data_reply = match data_reply {
                Some(reply) => reply,
                None if !with_data && !closing => self.command(Stage::Data, "DATA\r\n").await?,
                None => {
                    return Err(UpstreamError::Lost {
                        stage: Stage::Data,
                        detail: "no reply to DATA".into(),
                    });
                }
            };
            if data_reply.code != 354 {
                let err = self.refused(Stage::Data, data_reply);
                self.reset_after_refusal().await;
                return Err(err);
            }
        } else {
            let mail_reply = self.command(Stage::Mail, &mail).await?;
            if !mail_reply.is_positive() {
                return Err(self.refused(Stage::Mail, mail_reply));
            }
            progress.stage = Stage::Rcpt;
            for r in &rcpts {
                let reply = self.command(Stage::Rcpt, r).await?;
                if !reply.is_positive() {
                    let err = self.refused(Stage::Rcpt, reply);
                    self.reset_after_refusal().await;
                    return Err(err);
                }
            }
            progress.stage = Stage::Data;
            let reply = self.command(Stage::Data, "DATA\r\n").await?;
            if reply.code != 354 {
                let err = self.refused(Stage::Data, reply);
                self.reset_after_refusal().await;
                return Err(err);
            }
        }
        progress.stage = Stage::EndOfData;
        self.send_message(env.message, progress).await?;
        let reply = self.read_reply(Stage::EndOfData).await?;
        if reply.code == 250 {
            Ok(reply)
        } else {
            Err(self.refused(Stage::EndOfData, reply))
        }
    }

    /// After a refusal the client hears about the refusal, not about RSET: a session that
    /// cannot be reset is only marked unfit for reuse.
    async fn reset_after_refusal(&mut self) {
        if self.closing {
            return;
        }
        match self.command(Stage::Reset, "RSET\r\n").await {
            Ok(reply) if reply.code == 250 => {}
            Ok(reply) => {
                self.refused(Stage::Reset, reply);
                self.dirty = true;
            }
            Err(_) => self.dirty = true,
        }
    }

    /// Fit to carry another transaction.
    pub fn reusable(&self) -> bool {
        !self.closing && !self.dirty
    }

    /// QUIT and wait for its reply, so the upstream logs a clean end. The caller bounds it.
    pub async fn quit(mut self) {
        if !self.closing {
            let _ = self.command(Stage::Quit, "QUIT\r\n").await;
        }
        let _ = self.io.get_mut().shutdown().await;
    }

    /// The message dot-stuffed, then the end marker. It goes out from the message's own
    /// bytes in vectored writes: a staging copy would cost every message a copy and every
    /// session in DATA room for it.
    async fn send_message(
        &mut self,
        message: &[&[u8]],
        progress: &mut Progress,
    ) -> Result<(), UpstreamError> {
        let mut pieces = stuffed(message);
        let body: usize = pieces.iter().map(|p| p.len()).sum();
        let mut at = Cursor::default();
        // All but the last stretch goes before the end marker is in any write, so a failure
        // there still means the upstream cannot have the message.
        while body - at.written > WRITE_CHUNK {
            self.write_some(&pieces, &mut at).await?;
        }
        if pieces.last().is_some_and(|p| !p.ends_with(b"\n")) {
            pieces.push(b"\r\n");
        }
        pieces.push(b".\r\n");
        // From here the upstream may have the whole message, whatever happens next.
        progress.data_sent = true;
        while at.piece < pieces.len() {
            self.write_some(&pieces, &mut at).await?;
        }
        self.io
            .get_mut()
            .flush()
            .await
            .map_err(|e| lost(Stage::EndOfData, &e))
    }

    /// One vectored write of what is left of `pieces` after `at`.
    async fn write_some(&mut self, pieces: &[&[u8]], at: &mut Cursor) -> Result<(), UpstreamError> {
        let rest = pieces[at.piece..]
            .iter()
            .enumerate()
            .map(|(i, p)| if i == 0 { &p[at.offset..] } else { *p });
        let slices: Vec<io::IoSlice<'_>> = rest.take(MAX_IOV).map(io::IoSlice::new).collect();
        let n = self
            .io
            .get_mut()
            .write_vectored(&slices)
            .await
            .map_err(|e| lost(Stage::EndOfData, &e))?;
        if n == 0 {
            return Err(lost(Stage::EndOfData, &io::ErrorKind::WriteZero.into()));
        }
        at.advance(pieces, n);
        Ok(())
    }

    fn refused(&mut self, stage: Stage, reply: Response) -> UpstreamError {
        if reply.code == 421 {
            self.closing = true;
        }
        UpstreamError::Refused {
            stage,
            code: reply.code,
            text: reply.text(),
        }
    }

    async fn command(&mut self, stage: Stage, line: &str) -> Result<Response, UpstreamError> {
        self.write(stage, line.as_bytes()).await?;
        self.read_reply(stage).await
    }

    async fn write(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), UpstreamError> {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await.map_err(|e| lost(stage, &e))?;
        stream.flush().await.map_err(|e| lost(stage, &e))
    }

    /// One whole reply, every line bounded.
    async fn read_reply(&mut self, stage: Stage) -> Result<Response, UpstreamError> {
        let mut code = None;
        let mut lines = Vec::new();
        let mut line = Vec::with_capacity(128);
        loop {
            line.clear();
            let n = (&mut self.io)
                .take(MAX_REPLY_LINE)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| lost(stage, &e))?;
            if n == 0 {
                return Err(UpstreamError::Lost {
                    stage,
                    detail: "connection closed".into(),
                });
            }
            let bad = |why: &str| UpstreamError::Protocol(format!("{why} in reply to {stage}"));
            let Some(text) = line.strip_suffix(b"\n") else {
                return Err(bad("a reply line too long"));
            };
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let this: u16 = match text.get(..3).and_then(|c| std::str::from_utf8(c).ok()) {
                Some(c) if c.bytes().all(|b| b.is_ascii_digit()) => {
                    c.parse().map_err(|_| bad("a malformed reply"))?
                }
                _ => return Err(bad("a malformed reply")),
            };
            if !(200..600).contains(&this) || code.is_some_and(|c| c != this) {
                return Err(bad("a malformed reply"));
            }
            code = Some(this);
            let more = match text.get(3) {
                None | Some(b' ') => false,
                Some(b'-') => true,
                Some(_) => return Err(bad("a malformed reply")),
            };
            let rest = text.get(4..).unwrap_or_default();
            lines.push(String::from_utf8_lossy(rest).into_owned());
            if !more {
                return Ok(Response { code: this, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(bad("too many reply lines"));
            }
        }
    }
}

/// Slices per vectored write: well under every system's IOV_MAX.
const MAX_IOV: usize = 64;

/// The message as pieces that, written in order, are it dot-stuffed (RFC 5321 §4.5.2): runs
/// of its own bytes, with a lone "." before every line that starts with one. No piece is
/// empty, so a write that ends at a piece's end leaves the cursor at the next one.
fn stuffed<'a>(message: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::with_capacity(message.len() + 2);
    let mut line_start = true;
    for &part in message {
        if part.is_empty() {
            continue;
        }
        let mut from = 0;
        if line_start && part[0] == b'.' {
            pieces.push(&b"."[..]);
        }
        for newline in memchr::memmem::find_iter(part, b"\n.") {
            pieces.push(&part[from..=newline]);
            pieces.push(&b"."[..]);
            from = newline + 1;
        }
        pieces.push(&part[from..]);
        line_start = part.ends_with(b"\n");
    }
    pieces
}

/// How far into a list of pieces the writes have got.
#[derive(Default)]
struct Cursor {
    piece: usize,
    offset: usize,
    written: usize,
}

impl Cursor {
    fn advance(&mut self, pieces: &[&[u8]], mut n: usize) {
        self.written += n;
        while n > 0 {
            let left = pieces[self.piece].len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.piece += 1;
            self.offset = 0;
        }
    }
}

/// A SASL mechanism with its secret.
pub enum Mechanism<'a> {
    Plain(&'a str),
    Login(&'a str),
    /// The bearer token (Microsoft's and Google's SASL XOAUTH2).
    XOAuth2(&'a str),
}

/// The TLS handshake with certificate and name checks.
pub async fn handshake(
    tls: &TlsConnector,
    host: &str,
    tcp: TcpStream,
) -> Result<Stream, UpstreamError> {
    let name = rustls::pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| UpstreamError::Tls(format!("{host}: {e}")))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls(format!("{host}: {e}")))?;
    Ok(Stream::Tls(Box::new(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Stuffing by the book, one byte at a time, to check the pieces against.
    fn stuff_bytes(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut line_start = true;
        for &b in message {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = b == b'\n';
        }
        out
    }

    #[test]
    fn stuffed_pieces_are_the_message_stuffed_wherever_it_is_cut() {
        let message = b"..a\r\n.b\n\r\n.\r\nx.y\r\n..\r\n.";
        for cut in 0..=message.len() {
            for cut2 in cut..=message.len() {
                let parts = [&message[..cut], &message[cut..cut2], &message[cut2..]];
                let pieces = stuffed(&parts);
                assert_eq!(
                    pieces.concat(),
                    stuff_bytes(message),
                    "cut at {cut}, {cut2}"
                );
                assert!(pieces.iter().all(|p| !p.is_empty()), "cut at {cut}, {cut2}");
                // Every write size walks the pieces to their end, once.
                for step in 1..6 {
                    let mut at = Cursor::default();
                    let total: usize = pieces.iter().map(|p| p.len()).sum();
                    while at.written < total {
                        let left = total - at.written;
                        at.advance(&pieces, step.min(left));
                    }
                    assert_eq!(at.piece, pieces.len(), "cut at {cut}, {cut2}, step {step}");
                }
            }
        }
    }

    #[test]
    fn ehlo_extensions() {
        let ext = Extensions::parse(&lines(&[
            "mx.example greets you",
            "PIPELINING",
            "SIZE 10240000",
            "8bitmime",
            "AUTH PLAIN login XOAUTH2",
            "AUTH=PLAIN LOGIN",
            "STARTTLS",
            "SMTPUTF8",
        ]));
        assert!(ext.pipelining && ext.eight_bit_mime && ext.smtputf8 && ext.starttls);
        assert_eq!(ext.size, Some(10_240_000));
        assert_eq!(ext.auth, ["PLAIN", "LOGIN", "XOAUTH2"]);
        let ext = Extensions::parse(&lines(&["mx", "SIZE"]));
        assert!(ext.size_declared && ext.size.is_none());
        let ext = Extensions::parse(&lines(&["mx", "SIZE 0"]));
        assert!(ext.size_declared && ext.size.is_none());
        let ext = Extensions::parse(&lines(&["mx"]));
        assert!(!ext.size_declared && !ext.pipelining && ext.auth.is_empty());
    }
}
