//! An upstream SMTP server for tests: records each accepted message (envelope, unstuffed
//! bytes, wire bytes, AUTH user, TLS), and can be scripted to refuse, defer, stall, drop the
//! connection, require AUTH, and offer STARTTLS or implicit TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Script {
    /// Reply to MAIL, e.g. "451 4.3.0 try later". Default 250.
    pub mail: Option<String>,
    /// Replies to RCPT by address. Default 250.
    pub rcpt: HashMap<String, String>,
    /// Reply after the end of data. Default "250 2.0.0 queued as TEST".
    pub data_end: Option<String>,
    /// Never answer the end of data.
    pub stall_after_data: bool,
    /// Wait this long before answering the end of data.
    pub delay_after_data: Option<std::time::Duration>,
    /// Close the connection after the first line of message data.
    pub close_mid_data: bool,
    /// Require AUTH (PLAIN or LOGIN) before MAIL, accepting any of these credentials.
    pub auth: Vec<(String, String)>,
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    pub implicit_tls: Option<Arc<rustls::ServerConfig>>,
    pub no_8bitmime: bool,
    pub smtputf8: bool,
    /// Refuse MAIL with `452 4.5.3 Too many messages sent` after this many messages in one
    /// session, as OpenSMTPD does past `smtp limit max-mails` (100 by default).
    pub max_mails_per_session: Option<usize>,
    /// The SIZE extension as advertised: `Some(n)` says `SIZE n`. Default `SIZE 52428800`.
    pub size: Option<u64>,
    /// Refuse every AUTH with this reply (and count it as a failure).
    pub auth_reply: Option<String>,
    /// Offer only AUTH XOAUTH2, and accept the bearer tokens this test token endpoint issued
    /// and has not expired or revoked.
    pub xoauth2: Option<XOAuth2>,
    /// Greet with this instead of 220 (e.g. "421 4.3.2 busy"), then close.
    pub greeting: Option<String>,
    /// Do not offer PIPELINING.
    pub no_pipelining: bool,
    /// Reply to DATA with this instead of 354 (when there are recipients).
    pub data_reply: Option<String>,
    /// Percent of messages that meet a random fault: a 451, a dropped connection (before or
    /// after the data), or a stall.
    pub chaos_percent: u32,
}

/// What an XOAUTH2 upstream checks a bearer token against.
#[derive(Clone, Debug, Default)]
pub struct XOAuth2 {
    pub tokens: super::oauth::Issued,
    /// Answer a bad token as Google does: a 334 challenge carrying a JSON error, then, after
    /// the client's empty line, 535. Otherwise 535 at once, as Microsoft does.
    pub google: bool,
}

#[derive(Clone, Debug)]
pub struct Received {
    pub mail_from: String,
    pub mail_params: String,
    pub rcpts: Vec<String>,
    /// The message with dot-stuffing removed, every line with its CRLF.
    pub data: Vec<u8>,
    /// The bytes on the wire between the 354 and the end marker, end marker included.
    pub wire: Vec<u8>,
    pub auth_user: Option<String>,
    pub tls: bool,
    pub connection: usize,
    /// When the end of data was answered.
    pub at: std::time::Instant,
}

struct State {
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
    commands: Mutex<Vec<String>>,
    /// Every command line with the number of the connection it came on.
    log: Mutex<Vec<(usize, String)>>,
    connections: AtomicUsize,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
    kill: Mutex<CancellationToken>,
    rng: Mutex<u64>,
    /// Said to each connection closed by `kill_connections_saying`.
    farewell: Mutex<Option<String>>,
    /// Per command: its connection, the line, and how many more complete lines had already
    /// arrived behind it (sent in the same write: pipelined).
    ahead: Mutex<Vec<(usize, String, usize)>>,
    /// Connections that ended in the middle of message data (no end marker: nothing delivered).
    aborted_data: AtomicUsize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state.kill.lock().unwrap().cancel();
    }
}

impl Upstream {
    pub async fn start(script: Script) -> Upstream {
        // A deep backlog, so bursts of relay connections test the relay, not the kernel.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Upstream::start_on(socket.listen(4096).unwrap(), script)
    }

    /// Serves on a listener bound elsewhere (for example inside a network namespace).
    pub fn start_on(listener: tokio::net::TcpListener, script: Script) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            script: Mutex::new(script),
            received: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            kill: Mutex::new(CancellationToken::new()),
            rng: Mutex::new(0x9E37_79B9_7F4A_7C15),
            farewell: Mutex::new(None),
            ahead: Mutex::new(Vec::new()),
            aborted_data: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = stop2.cancelled() => return,
                };
                let id = st.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let open = st.open.fetch_add(1, Ordering::SeqCst) + 1;
                st.max_open.fetch_max(open, Ordering::SeqCst);
                let kill = st.kill.lock().unwrap().clone();
                let st = st.clone();
                tokio::spawn(async move {
                    serve(tcp, st.clone(), id, kill).await;
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, state, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.state.script.lock().unwrap());
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Every command line seen, in order, across connections.
    pub fn commands(&self) -> Vec<String> {
        self.state.commands.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The most connections ever open at once.
    pub fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// How many command lines had already arrived behind the first command of connection `id`
    /// that starts with `prefix`: 0 when it came alone, more when pipelined with it.
    pub fn ahead_of(&self, id: usize, prefix: &str) -> Option<usize> {
        let ahead = self.state.ahead.lock().unwrap();
        ahead
            .iter()
            .find(|(c, line, _)| *c == id && line.starts_with(prefix))
            .map(|(_, _, n)| *n)
    }

    /// As `ahead_of`, for the `n`th (from 0) such command of connection `id`.
    pub fn ahead_of_nth(&self, id: usize, prefix: &str, n: usize) -> Option<usize> {
        let ahead = self.state.ahead.lock().unwrap();
        ahead
            .iter()
            .filter(|(c, line, _)| *c == id && line.starts_with(prefix))
            .nth(n)
            .map(|(_, _, n)| *n)
    }

    /// Connections that ended in the middle of message data, so delivered nothing.
    pub fn aborted_data(&self) -> usize {
        self.state.aborted_data.load(Ordering::SeqCst)
    }

    /// The command lines of connection `id` (numbered from 1), in order.
    pub fn commands_of(&self, id: usize) -> Vec<String> {
        let log = self.state.log.lock().unwrap();
        log.iter()
            .filter(|(c, _)| *c == id)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Says `reply` on every open connection, then closes it: an idle timeout, as a real
    /// upstream would announce it.
    pub fn kill_connections_saying(&self, reply: &str) {
        *self.state.farewell.lock().unwrap() = Some(reply.to_string());
        self.kill_connections();
    }

    /// Closes every open connection, as an upstream does to idle clients.
    pub fn kill_connections(&self) {
        let mut kill = self.state.kill.lock().unwrap();
        kill.cancel();
        *kill = CancellationToken::new();
    }
}

impl State {
    /// With `percent` chance, one of four faults.
    fn roll(&self, percent: u32) -> Option<u64> {
        if percent == 0 {
            return None;
        }
        let mut x = self.rng.lock().unwrap();
        // xorshift64: deterministic, and enough for picking faults.
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        ((*x % 100) < u64::from(percent)).then_some((*x >> 32) % 4)
    }
}

async fn serve(tcp: TcpStream, state: Arc<State>, id: usize, kill: CancellationToken) {
    let (implicit, starttls) = {
        let s = state.script.lock().unwrap();
        (s.implicit_tls.clone(), s.starttls.clone())
    };
    if let Some(cfg) = implicit {
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
            return;
        };
        session(tls, &state, id, true, true, &kill).await;
        return;
    }
    if let Some(tcp) = session(tcp, &state, id, false, true, &kill).await {
        let cfg = starttls.expect("STARTTLS only when offered");
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
            return;
        };
        session(tls, &state, id, true, false, &kill).await;
    }
}

async fn read_line<S: AsyncRead + Unpin>(
    r: &mut BufReader<S>,
    kill: &CancellationToken,
) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    tokio::select! {
        n = r.read_until(b'\n', &mut line) => match n { Ok(0) | Err(_) => None, Ok(_) => Some(line) },
        _ = kill.cancelled() => None,
    }
}

/// Returns the stream when the client asked for STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: &State,
    id: usize,
    tls: bool,
    greet: bool,
    kill: &CancellationToken,
) -> Option<S> {
    let mut r = BufReader::new(stream);
    macro_rules! say {
        ($($t:tt)*) => {{
            let text = format!($($t)*);
            if r.get_mut().write_all(format!("{text}\r\n").as_bytes()).await.is_err() { return None; }
        }};
    }
    if greet {
        let refusal = state.script.lock().unwrap().greeting.clone();
        if let Some(refusal) = refusal {
            say!("{refusal}");
            return None;
        }
        say!("220 upstream.test ESMTP test server");
    }
    let mut authed: Option<String> = None;
    let mut mail: Option<(String, String)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    // Messages accepted in this session.
    let mut mails = 0;
    loop {
        let Some(line) = read_line(&mut r, kill).await else {
            let farewell = state.farewell.lock().unwrap().clone();
            if let (true, Some(text)) = (kill.is_cancelled(), farewell) {
                let _ = r
                    .get_mut()
                    .write_all(format!("{text}\r\n").as_bytes())
                    .await;
            }
            return None;
        };
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        state.commands.lock().unwrap().push(text.clone());
        state.log.lock().unwrap().push((id, text.clone()));
        let behind = r.buffer().iter().filter(|b| **b == b'\n').count();
        state.ahead.lock().unwrap().push((id, text.clone(), behind));
        let upper = text.to_ascii_uppercase();
        let script = state.script.lock().unwrap().clone();
        if upper.starts_with("EHLO") {
            let mut ext = vec![
                "upstream.test".to_string(),
                format!("SIZE {}", script.size.unwrap_or(52_428_800)),
            ];
            if !script.no_pipelining {
                ext.push("PIPELINING".into());
            }
            if !script.no_8bitmime {
                ext.push("8BITMIME".into());
            }
            if script.smtputf8 {
                ext.push("SMTPUTF8".into());
            }
            if script.starttls.is_some() && !tls {
                ext.push("STARTTLS".into());
            }
            if script.xoauth2.is_some() {
                ext.push("AUTH XOAUTH2".into());
            } else if !script.auth.is_empty() {
                ext.push("AUTH PLAIN LOGIN".into());
            }
            let last = ext.len() - 1;
            for (i, e) in ext.iter().enumerate() {
                say!("250{}{e}", if i == last { ' ' } else { '-' });
            }
        } else if upper.starts_with("HELO") {
            say!("250 upstream.test");
        } else if upper == "STARTTLS" {
            say!("220 2.0.0 go ahead");
            return Some(r.into_inner());
        } else if upper.starts_with("AUTH XOAUTH2") && script.xoauth2.is_some() {
            let check = script.xoauth2.clone().unwrap();
            let b64 = base64::engine::general_purpose::STANDARD;
            let arg = text.split_whitespace().nth(2).unwrap_or_default();
            let raw = String::from_utf8_lossy(&b64.decode(arg).unwrap_or_default()).into_owned();
            let user = raw
                .strip_prefix("user=")
                .and_then(|r| r.split('\x01').next())
                .unwrap_or_default()
                .to_owned();
            let token = raw
                .split('\x01')
                .find_map(|p| p.strip_prefix("auth=Bearer "))
                .unwrap_or_default()
                .to_owned();
            let well_formed = raw.ends_with("\x01\x01");
            if well_formed && check.tokens.is_valid(&token) {
                authed = Some(user);
                say!("235 2.7.0 Authentication successful");
            } else if check.google {
                say!(
                    "334 {}",
                    b64.encode(
                        r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#
                    )
                );
                let line = read_line(&mut r, kill).await?;
                if !line.iter().all(|b| *b == b'\r' || *b == b'\n') {
                    say!("501 5.5.2 expected an empty line");
                    continue;
                }
                say!("535 5.7.8 Username and Password not accepted");
            } else {
                say!("535 5.7.3 Authentication unsuccessful");
            }
        } else if upper.starts_with("AUTH ") {
            if script.auth.is_empty() {
                say!("502 5.5.1 no AUTH here");
                continue;
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            let words: Vec<&str> = text.split_whitespace().collect();
            let (got_user, got_pass) = match words.get(1).map(|m| m.to_ascii_uppercase()).as_deref()
            {
                Some("PLAIN") => {
                    let arg = match words.get(2) {
                        Some(a) => a.to_string(),
                        None => {
                            say!("334 ");
                            String::from_utf8_lossy(&read_line(&mut r, kill).await?)
                                .trim()
                                .to_string()
                        }
                    };
                    let raw = b64.decode(arg).unwrap_or_default();
                    let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                    match parts.as_slice() {
                        [_, u, p] => (
                            String::from_utf8_lossy(u).into_owned(),
                            String::from_utf8_lossy(p).into_owned(),
                        ),
                        _ => (String::new(), String::new()),
                    }
                }
                Some("LOGIN") => {
                    say!("334 VXNlcm5hbWU6");
                    let u = read_line(&mut r, kill).await?;
                    say!("334 UGFzc3dvcmQ6");
                    let p = read_line(&mut r, kill).await?;
                    let dec = |l: Vec<u8>| {
                        String::from_utf8_lossy(
                            &b64.decode(String::from_utf8_lossy(&l).trim())
                                .unwrap_or_default(),
                        )
                        .into_owned()
                    };
                    (dec(u), dec(p))
                }
                _ => {
                    say!("504 5.5.4 mechanism");
                    continue;
                }
            };
            if let Some(reply) = &script.auth_reply {
                say!("{reply}");
            } else if script
                .auth
                .iter()
                .any(|(u, p)| *u == got_user && *p == got_pass)
            {
                authed = Some(got_user);
                say!("235 2.7.0 ok");
            } else {
                say!("535 5.7.8 bad credentials");
            }
        } else if upper.starts_with("MAIL FROM:") {
            if (!script.auth.is_empty() || script.xoauth2.is_some()) && authed.is_none() {
                say!("530 5.7.0 authentication required");
                continue;
            }
            if let Some(reply) = &script.mail {
                say!("{reply}");
                continue;
            }
            if script.max_mails_per_session.is_some_and(|max| mails >= max) {
                say!("452 4.5.3 Too many messages sent");
                continue;
            }
            let rest = &text["MAIL FROM:".len()..];
            let (addr, params) = split_path(rest);
            mail = Some((addr, params));
            rcpts.clear();
            say!("250 2.1.0 ok");
        } else if upper.starts_with("RCPT TO:") {
            let (addr, _) = split_path(&text["RCPT TO:".len()..]);
            match script.rcpt.get(&addr) {
                Some(reply) => say!("{reply}"),
                None => {
                    rcpts.push(addr);
                    say!("250 2.1.5 ok");
                }
            }
        } else if upper == "DATA" {
            // A scripted reply comes first: an upstream may even say 354 with no recipient.
            if let Some(reply) = &script.data_reply {
                say!("{reply}");
                continue;
            }
            if mail.is_none() || rcpts.is_empty() {
                say!("503 5.5.1 bad sequence");
                continue;
            }
            // Faults: 0 = answer 451, 1 = drop now, 2 = drop after the data, 3 = stall.
            let fault = state.roll(script.chaos_percent);
            if fault == Some(1) {
                return None;
            }
            say!("354 go ahead");
            let mut wire = Vec::new();
            let mut data = Vec::new();
            loop {
                let Some(line) = read_line(&mut r, kill).await else {
                    state.aborted_data.fetch_add(1, Ordering::SeqCst);
                    return None;
                };
                wire.extend_from_slice(&line);
                if script.close_mid_data {
                    return None;
                }
                if line == b".\r\n" {
                    break;
                }
                let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
                data.extend_from_slice(unstuffed);
            }
            if script.stall_after_data || fault == Some(3) {
                kill.cancelled().await;
                return None;
            }
            if fault == Some(2) {
                return None;
            }
            if fault == Some(0) {
                mail = None;
                rcpts.clear();
                say!("451 4.3.0 chaos says try again");
                continue;
            }
            if let Some(delay) = script.delay_after_data {
                tokio::time::sleep(delay).await;
            }
            let reply = script
                .data_end
                .clone()
                .unwrap_or_else(|| "250 2.0.0 queued as TEST".into());
            if reply.starts_with('2') {
                mails += 1;
                let (mail_from, mail_params) = mail.take().unwrap();
                state.received.lock().unwrap().push(Received {
                    mail_from,
                    mail_params,
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                    wire,
                    auth_user: authed.clone(),
                    tls,
                    connection: id,
                    at: std::time::Instant::now(),
                });
            }
            mail = None;
            rcpts.clear();
            say!("{reply}");
        } else if upper == "RSET" {
            mail = None;
            rcpts.clear();
            say!("250 2.0.0 ok");
        } else if upper.starts_with("NOOP") {
            say!("250 2.0.0 ok");
        } else if upper == "QUIT" {
            say!("221 2.0.0 bye");
            return None;
        } else {
            say!("500 5.5.1 unrecognized");
        }
    }
}

fn split_path(rest: &str) -> (String, String) {
    let rest = rest.trim_start();
    match (rest.find('<'), rest.find('>')) {
        (Some(a), Some(b)) if a < b => {
            (rest[a + 1..b].to_string(), rest[b + 1..].trim().to_string())
        }
        _ => (rest.to_string(), String::new()),
    }
}
