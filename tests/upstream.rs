//! The relay against upstreams that refuse, defer, vanish, stall, want AUTH or TLS, and the
//! connection pool.

mod common;

use common::{Relay, Script, Upstream};

fn project(name: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "[projects.{name}]\nsmtpHost = \"{host}\"\nsmtpPort = {port}\nsmtpUsername = \"user-{name}\"\nsmtpPassword = \"pw-{name}\"\nsmtpFromAddress = \"noreply@{name}.example\"\n{extra}\n",
        host = if extra.contains("smtpSecure") || extra.contains("#tls") {
            "localhost"
        } else {
            "127.0.0.1"
        },
        port = up.port()
    )
}

fn creds(names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| (format!("user-{n}"), format!("pw-{n}")))
        .collect()
}

async fn relay_for(projects: &str) -> Relay {
    Relay::start(&format!(
        "[upstream]\ntimeout_secs = 2\nca_file = \"certs/ca.crt\"\n{projects}"
    ))
    .await
}

const MSG: &[u8] = b"X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n";

async fn send(relay: &Relay, msg: &[u8], to: &[&str]) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", to, msg).await
}

fn script(f: impl FnOnce(&mut Script)) -> Script {
    let mut s = Script {
        auth: creds(&["acme"]),
        ..Script::default()
    };
    f(&mut s);
    s
}

#[tokio::test]
async fn upstream_permanent_refusal_reaches_the_client_as_5xx() {
    let up = Upstream::start(script(|s| {
        s.data_end = Some("554 5.7.1 Spam detected".into())
    }))
    .await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(
        reply.starts_with("554 5.7.1 Upstream refused: Spam detected"),
        "{reply}"
    );
}

#[tokio::test]
async fn upstream_deferral_reaches_the_client_as_4xx() {
    let up = Upstream::start(script(|s| {
        s.mail = Some("451 4.7.1 Greylisted, try later".into())
    }))
    .await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(
        reply.starts_with("451 4.7.1 Upstream refused: Greylisted, try later"),
        "{reply}"
    );
    // An upstream reply without an enhanced code gets one of its class.
    up.script(|s| s.mail = Some("452 mailbox full".into()));
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(
        reply.starts_with("452 4.0.0 Upstream refused: mailbox full"),
        "{reply}"
    );
}

#[tokio::test]
async fn a_refused_recipient_sends_nothing() {
    let up = Upstream::start(script(|s| {
        s.rcpt
            .insert("bad@dest.example".into(), "550 5.1.1 No such user".into());
    }))
    .await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(&relay, MSG, &["ok@dest.example", "bad@dest.example"]).await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert!(up.received().is_empty());
    assert!(
        !up.commands().iter().any(|c| c == "DATA"),
        "{:?}",
        up.commands()
    );
    // The transaction was reset, and the connection serves the next message.
    assert!(
        up.commands().iter().any(|c| c == "RSET"),
        "{:?}",
        up.commands()
    );
    let reply = send(&relay, MSG, &["ok@dest.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn dot_stuffing_holds_across_chunk_boundaries() {
    // The relay cuts the message after its header fields; the rest, "\r\n" and then the body,
    // goes in 32 KiB pieces. Lines are 64 bytes with a dot at 0 and at 32; shifting the first
    // line's length moves the piece edges over every position: before a line-start dot,
    // between CR and LF, just before a mid-line dot.
    let up = Upstream::start(script(|_| {})).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    for first in [59usize, 60, 61, 62, 63, 64, 93, 94] {
        let msg = dotted_message(first, 3000);
        let reply = send(&relay, &msg, &["x@dest.example"]).await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_arrived_as_sent(&up, &msg, &format!("first line {first}"));
    }
}

/// A message whose every body line starts with a dot and has one at 32; the first line is
/// `first` bytes long with its CRLF.
fn dotted_message(first: usize, lines: usize) -> Vec<u8> {
    let mut msg = b"X-Project-Id: acme\r\n\r\n".to_vec();
    msg.extend(std::iter::repeat_n(b'x', first - 2));
    msg.extend_from_slice(b"\r\n");
    for i in 0..lines {
        msg.extend_from_slice(format!(".{i:0>30}.{i:0>30}\r\n").as_bytes());
    }
    msg
}

/// The last message the upstream got is `msg` as sent, with the From the relay adds for a
/// message without one.
fn assert_arrived_as_sent(up: &Upstream, msg: &[u8], what: &str) {
    let got = up.received().pop().unwrap();
    let want = [
        &b"From: noreply@acme.example\r\n"[..],
        &msg[b"X-Project-Id: acme\r\n".len()..],
    ]
    .concat();
    let at = got.data.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got.data == want,
        "{what}: differs at {at:?} (got {} bytes of {})",
        got.data.len(),
        want.len()
    );
}

#[tokio::test]
async fn a_large_dotted_message_arrives_whole_over_tls() {
    // Over TLS the vectored writes go through rustls, which may take less than offered: the
    // message (about 600 KB, every line stuffed) must still arrive byte for byte.
    let msg = dotted_message(61, 9000);
    let tls = common::tls_server("certs/localhost.crt", "certs/localhost.key");
    let implicit = Upstream::start(script(|s| s.implicit_tls = Some(tls.clone()))).await;
    let starttls = Upstream::start(script(|s| s.starttls = Some(tls))).await;
    for (up, extra) in [(&implicit, "smtpSecure = true"), (&starttls, "#tls")] {
        let relay = relay_for(&project("acme", up, extra)).await;
        let reply = send(&relay, &msg, &["x@dest.example"]).await;
        assert!(reply.starts_with("250"), "{extra}: {reply}");
        assert!(up.received()[0].tls, "{extra}");
        assert_arrived_as_sent(up, &msg, extra);
    }
}

#[tokio::test]
async fn unreachable_upstream_is_451_4_4_1() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let relay = relay_for(&format!(
        "[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {port}\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@acme.example\"\n"
    ))
    .await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.4.1"), "{reply}");
}

#[tokio::test]
async fn stalled_upstream_times_out_with_451_4_4_2() {
    let up = Upstream::start(script(|s| s.stall_after_data = true)).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let started = std::time::Instant::now();
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.4.2"), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // The stuck connection is not reused: the next message gets a new one.
    up.script(|s| s.stall_after_data = false);
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn upstream_closing_mid_data_is_a_4xx() {
    let up = Upstream::start(script(|s| s.close_mid_data = true)).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.4."), "{reply}");
    assert!(up.received().is_empty());
}

#[tokio::test]
async fn upstream_auth_failure_is_a_4xx_and_never_shows_the_password() {
    let up = Upstream::start(script(|s| s.auth = creds(&["other"]))).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.7.0"), "{reply}");
    assert!(!reply.contains("pw-acme"), "{reply}");
}

#[tokio::test]
async fn project_credentials_are_used() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    assert!(
        send(&relay, MSG, &["x@dest.example"])
            .await
            .starts_with("250")
    );
    assert_eq!(up.received()[0].auth_user.as_deref(), Some("user-acme"));
    assert!(!up.received()[0].tls);
}

#[tokio::test]
async fn starttls_upstream_verified_with_ca_file() {
    let tls = common::tls_server("certs/localhost.crt", "certs/localhost.key");
    let up = Upstream::start(script(|s| s.starttls = Some(tls))).await;
    let relay = relay_for(&project("acme", &up, "#tls")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = up.received();
    assert!(got[0].tls, "STARTTLS was used");
    assert_eq!(got[0].auth_user.as_deref(), Some("user-acme"));
}

#[tokio::test]
async fn implicit_tls_upstream() {
    let tls = common::tls_server("certs/localhost.crt", "certs/localhost.key");
    let up = Upstream::start(script(|s| s.implicit_tls = Some(tls))).await;
    let relay = relay_for(&project("acme", &up, "smtpSecure = true")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert!(up.received()[0].tls);
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_refused() {
    let bad = common::tls_server(
        "tests/fixtures/untrusted.crt",
        "tests/fixtures/untrusted.key",
    );
    let up = Upstream::start(script(|s| s.implicit_tls = Some(bad.clone()))).await;
    let relay = relay_for(&project("acme", &up, "smtpSecure = true")).await;
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.7.5"), "{reply}");

    let up2 = Upstream::start(script(|s| s.starttls = Some(bad))).await;
    let relay2 = relay_for(&project("acme", &up2, "#tls")).await;
    let reply = send(&relay2, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.7.5"), "{reply}");
    assert!(up.received().is_empty() && up2.received().is_empty());
    // No credentials went out over the failed handshake.
    assert!(!up2.commands().iter().any(|c| c.starts_with("AUTH")));
}

#[tokio::test]
async fn connections_are_pooled_across_sessions() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    for _ in 0..5 {
        assert!(
            send(&relay, MSG, &["x@dest.example"])
                .await
                .starts_with("250")
        );
    }
    assert_eq!(up.received().len(), 5);
    assert_eq!(up.connections(), 1);
}

/// The upstream closes a pooled connection while it is idle, silently or with a 421 as real
/// servers do on their idle timeout: the next message goes on a new connection, unharmed.
/// More busy sessions than `pool_size` must not turn every message into a new connection
/// (a connect storm that ends in TIME_WAIT port exhaustion under load).
#[tokio::test]
async fn a_small_pool_does_not_churn_connections_under_load() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = Relay::start(&format!(
        "[upstream]\ntimeout_secs = 5\npool_size = 2\n{}",
        project("acme", &up, "")
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let addr = relay.smtp;
        tasks.push(tokio::spawn(async move {
            let mut c = common::Client::connect(addr).await;
            c.expect(220).await;
            c.cmd("EHLO me", 250).await;
            for _ in 0..5 {
                let reply = c.mail("app@app.example", &["x@dest.example"], MSG).await;
                assert!(reply.starts_with("250"), "{reply}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(up.received().len(), 50);
    assert!(
        up.connections() <= 10,
        "{} connections for 50 messages",
        up.connections()
    );
}

#[tokio::test]
async fn a_pooled_connection_that_died_is_replaced_without_failing_the_message() {
    for farewell in [
        None,
        Some("421 4.4.2 upstream.test Error: timeout exceeded"),
    ] {
        let up = Upstream::start(script(|_| {})).await;
        let relay = relay_for(&project("acme", &up, "")).await;
        let reply = send(&relay, MSG, &["x@dest.example"]).await;
        assert!(reply.starts_with("250"), "{reply}");
        match farewell {
            None => up.kill_connections(),
            Some(text) => up.kill_connections_saying(text),
        }
        // Let the close (and the 421) reach the relay's idle socket.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let reply = send(&relay, MSG, &["x@dest.example"]).await;
        assert!(reply.starts_with("250"), "{farewell:?}: {reply}");
        assert_eq!(up.received().len(), 2);
        assert_eq!(up.connections(), 2);
    }
}

#[tokio::test]
async fn different_credentials_never_share_a_connection() {
    let up = Upstream::start(Script {
        auth: creds(&["acme", "beta"]),
        ..Script::default()
    })
    .await;
    let relay = relay_for(&format!(
        "{}{}",
        project("acme", &up, ""),
        project("beta", &up, "")
    ))
    .await;
    for id in ["acme", "beta", "acme", "beta"] {
        let msg = format!("X-Project-Id: {id}\r\n\r\nhi\r\n");
        assert!(
            send(&relay, msg.as_bytes(), &["x@dest.example"])
                .await
                .starts_with("250")
        );
    }
    let got = up.received();
    let users: Vec<_> = got.iter().map(|r| r.auth_user.clone().unwrap()).collect();
    assert_eq!(users, ["user-acme", "user-beta", "user-acme", "user-beta"]);
    assert_eq!(got[0].mail_from, "noreply@acme.example");
    assert_eq!(got[1].mail_from, "noreply@beta.example");
    assert_eq!(up.connections(), 2);
    assert_eq!(got[0].connection, got[2].connection);
    assert_ne!(got[0].connection, got[1].connection);
}

#[tokio::test]
async fn eight_bit_message_to_a_seven_bit_upstream_is_refused_permanently() {
    let up = Upstream::start(script(|s| s.no_8bitmime = true)).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    let reply = send(
        &relay,
        "X-Project-Id: acme\r\n\r\nh\u{e9}llo\r\n".as_bytes(),
        &["x@dest.example"],
    )
    .await;
    assert!(reply.starts_with("554 5.3.3"), "{reply}");
    let reply = send(&relay, MSG, &["x@dest.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(
        up.connections(),
        1,
        "nothing was sent, so the connection stays"
    );
}

#[tokio::test]
async fn a_refused_message_keeps_the_connection() {
    let up = Upstream::start(script(|s| s.data_end = Some("550 5.7.1 no".into()))).await;
    let relay = relay_for(&project("acme", &up, "")).await;
    assert!(
        send(&relay, MSG, &["x@dest.example"])
            .await
            .starts_with("550")
    );
    up.script(|s| s.data_end = None);
    assert!(
        send(&relay, MSG, &["x@dest.example"])
            .await
            .starts_with("250")
    );
    assert_eq!(up.connections(), 1);
}
