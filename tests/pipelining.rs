//! The upstream dialogue with and without PIPELINING (RFC 2920), against a recording upstream
//! that sees which commands arrived together: what is batched, and that a refusal anywhere in
//! a batch lets no message data through.

mod common;

use common::{Relay, Script, Upstream};

const MSG: &[u8] = b"X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n";

fn script(f: impl FnOnce(&mut Script)) -> Script {
    let mut s = Script {
        auth: vec![("u".into(), "p".into())],
        ..Script::default()
    };
    f(&mut s);
    s
}

async fn relay_for(up: &Upstream) -> Relay {
    Relay::start(&format!(
        "[server]\nsupportEmail = \"noreply@example.com\"\n[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\n\
         smtpSecure = false\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@acme.example\"\n",
        up.port()
    ))
    .await
}

async fn send(relay: &Relay, to: &[&str]) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", to, MSG).await
}

#[tokio::test]
async fn one_recipient_goes_with_mail_and_data_in_one_write() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = relay_for(&up).await;
    assert!(send(&relay, &["x@dest.example"]).await.starts_with("250"));
    assert_eq!(
        up.ahead_of(1, "MAIL"),
        Some(2),
        "RCPT and DATA came with MAIL"
    );
    assert_eq!(up.received().len(), 1);
    // Several recipients: the envelope together, DATA once every RCPT was accepted.
    assert!(
        send(&relay, &["x@dest.example", "y@dest.example"])
            .await
            .starts_with("250")
    );
    let log = up.commands_of(1);
    let second_mail = log.iter().rposition(|c| c.starts_with("MAIL")).unwrap();
    assert_eq!(
        &log[second_mail + 1..second_mail + 4],
        [
            "RCPT TO:<x@dest.example>",
            "RCPT TO:<y@dest.example>",
            "DATA"
        ]
    );
    let ahead = up.ahead_of_nth(1, "MAIL", 1);
    assert_eq!(
        ahead,
        Some(2),
        "two RCPTs came with MAIL, DATA after their replies"
    );
    assert_eq!(up.received().len(), 2);
}

#[tokio::test]
async fn without_pipelining_one_command_at_a_time() {
    let up = Upstream::start(script(|s| s.no_pipelining = true)).await;
    let relay = relay_for(&up).await;
    assert!(send(&relay, &["x@dest.example"]).await.starts_with("250"));
    for cmd in ["MAIL", "RCPT", "DATA"] {
        assert_eq!(up.ahead_of(1, cmd), Some(0), "{cmd}");
    }
}

#[tokio::test]
async fn a_refused_recipient_in_a_batch_lets_no_data_through_and_keeps_the_connection() {
    let up = Upstream::start(script(|s| {
        s.rcpt
            .insert("bad@dest.example".into(), "550 5.1.1 No such user".into());
    }))
    .await;
    let relay = relay_for(&up).await;
    let reply = send(&relay, &["bad@dest.example"]).await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert!(up.received().is_empty());
    assert_eq!(up.aborted_data(), 0);
    let log = up.commands_of(1);
    assert!(log.iter().any(|c| c == "RSET"), "{log:?}");
    assert!(send(&relay, &["x@dest.example"]).await.starts_with("250"));
    assert_eq!(up.connections(), 1, "the connection was kept");
}

#[tokio::test]
async fn a_4xx_to_mail_and_a_5xx_to_data_are_the_clients_reply_and_nothing_is_sent() {
    let up = Upstream::start(script(|s| s.mail = Some("451 4.3.0 try later".into()))).await;
    let relay = relay_for(&up).await;
    let reply = send(&relay, &["x@dest.example"]).await;
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    assert!(up.received().is_empty());

    let up = Upstream::start(script(|s| {
        s.data_reply = Some("554 5.7.1 Delivery not authorized".into())
    }))
    .await;
    let relay = relay_for(&up).await;
    let reply = send(&relay, &["x@dest.example"]).await;
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    assert!(up.received().is_empty());
    assert!(up.commands_of(1).iter().any(|c| c == "RSET"));
    up.script(|s| s.data_reply = None);
    assert!(send(&relay, &["x@dest.example"]).await.starts_with("250"));
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_upstream_that_says_354_after_refusing_the_recipient_gets_no_message() {
    let up = Upstream::start(script(|s| {
        s.rcpt
            .insert("bad@dest.example".into(), "550 5.1.1 No such user".into());
        s.data_reply = Some("354 go ahead".into());
    }))
    .await;
    let relay = relay_for(&up).await;
    let reply = send(&relay, &["bad@dest.example"]).await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    common::eventually(|| up.open() == 0).await;
    let log = up.commands_of(1);
    assert_eq!(
        log.last().map(String::as_str),
        Some("DATA"),
        "nothing after DATA: {log:?}"
    );
    up.script(|s| s.data_reply = None);
    assert!(send(&relay, &["x@dest.example"]).await.starts_with("250"));
    assert_eq!(
        up.connections(),
        2,
        "that connection was dropped, not reused"
    );
}
