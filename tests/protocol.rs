//! The SMTP listener seen from the client, with raw bytes: pipelining, errors, limits,
//! smuggling, STARTTLS and implicit TLS.

mod common;

use common::{Client, Relay, Script, Upstream};
use tokio::net::TcpStream;

async fn setup(listener: &str) -> (Relay, Upstream) {
    let up = Upstream::start(Script::default()).await;
    let relay = Relay::start(&format!(
        "{listener}\n[server]\nsupportEmail = \"noreply@example.com\"\napprovedSenderEmails = \"app@app.example\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
        up.port()
    ))
    .await;
    (relay, up)
}

const TLS_LISTENER: &str = "[listener]\nsmtp = \"127.0.0.1:0\"\nsmtps = \"127.0.0.1:0\"\nhostname = \"relay.test\"\ncertificate = \"certs/localhost.crt\"\nprivate_key = \"certs/localhost.key\"\nmax_message_size = 100000\nmax_recipients = 3\n";

#[tokio::test]
async fn ehlo_advertises_the_extensions() {
    let (relay, _up) = setup(TLS_LISTENER).await;
    let mut c = Client::connect(relay.smtp).await;
    let greeting = c.expect(220).await;
    assert!(greeting.starts_with("220 relay.test ESMTP"), "{greeting}");
    let ehlo = c.cmd("EHLO me", 250).await;
    for ext in [
        "250-relay.test",
        "PIPELINING",
        "SIZE 100000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing: {ehlo}");
    }
    // Without a certificate there is no STARTTLS.
    let (plain, _up2) = setup("").await;
    let mut c = plain.client().await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.cmd("STARTTLS", 454).await;
    c.cmd("HELO me", 250).await;
}

#[tokio::test]
async fn pipelined_commands_get_one_reply_each_in_order() {
    let (relay, up) = setup("").await;
    let mut c = relay.client().await;
    c.send_raw(
        b"EHLO me\r\nMAIL FROM:<app@app.example>\r\nRCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send_raw(b"Subject: p\r\n\r\nhi\r\n.\r\nMAIL FROM:<app@app.example>\r\nRCPT TO:<c@x.example>\r\nDATA\r\n").await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send_raw(b"Subject: q\r\n\r\nho\r\n.\r\nNOOP\r\nQUIT\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(221).await;
    assert!(c.closed().await);
    let got = up.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].rcpts, ["a@x.example", "b@x.example"]);
    assert_eq!(got[1].rcpts, ["c@x.example"]);
}

/// Data segments this socket has received so far (Linux's TCP_INFO). With TCP_NODELAY on the
/// relay's side, each of its writes of a few hundred bytes is one segment on loopback.
#[cfg(target_os = "linux")]
fn data_segments_in(tcp: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// RFC 2920 servers answer a pipelined batch in one write: one reply segment per batch
/// instead of one per command, for the client to read and for the relay to send.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_pipelined_batch_is_answered_in_one_write() {
    let (relay, up) = setup("").await;
    let mut c = relay.client().await;
    let before = data_segments_in(c.stream.get_ref());
    c.send_raw(
        b"EHLO me\r\nMAIL FROM:<app@app.example>\r\nRCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    for code in [250, 250, 250, 250, 354] {
        c.expect(code).await;
    }
    assert_eq!(data_segments_in(c.stream.get_ref()) - before, 1);
    // The end of the message and what follows it: the final 250 waits on the upstream, and
    // the replies to the commands after it go out together once it is there.
    let before = data_segments_in(c.stream.get_ref());
    c.send_raw(b"Subject: p\r\n\r\nhi\r\n.\r\nNOOP\r\nRSET\r\nNOOP\r\n")
        .await;
    for code in [250, 250, 250, 250] {
        c.expect(code).await;
    }
    let segments = data_segments_in(c.stream.get_ref()) - before;
    assert!(segments <= 2, "{segments} segments");
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn bad_commands_get_replies_and_the_session_goes_on() {
    let (relay, up) = setup(TLS_LISTENER).await;
    let mut c = relay.client().await;
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<app@app.example>", "503 5.5.1"),
        ("FROBNICATE", "500 5.5.1"),
        ("EHLO", "501 5.5.4"),
        ("EHLO me", "250"),
        ("RCPT TO:<a@x.example>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("MAIL FROM:<no-at-sign>", "501 5.1.3"),
        ("MAIL FROM:<app@app.example> FOO=BAR", "555 5.5.4"),
        ("MAIL FROM:<app@app.example> SIZE=100001", "552 5.3.4"),
        ("MAIL FROM:<app@app.example> SIZE=100", "250 2.1.0"),
        ("MAIL FROM:<app@app.example>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("RCPT TO:<broken", "501 5.1.3"),
        ("RCPT TO:<a@x.example>", "250 2.1.5"),
        ("RCPT TO:<b@x.example>", "250 2.1.5"),
        ("RCPT TO:<c@x.example>", "250 2.1.5"),
        ("RCPT TO:<d@x.example>", "452 4.5.3"),
        ("VRFY someone", "252"),
        ("EXPN list", "502 5.5.1"),
        ("HELP", "214"),
        ("NOOP", "250 2.0.0"),
        ("RSET", "250 2.0.0"),
        ("DATA", "503 5.5.1"),
    ];
    for (line, want) in cases {
        let got = c.cmd(line, want[..3].parse().unwrap()).await;
        assert!(got.starts_with(want), "{line}: expected {want}, got {got}");
    }
    let reply = c
        .mail(
            "app@app.example",
            &["a@x.example"],
            b"Subject: s\r\n\r\nstill works\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn over_long_command_line_is_refused_and_session_goes_on() {
    let (relay, _up) = setup("").await;
    let mut c = relay.client().await;
    let mut line = b"NOOP ".to_vec();
    line.extend(std::iter::repeat_n(b'a', 10_000));
    line.extend_from_slice(b"\r\n");
    c.send_raw(&line).await;
    assert!(c.expect(500).await.starts_with("500 5.5.2"));
    c.cmd("NOOP", 250).await;
}

#[tokio::test]
async fn too_large_message_gets_552_and_nothing_is_sent() {
    let (relay, up) = setup(TLS_LISTENER).await;
    let mut c = relay.client().await;
    let mut msg = b"Subject: big\r\n\r\n".to_vec();
    while msg.len() <= 100_000 {
        msg.extend_from_slice(&[b'y'; 78]);
        msg.extend_from_slice(b"\r\n");
    }
    let reply = c.send_mail("app@app.example", &["a@x.example"], &msg).await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    c.cmd("NOOP", 250).await;
    assert_eq!(up.connections(), 0);
}

#[tokio::test]
async fn line_over_998_octets_in_data_is_refused() {
    let (relay, up) = setup("").await;
    let mut c = relay.client().await;
    let mut msg = b"Subject: long\r\n\r\n".to_vec();
    msg.extend(std::iter::repeat_n(b'z', 999));
    msg.extend_from_slice(b"\r\n");
    let reply = c.send_mail("app@app.example", &["a@x.example"], &msg).await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    assert_eq!(up.connections(), 0);
}

#[tokio::test]
async fn nul_in_data_is_refused() {
    let (relay, up) = setup("").await;
    let mut c = relay.client().await;
    let reply = c
        .send_mail(
            "app@app.example",
            &["a@x.example"],
            b"Subject: nul\r\n\r\na\0b\r\n",
        )
        .await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    assert_eq!(up.connections(), 0);
}

/// The smuggling sequences of the issue, mid-body and as the first bytes after the 354:
/// the upstream gets exactly one message, to the real recipient, with CRLF line ends only.
#[tokio::test]
async fn smuggling_sequences_never_split_a_message() {
    let (relay, up) = setup("").await;
    let fakes: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r\n.\r\r\n",
        b"\r\n\x00.\r\n",
    ];
    let smuggled = b"MAIL FROM:<evil@evil.example>\r\nRCPT TO:<victim@victim.example>\r\nDATA\r\nFrom: ceo@bank.example\r\n\r\nsmuggled\r\n";
    let mut expected_messages = 0;
    for (i, fake) in fakes.iter().enumerate() {
        for first in [false, true] {
            let mut c = relay.client().await;
            c.cmd("EHLO me", 250).await;
            c.cmd("MAIL FROM:<app@app.example>", 250).await;
            c.cmd("RCPT TO:<real@x.example>", 250).await;
            c.cmd("DATA", 354).await;
            let mut data = Vec::new();
            if !first {
                data.extend_from_slice(format!("Subject: case {i}\r\n\r\nbody").as_bytes());
            }
            data.extend_from_slice(fake);
            data.extend_from_slice(smuggled);
            data.extend_from_slice(b"tail\r\n.\r\n");
            c.send_raw(&data).await;
            let reply = c.reply().await;
            // One reply for the one message the client sent: accepted whole or refused whole.
            assert!(
                reply.starts_with("250") || reply.starts_with("550") || reply.starts_with("554"),
                "{fake:?}: {reply}"
            );
            if reply.starts_with("250") {
                expected_messages += 1;
            }
            // The session is in a clean state: the next command is a command.
            c.cmd("NOOP", 250).await;
        }
    }
    let got = up.received();
    assert_eq!(got.len(), expected_messages);
    for m in &got {
        assert_eq!(m.rcpts, ["real@x.example"]);
        assert!(m.data.ends_with(b"tail\r\n"));
        for (j, b) in m.wire.iter().enumerate() {
            if *b == b'\n' {
                assert_eq!(
                    m.wire.get(j.wrapping_sub(1)),
                    Some(&b'\r'),
                    "bare LF forwarded"
                );
            }
            if *b == b'\r' {
                assert_eq!(m.wire.get(j + 1), Some(&b'\n'), "bare CR forwarded");
            }
        }
    }
    assert!(
        up.commands()
            .iter()
            .all(|c| !c.contains("evil@evil.example"))
    );
    assert!(
        expected_messages >= 10,
        "most cases are normalised and delivered"
    );
}

#[tokio::test]
async fn bare_lf_message_is_normalised_to_crlf() {
    let (relay, up) = setup("").await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    c.cmd("MAIL FROM:<app@app.example>", 250).await;
    c.cmd("RCPT TO:<a@x.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send_raw(b"Subject: unix\nFrom: app@app.example\n\nline\n.\nend\r\n.\r\n")
        .await;
    assert!(c.expect(250).await.starts_with("250"));
    assert_eq!(
        String::from_utf8_lossy(&up.received()[0].data),
        "Subject: unix\r\nFrom: app@app.example\r\n\r\nline\r\n.\r\nend\r\n"
    );
}

async fn starttls(c: Client<TcpStream>) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = c.stream.into_inner();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::tls_client()
        .connect(name, tcp)
        .await
        .expect("handshake");
    Client::new(tls)
}

#[tokio::test]
async fn starttls_upgrades_and_restarts_the_session() {
    let (relay, up) = setup(TLS_LISTENER).await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    c.cmd("STARTTLS", 220).await;
    let mut c = starttls(c).await;
    c.cmd("MAIL FROM:<app@app.example>", 503).await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.cmd("STARTTLS", 503).await;
    let reply = c
        .mail(
            "app@app.example",
            &["a@x.example"],
            b"Subject: tls\r\n\r\nsecret\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn bytes_pipelined_after_starttls_are_discarded() {
    let (relay, up) = setup(TLS_LISTENER).await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<evil@evil.example>\r\nRCPT TO:<victim@x.example>\r\n")
        .await;
    c.expect(220).await;
    let mut c = starttls(c).await;
    c.cmd("EHLO me", 250).await;
    // Had the injected MAIL survived, this RCPT would be accepted.
    c.cmd("RCPT TO:<a@x.example>", 503).await;
    c.cmd("NOOP", 250).await;
    assert_eq!(up.connections(), 0);
}

#[tokio::test]
async fn implicit_tls_listener() {
    let (relay, up) = setup(TLS_LISTENER).await;
    let tcp = TcpStream::connect(relay.smtps.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::tls_client()
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut c = Client::new(tls);
    c.expect(220).await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let reply = c
        .mail(
            "app@app.example",
            &["a@x.example"],
            b"Subject: smtps\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn silent_client_is_closed_after_the_idle_timeout() {
    let (relay, _up) = setup("[listener]\nsmtp = \"127.0.0.1:0\"\nidle_timeout_secs = 1\n").await;
    let mut c = relay.client().await;
    let started = std::time::Instant::now();
    let r = c.reply().await;
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.closed().await);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn silent_tls_handshake_is_cut_off() {
    let (relay, _up) = setup(&format!("{TLS_LISTENER}tls_handshake_timeout_secs = 1\n")).await;
    let mut c = Client::connect(relay.smtps.unwrap()).await;
    // Never start the handshake: the relay must hang up on its own.
    assert!(c.closed().await);
}

#[tokio::test]
async fn quit_closes() {
    let (relay, _up) = setup("").await;
    let mut c = relay.client().await;
    assert!(c.cmd("QUIT", 221).await.starts_with("221 2.0.0"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn too_many_errors_close_the_connection() {
    let (relay, _up) = setup("").await;
    let mut c = relay.client().await;
    c.send_raw(&b"BOGUS\r\n".repeat(30)).await;
    for _ in 0..19 {
        c.expect(500).await;
    }
    assert!(c.expect(421).await.starts_with("421 4.7.0"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn connection_cap_refuses_with_421() {
    let (relay, _up) = setup("[listener]\nsmtp = \"127.0.0.1:0\"\nmax_connections = 2\n").await;
    let _a = relay.client().await;
    let _b = relay.client().await;
    let mut c = Client::connect(relay.smtp).await;
    assert!(c.expect(421).await.starts_with("421 4.7.0"));
    drop(_a);
    // A slot frees up once a session ends.
    common::eventually(|| true).await;
    let mut tries = 0;
    loop {
        let mut d = Client::connect(relay.smtp).await;
        if d.reply().await.starts_with("220") {
            break;
        }
        tries += 1;
        assert!(tries < 100, "slot never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Messages held in memory by all sessions together are bounded: past the budget, the
/// message that would exceed it is refused with a 4xx and the others go through.
#[tokio::test]
async fn message_memory_is_bounded_across_sessions() {
    let (relay, up) = setup(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nmax_message_size = 300000\nmax_buffered_bytes = 400000\n",
    )
    .await;
    let chunk = |tag: u8| {
        let mut part = b"Subject: big\r\n\r\n".to_vec();
        while part.len() < 250_000 {
            part.extend(std::iter::repeat_n(tag, 78));
            part.extend_from_slice(b"\r\n");
        }
        part
    };
    let start = |mut c: Client<TcpStream>| async move {
        c.cmd("EHLO me", 250).await;
        c.cmd("MAIL FROM:<app@app.example>", 250).await;
        c.cmd("RCPT TO:<a@x.example>", 250).await;
        c.cmd("DATA", 354).await;
        c
    };
    let mut a = start(relay.client().await).await;
    a.send_raw(&chunk(b'a')).await;
    // Let the relay take in A's 250 KB before B's arrive.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut b = start(relay.client().await).await;
    b.send_raw(&chunk(b'b')).await;
    b.send_raw(b".\r\n").await;
    assert!(b.expect(452).await.starts_with("452 4.3.1"));
    a.send_raw(b".\r\n").await;
    assert!(a.expect(250).await.starts_with("250"));
    // The budget is free again: B's retry goes through on the same session.
    let reply = b
        .mail("app@app.example", &["a@x.example"], &chunk(b'c'))
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.received().len(), 2);
}

/// A burst of clients arriving before the relay accepts any: every one of them is greeted.
/// (With the common listen backlog of 128 the overflow is dropped, or, with SYN cookies,
/// completed on the client's side and then lost: those clients wait for a greeting forever.)
#[tokio::test]
async fn a_burst_of_connections_is_not_lost() {
    let up = Upstream::start(Script::default()).await;
    let config = project_relay::Config::from_toml_str(
        &format!(
            "[listener]\nsmtp = \"127.0.0.1:0\"\nmax_connections = 2000\n[server]\nsupportEmail = \"n@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
            up.port()
        ),
        &common::repo(),
    )
    .unwrap();
    let listeners = project_relay::Listeners::bind(&config).await.unwrap();
    let addr = listeners.smtp_addr().unwrap();
    // All connect while nothing accepts yet.
    let mut clients = Vec::new();
    for _ in 0..600 {
        let tcp =
            tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .expect("connect timed out")
                .expect("connect");
        clients.push(Client::new(tcp));
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _relay = tokio::spawn(project_relay::run(
        std::sync::Arc::new(config),
        listeners,
        shutdown.clone(),
    ));
    for c in &mut clients {
        let greeting = tokio::time::timeout(std::time::Duration::from_secs(5), c.reply())
            .await
            .expect("a queued client got no greeting");
        assert!(greeting.starts_with("220"), "{greeting}");
    }
    shutdown.cancel();
}
