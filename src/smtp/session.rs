//! The SMTP server state machine: bytes in, `Event`s out. No I/O, no clock.
//!
//! The connection driver hands it whatever bytes it has; `feed` consumes one command (or a
//! chunk of message data) and says what to do next. Pipelined commands are simply several
//! calls to `feed` over the same buffer, so there is always exactly one reply per command.

use std::sync::Arc;

use super::auth::{self, Users};
use super::command::{self, Command};
use super::data::{DataReader, DataResult};
use super::reply::Reply;

/// Octets in a command line, CRLF included. RFC 5321 §4.5.3.1.4 says 512; extensions (SIZE,
/// SMTPUTF8) need more, and 1000 matches the text line limit.
pub const MAX_COMMAND_LINE: usize = 1000;

/// Errors tolerated before the session is closed, like Postfix's `smtpd_hard_error_limit`.
pub const MAX_ERRORS: u32 = 20;

/// Failed AUTH attempts before the session is closed.
pub const MAX_AUTH_FAILURES: u32 = 3;

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// A certificate is configured, so STARTTLS can be offered (on a plain connection).
    pub starttls_available: bool,
    /// Relay users for SMTP AUTH; empty means AUTH is not offered.
    pub users: Arc<Users>,
    /// MAIL needs AUTH first, even from trusted peers.
    pub require_auth: bool,
    /// AUTH may be used without TLS by loopback peers.
    pub allow_plaintext_auth: bool,
}

/// What the accept loop knows about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Loopback, or inside `[listener] allow`: may send without AUTH (unless `require_auth`).
    pub trusted: bool,
    pub loopback: bool,
}

/// A message the client has finished sending; the driver relays it and reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub mail_from: String,
    pub recipients: Vec<String>,
    /// Unstuffed message bytes; every line ends in CRLF.
    pub data: Vec<u8>,
    pub smtputf8: bool,
    /// The project the client authenticated for, if it used AUTH.
    pub auth_project: Option<String>,
    /// The client's address (from the PROXY header when there is one), for the log; set by
    /// the connection driver.
    pub client: Option<std::net::SocketAddr>,
}

#[derive(Debug)]
pub enum Event {
    /// Nothing complete in the input: read more.
    NeedMore,
    Reply(Reply),
    /// Send the reply, then close.
    Close(Reply),
    /// Send the reply, drop any input already buffered (RFC 3207 §4.2), run the handshake,
    /// then call `tls_started`.
    StartTls(Reply),
    /// Relay this message; send whatever reply the relay produces.
    Relay(Transaction),
    /// A failed AUTH: the driver slows the reply down, and closes after it when `close`.
    AuthFailed {
        reply: Reply,
        close: bool,
    },
}

#[derive(Debug)]
enum State {
    Fresh,
    Greeted,
    /// `AUTH PLAIN` sent without its response; the next line is the response.
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass {
        user: String,
    },
    Mail {
        from: command::MailFrom,
    },
    Rcpt {
        from: command::MailFrom,
        recipients: Vec<String>,
    },
    Data {
        from: command::MailFrom,
        recipients: Vec<String>,
        reader: DataReader,
    },
}

#[derive(Debug)]
pub struct Session {
    settings: Settings,
    peer: Peer,
    state: State,
    tls: bool,
    authenticated: Option<String>,
    auth_failures: u32,
    /// An over-long line is being skipped; its reply is sent when its end arrives.
    skipping_line: bool,
    errors: u32,
}

impl Session {
    pub fn new(settings: Settings, tls: bool, peer: Peer) -> Session {
        Session {
            settings,
            peer,
            state: State::Fresh,
            tls,
            authenticated: None,
            auth_failures: 0,
            skipping_line: false,
            errors: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::greeting(&self.settings.hostname)
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// True while no transaction is open: the point where a shutdown may close the session.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Fresh | State::Greeted)
    }

    /// Memory held by the message being received, if any.
    pub fn buffered_data(&self) -> usize {
        match &self.state {
            State::Data { reader, .. } => reader.buffered(),
            _ => 0,
        }
    }

    /// Drops the message being received; `reply` will answer its end of data.
    pub fn abandon_data(&mut self, reply: Reply) {
        if let State::Data { reader, .. } = &mut self.state {
            reader.abandon(reply);
        }
    }

    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data { .. })
    }

    /// After a successful handshake the session starts over, as RFC 3207 §4.2 requires.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.state = State::Fresh;
        self.authenticated = None;
    }

    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    fn auth_offered(&self) -> bool {
        !self.settings.users.is_empty()
            && (self.tls || (self.settings.allow_plaintext_auth && self.peer.loopback))
    }

    /// Consumes input; returns how many bytes were used and what to do.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Event) {
        if let State::Data { reader, .. } = &mut self.state {
            let (used, done) = reader.feed(input);
            return match done {
                None => (used, Event::NeedMore),
                Some(result) => (used, self.finish_data(result)),
            };
        }
        if self.skipping_line {
            // The rest of an over-long line: drop it, and reply once its end arrives.
            return match memchr::memchr(b'\n', input) {
                Some(lf) => {
                    self.skipping_line = false;
                    (lf + 1, self.error(Reply::LINE_TOO_LONG))
                }
                None => (input.len(), Event::NeedMore),
            };
        }
        // A line of MAX_COMMAND_LINE octets, CRLF included, ends within this window.
        let window = &input[..input.len().min(MAX_COMMAND_LINE)];
        let Some(lf) = memchr::memchr(b'\n', window) else {
            if input.len() >= MAX_COMMAND_LINE {
                self.skipping_line = true;
                return self.feed(input);
            }
            return (0, Event::NeedMore);
        };
        let used = lf + 1;
        let line = &input[..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if matches!(
            self.state,
            State::AuthPlain | State::AuthLoginUser | State::AuthLoginPass { .. }
        ) {
            return (used, self.auth_response(line));
        }
        let event = match command::parse(line) {
            Ok(cmd) => self.command(cmd),
            Err(reply) => self.error(reply),
        };
        (used, event)
    }

    fn error(&mut self, reply: Reply) -> Event {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            Event::Close(Reply::TOO_MANY_ERRORS)
        } else {
            Event::Reply(reply)
        }
    }

    fn extensions(&self) -> Vec<String> {
        let mut ext = vec![
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.settings.max_message_size),
            "8BITMIME".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "SMTPUTF8".to_owned(),
        ];
        if self.settings.starttls_available && !self.tls {
            ext.push("STARTTLS".to_owned());
        }
        if self.auth_offered() {
            ext.push("AUTH PLAIN LOGIN".to_owned());
        }
        ext
    }

    fn command(&mut self, cmd: Command) -> Event {
        let state = std::mem::replace(&mut self.state, State::Fresh);
        let (next, event) = match (cmd, state) {
            (Command::Ehlo(_), _) => (
                State::Greeted,
                Event::Reply(Reply::ehlo(&self.settings.hostname, &self.extensions())),
            ),
            (Command::Helo(_), _) => (
                State::Greeted,
                Event::Reply(Reply::helo(&self.settings.hostname)),
            ),
            (Command::Quit, _) => (State::Fresh, Event::Close(Reply::BYE)),
            (Command::Noop, s) => (s, Event::Reply(Reply::OK)),
            (Command::Vrfy, s) => (s, Event::Reply(Reply::VRFY)),
            (Command::Help, s) => (s, Event::Reply(Reply::HELP)),
            (Command::NotImplemented, s) => (s, self.error(Reply::NOT_IMPLEMENTED)),
            (Command::Rset, State::Fresh) => (State::Fresh, Event::Reply(Reply::OK)),
            (Command::Rset, _) => (State::Greeted, Event::Reply(Reply::OK)),
            (Command::StartTls, s) if self.tls => (s, self.error(Reply::TLS_ACTIVE)),
            (Command::StartTls, s) if !self.settings.starttls_available => {
                (s, self.error(Reply::TLS_UNAVAILABLE))
            }
            (Command::StartTls, _) => (State::Fresh, Event::StartTls(Reply::READY_TLS)),
            (_, State::Fresh) => (State::Fresh, self.error(Reply::NEED_HELO)),
            (Command::Auth { .. }, s @ (State::Mail { .. } | State::Rcpt { .. })) => {
                (s, self.error(Reply::AUTH_IN_TRANSACTION))
            }
            (Command::Auth { .. }, s) if self.authenticated.is_some() => {
                (s, self.error(Reply::ALREADY_AUTHENTICATED))
            }
            (Command::Auth { .. }, s) if self.settings.users.is_empty() => {
                (s, self.error(Reply::NOT_IMPLEMENTED))
            }
            (Command::Auth { .. }, s) if !self.auth_offered() => {
                (s, self.error(Reply::ENCRYPTION_REQUIRED))
            }
            (Command::Auth { mechanism, initial }, State::Greeted) => {
                self.auth_start(&mechanism, initial)
            }
            (Command::Mail(_), State::Greeted)
                if self.authenticated.is_none() && !self.peer.trusted =>
            {
                (State::Greeted, self.error(Reply::ACCESS_DENIED))
            }
            (Command::Mail(_), State::Greeted)
                if self.authenticated.is_none() && self.settings.require_auth =>
            {
                (State::Greeted, self.error(Reply::AUTH_REQUIRED))
            }
            (Command::Mail(from), State::Greeted) => {
                if from
                    .size
                    .is_some_and(|n| n > self.settings.max_message_size as u64)
                {
                    (State::Greeted, self.error(Reply::TOO_LARGE))
                } else {
                    (State::Mail { from }, Event::Reply(Reply::SENDER_OK))
                }
            }
            (Command::Mail(_), s) => (s, self.error(Reply::NESTED_MAIL)),
            (Command::Rcpt(_), State::Greeted) => (State::Greeted, self.error(Reply::NEED_MAIL)),
            (Command::Rcpt(to), State::Mail { from }) => self.add_recipient(from, Vec::new(), to),
            (Command::Rcpt(to), State::Rcpt { from, recipients }) => {
                self.add_recipient(from, recipients, to)
            }
            (Command::Data, State::Greeted) => (State::Greeted, self.error(Reply::NEED_MAIL)),
            (Command::Data, s @ State::Mail { .. }) => (s, self.error(Reply::NEED_RCPT)),
            (Command::Data, State::Rcpt { from, recipients }) => (
                State::Data {
                    reader: DataReader::new(self.settings.max_message_size, from.size),
                    from,
                    recipients,
                },
                Event::Reply(Reply::START_DATA),
            ),
            (
                _,
                s @ (State::Data { .. }
                | State::AuthPlain
                | State::AuthLoginUser
                | State::AuthLoginPass { .. }),
            ) => {
                unreachable!("no commands are parsed in {s:?}")
            }
        };
        self.state = next;
        event
    }

    fn auth_start(&mut self, mechanism: &str, initial: Option<String>) -> (State, Event) {
        let initial = match initial.map(|i| auth::b64_decode(i.as_bytes())) {
            Some(None) => return (State::Greeted, self.error(Reply::AUTH_BAD_BASE64)),
            Some(Some(bytes)) => Some(bytes),
            None => None,
        };
        match (mechanism.to_ascii_uppercase().as_str(), initial) {
            ("PLAIN", Some(response)) => (State::Greeted, self.auth_plain(&response)),
            ("PLAIN", None) => (State::AuthPlain, Event::Reply(Reply::auth_challenge(""))),
            ("LOGIN", Some(user)) => (
                State::AuthLoginPass {
                    user: String::from_utf8_lossy(&user).into_owned(),
                },
                Event::Reply(Reply::auth_challenge(&auth::b64_encode(b"Password:"))),
            ),
            ("LOGIN", None) => (
                State::AuthLoginUser,
                Event::Reply(Reply::auth_challenge(&auth::b64_encode(b"Username:"))),
            ),
            _ => (State::Greeted, self.error(Reply::AUTH_MECHANISM)),
        }
    }

    /// A line answering a 334 challenge.
    fn auth_response(&mut self, line: &[u8]) -> Event {
        let state = std::mem::replace(&mut self.state, State::Greeted);
        if line == b"*" {
            return self.error(Reply::AUTH_CANCELLED);
        }
        let Some(decoded) = auth::b64_decode(line) else {
            return self.error(Reply::AUTH_BAD_BASE64);
        };
        match state {
            State::AuthPlain => self.auth_plain(&decoded),
            State::AuthLoginUser => {
                self.state = State::AuthLoginPass {
                    user: String::from_utf8_lossy(&decoded).into_owned(),
                };
                Event::Reply(Reply::auth_challenge(&auth::b64_encode(b"Password:")))
            }
            State::AuthLoginPass { user } => self.auth_check(&user, &decoded),
            other => unreachable!("auth_response in {other:?}"),
        }
    }

    fn auth_plain(&mut self, response: &[u8]) -> Event {
        match auth::decode_plain(response) {
            Some((user, pass)) => self.auth_check(&user, &pass),
            None => self.auth_check("", b""),
        }
    }

    fn auth_check(&mut self, user: &str, password: &[u8]) -> Event {
        match self.settings.users.verify(user, password) {
            Some(project) => {
                self.authenticated = Some(project.to_owned());
                Event::Reply(Reply::AUTH_OK)
            }
            None => {
                self.auth_failures += 1;
                Event::AuthFailed {
                    reply: Reply::AUTH_FAILED,
                    close: self.auth_failures >= MAX_AUTH_FAILURES,
                }
            }
        }
    }

    fn add_recipient(
        &mut self,
        from: command::MailFrom,
        mut recipients: Vec<String>,
        to: String,
    ) -> (State, Event) {
        let event = if recipients.len() >= self.settings.max_recipients {
            Event::Reply(Reply::TOO_MANY_RECIPIENTS)
        } else if !from.smtputf8 && !to.is_ascii() {
            self.error(Reply::SMTPUTF8_NOT_DECLARED)
        } else {
            recipients.push(to);
            Event::Reply(Reply::RECIPIENT_OK)
        };
        let state = if recipients.is_empty() {
            State::Mail { from }
        } else {
            State::Rcpt { from, recipients }
        };
        (state, event)
    }

    fn finish_data(&mut self, result: DataResult) -> Event {
        let State::Data {
            from, recipients, ..
        } = std::mem::replace(&mut self.state, State::Greeted)
        else {
            unreachable!("finish_data outside DATA")
        };
        match result {
            Ok(data) => Event::Relay(Transaction {
                mail_from: from.address,
                recipients,
                data,
                smtputf8: from.smtputf8,
                auth_project: self.authenticated.clone(),
                client: None,
            }),
            Err(reply) => Event::Reply(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRUSTED: Peer = Peer {
        trusted: true,
        loopback: true,
    };

    fn settings() -> Settings {
        Settings {
            hostname: "relay.test".into(),
            max_message_size: 1000,
            max_recipients: 2,
            starttls_available: true,
            users: Arc::default(),
            require_auth: false,
            allow_plaintext_auth: false,
        }
    }

    fn session() -> Session {
        Session::new(settings(), false, TRUSTED)
    }

    /// Runs a whole client transcript and returns each event rendered as text.
    fn run(s: &mut Session, input: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (used, ev) = s.feed(&input[pos..]);
            pos += used;
            match ev {
                Event::NeedMore => break,
                Event::Reply(r) => out.push(r.to_string()),
                Event::Close(r) => {
                    out.push(format!("close {r}"));
                    break;
                }
                Event::StartTls(r) => {
                    out.push(format!("tls {r}"));
                    break;
                }
                Event::AuthFailed { reply, close } => {
                    out.push(format!("authfail {reply}"));
                    if close {
                        break;
                    }
                }
                Event::Relay(tx) => out.push(format!(
                    "relay {} {:?} {}",
                    tx.mail_from,
                    tx.recipients,
                    String::from_utf8_lossy(&tx.data).escape_debug()
                )),
            }
        }
        out
    }

    fn codes(lines: &[String]) -> Vec<&str> {
        lines.iter().map(|l| &l[..3]).collect()
    }

    #[test]
    fn happy_path_pipelined() {
        let mut s = session();
        let out = run(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(out[0].lines().next(), Some("250-relay.test"));
        assert!(out[0].ends_with("250 STARTTLS"));
        assert_eq!(
            &out[1..4],
            [
                "250 2.1.0 Sender ok",
                "250 2.1.5 Recipient ok",
                "354 End data with <CR><LF>.<CR><LF>"
            ]
        );
        assert_eq!(out[4], "relay a@b.example [\"c@d.example\"] hi\\r\\n");
        assert_eq!(out[5], "close 221 2.0.0 Bye");
    }

    #[test]
    fn sequencing_errors() {
        let mut s = session();
        let out = run(
            &mut s,
            b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nRCPT TO:<c@d.example>\r\nDATA\r\nMAIL FROM:<a@b.example>\r\nDATA\r\nMAIL FROM:<a@b.example>\r\n",
        );
        assert_eq!(
            codes(&out),
            ["503", "250", "503", "503", "250", "503", "503"]
        );
        assert!(out[2].contains("Send MAIL first"));
        assert!(out[5].contains("Send RCPT first"));
        assert!(out[6].contains("Sender already specified"));
    }

    #[test]
    fn rset_clears_the_transaction() {
        let mut s = session();
        let out = run(
            &mut s,
            b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<c@d.example>\r\nNOOP\r\nVRFY x\r\nHELP\r\n",
        );
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "503", "250", "252", "214"]
        );
    }

    #[test]
    fn recipient_limit() {
        let mut s = session();
        let out = run(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\nDATA\r\n.\r\n",
        );
        assert_eq!(out[4], "452 4.5.3 Too many recipients");
        assert!(out[6].starts_with("relay  [\"a@x.example\", \"b@x.example\"]"));
    }

    #[test]
    fn declared_size_too_large() {
        let mut s = session();
        let out = run(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=1001\r\n");
        assert_eq!(
            out[1],
            "552 5.3.4 Message size exceeds fixed maximum message size"
        );
    }

    #[test]
    fn data_too_large_keeps_session() {
        let mut s = session();
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n".to_vec();
        for _ in 0..30 {
            input.extend_from_slice(&[b'x'; 50]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b".\r\nNOOP\r\n");
        let out = run(&mut s, &input);
        assert_eq!(codes(&out), ["250", "250", "250", "354", "552", "250"]);
    }

    #[test]
    fn long_command_line_is_refused_and_session_goes_on() {
        let mut s = session();
        let mut input = b"EHLO c\r\nNOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        // Feed in small chunks, as a socket would deliver them.
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for chunk in input.chunks(300) {
            buf.extend_from_slice(chunk);
            loop {
                let (used, ev) = s.feed(&buf);
                buf.drain(..used);
                match ev {
                    Event::NeedMore => break,
                    Event::Reply(r) => out.push(r.to_string()),
                    other => panic!("{other:?}"),
                }
            }
            assert!(
                buf.len() <= MAX_COMMAND_LINE + 300,
                "buffer must stay bounded"
            );
        }
        assert_eq!(out[1], "500 5.5.2 Line too long");
        assert_eq!(out[2], "250 2.0.0 Ok");
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn command_line_limit_is_exact() {
        let mut s = session();
        let mut ok = b"NOOP ".to_vec();
        ok.resize(MAX_COMMAND_LINE - 2, b'x');
        ok.extend_from_slice(b"\r\n");
        assert_eq!(run(&mut s, &ok), ["250 2.0.0 Ok"]);
        let mut long = b"NOOP ".to_vec();
        long.resize(MAX_COMMAND_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(run(&mut s, &long), ["500 5.5.2 Line too long"]);
    }

    #[test]
    fn long_command_line_in_one_piece() {
        let mut s = session();
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let out = run(&mut s, &input);
        assert_eq!(out, ["500 5.5.2 Line too long", "250 2.0.0 Ok"]);
    }

    #[test]
    fn starttls_resets_session_and_is_not_offered_twice() {
        let mut s = session();
        let out = run(&mut s, b"EHLO c\r\nSTARTTLS\r\n");
        assert_eq!(out[1], "tls 220 2.0.0 Ready to start TLS");
        s.tls_started();
        let out = run(&mut s, b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nSTARTTLS\r\n");
        assert_eq!(codes(&out), ["503", "250", "503"]);
        assert!(!out[1].contains("STARTTLS"));
    }

    #[test]
    fn starttls_without_certificate() {
        let mut s = Session::new(
            Settings {
                starttls_available: false,
                ..settings()
            },
            false,
            TRUSTED,
        );
        let out = run(&mut s, b"EHLO c\r\nSTARTTLS\r\n");
        assert!(!out[0].contains("STARTTLS"));
        assert_eq!(out[1], "454 4.7.0 TLS not available");
    }

    #[test]
    fn too_many_errors_close() {
        let mut s = session();
        let input = b"BOGUS\r\n".repeat(MAX_ERRORS as usize);
        let out = run(&mut s, &input);
        assert_eq!(out.len(), MAX_ERRORS as usize);
        assert_eq!(
            out.last().unwrap(),
            "close 421 4.7.0 Too many errors, closing connection"
        );
    }

    fn auth_session(tls: bool, peer: Peer, require_auth: bool) -> Session {
        let mut users = Users::default();
        users.insert("app", "acme", vec!["pw".into()]);
        Session::new(
            Settings {
                users: Arc::new(users),
                require_auth,
                ..settings()
            },
            tls,
            peer,
        )
    }

    fn b64(s: &str) -> String {
        auth::b64_encode(s.as_bytes())
    }

    #[test]
    fn auth_plain_binds_the_project() {
        let mut s = auth_session(true, TRUSTED, false);
        let out = run(
            &mut s,
            format!(
                "EHLO c\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\n",
                b64("\0app\0pw"),
                b64("\0app\0pw")
            )
            .as_bytes(),
        );
        assert!(out[0].ends_with("250 AUTH PLAIN LOGIN"), "{}", out[0]);
        assert_eq!(out[1], "235 2.7.0 Authentication successful");
        assert_eq!(out[2], "503 5.5.1 Already authenticated");
        let out = run(
            &mut s,
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert!(out[3].starts_with("relay"), "{out:?}");
        assert_eq!(s.authenticated(), Some("acme"));
    }

    #[test]
    fn auth_plain_and_login_with_challenges() {
        let mut s = auth_session(true, TRUSTED, false);
        let out = run(
            &mut s,
            format!("EHLO c\r\nAUTH PLAIN\r\n{}\r\n", b64("\0app\0pw")).as_bytes(),
        );
        assert_eq!(&out[1..], ["334", "235 2.7.0 Authentication successful"]);
        let mut s = auth_session(true, TRUSTED, false);
        let out = run(
            &mut s,
            format!(
                "EHLO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\n",
                b64("app"),
                b64("pw")
            )
            .as_bytes(),
        );
        assert_eq!(
            &out[1..],
            [
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 2.7.0 Authentication successful"
            ]
        );
        let mut s = auth_session(true, TRUSTED, false);
        let out = run(
            &mut s,
            format!("EHLO c\r\nAUTH LOGIN {}\r\n{}\r\n", b64("app"), b64("pw")).as_bytes(),
        );
        assert_eq!(
            &out[1..],
            ["334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"]
        );
    }

    #[test]
    fn auth_failures_cancel_and_errors() {
        let mut s = auth_session(true, TRUSTED, false);
        let out = run(
            &mut s,
            format!("EHLO c\r\nAUTH PLAIN {}\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nMAIL FROM:<a@b.example>\r\nAUTH PLAIN {}\r\n", b64("\0app\0wrong"), b64("\0app\0pw")).as_bytes(),
        );
        assert_eq!(
            &out[1..],
            [
                "authfail 535 5.7.8 Authentication credentials invalid",
                "334 VXNlcm5hbWU6",
                "501 5.7.0 Authentication cancelled",
                "501 5.5.2 Cannot decode the base64 response",
                "504 5.5.4 Unsupported authentication mechanism; use PLAIN or LOGIN",
                "250 2.1.0 Sender ok",
                "503 5.5.1 AUTH is not allowed during a mail transaction",
            ]
        );
    }

    #[test]
    fn third_auth_failure_closes() {
        let mut s = auth_session(true, TRUSTED, false);
        let bad = format!("AUTH PLAIN {}\r\n", b64("\0app\0nope"));
        let out = run(&mut s, format!("EHLO c\r\n{bad}{bad}{bad}").as_bytes());
        assert_eq!(out.len(), 4);
        assert!(out[3].starts_with("authfail 535"));
        assert_eq!(s.auth_failures, MAX_AUTH_FAILURES);
    }

    #[test]
    fn auth_needs_tls_unless_plaintext_allowed_on_loopback() {
        let mut s = auth_session(false, TRUSTED, false);
        let out = run(
            &mut s,
            format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64("\0app\0pw")).as_bytes(),
        );
        assert!(!out[0].contains("AUTH"));
        assert!(out[1].starts_with("538 5.7.11"), "{}", out[1]);
        let mut plain = auth_session(false, TRUSTED, false);
        plain.settings.allow_plaintext_auth = true;
        let out = run(
            &mut plain,
            format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64("\0app\0pw")).as_bytes(),
        );
        assert!(out[1].starts_with("235"), "{}", out[1]);
        let remote = Peer {
            trusted: true,
            loopback: false,
        };
        let mut s = auth_session(false, remote, false);
        s.settings.allow_plaintext_auth = true;
        let out = run(
            &mut s,
            format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64("\0app\0pw")).as_bytes(),
        );
        assert!(out[1].starts_with("538"), "{}", out[1]);
        // No users: AUTH is not a thing here.
        let out = run(&mut session(), b"EHLO c\r\nAUTH PLAIN AAAA\r\n");
        assert!(out[1].starts_with("502 5.5.1"), "{}", out[1]);
    }

    #[test]
    fn mail_needs_auth_from_untrusted_peers_or_when_required() {
        let untrusted = Peer {
            trusted: false,
            loopback: false,
        };
        let mut s = auth_session(true, untrusted, false);
        let out = run(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
        assert!(out[1].starts_with("554 5.7.1"), "{}", out[1]);
        let out = run(
            &mut s,
            format!(
                "AUTH PLAIN {}\r\nMAIL FROM:<a@b.example>\r\n",
                b64("\0app\0pw")
            )
            .as_bytes(),
        );
        assert_eq!(
            out,
            ["235 2.7.0 Authentication successful", "250 2.1.0 Sender ok"]
        );

        let mut s = auth_session(true, TRUSTED, true);
        let out = run(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
        assert!(out[1].starts_with("530 5.7.0"), "{}", out[1]);
    }

    #[test]
    fn starttls_forgets_authentication() {
        let mut s = auth_session(false, TRUSTED, false);
        s.settings.allow_plaintext_auth = true;
        run(
            &mut s,
            format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64("\0app\0pw")).as_bytes(),
        );
        assert_eq!(s.authenticated(), Some("acme"));
        run(&mut s, b"STARTTLS\r\n");
        s.tls_started();
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn non_ascii_recipient_needs_smtputf8() {
        let mut s = session();
        let out = run(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<jörg@x.example>\r\nMAIL FROM:<a@b.example>\r\n".as_bytes(),
        );
        assert_eq!(codes(&out), ["250", "250", "553", "503"]);
    }
}
