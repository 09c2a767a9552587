//! Who may send: the loopback default, the allow list, listener AUTH bound to a project,
//! AUTH throttling, per-address limits, and the PROXY protocol that carries the real client
//! address through a load balancer.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{Client, Relay, Script, Upstream};
use tokio::net::TcpStream;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A relay behind a (pretend) load balancer: PROXY headers say who the client is.
async fn setup(listener_extra: &str) -> (Relay, Upstream, Upstream) {
    let acme = Upstream::start(Script {
        auth: vec![("u".into(), "p".into())],
        ..Script::default()
    })
    .await;
    let server = Upstream::start(Script::default()).await;
    let relay = Relay::start(&format!(
        r#"
[listener]
smtp = "127.0.0.1:0"
hostname = "relay.test"
certificate = "certs/localhost.crt"
private_key = "certs/localhost.key"
proxy_protocol = true
auth_failure_delay_ms = 300
{listener_extra}
[server]
supportEmail = "noreply@example.com"
[server.smtp]
host = "127.0.0.1"
port = {server}
[projects.acme]
smtpHost = "127.0.0.1"
smtpPort = {acme}
smtpUsername = "u"
smtpPassword = "p"
smtpFromAddress = "noreply@acme.example"
relayUsername = "acme-app"
relayPassword = ["old-pass", "acme-pass"]
[projects.beta]
relayUsername = "beta-app"
relayPassword = "beta-pass"
"#,
        server = server.port(),
        acme = acme.port()
    ))
    .await;
    (relay, acme, server)
}

async fn from(relay: &Relay, client: &str) -> Client<TcpStream> {
    let mut c = Client::connect(relay.smtp).await;
    c.send(&format!("PROXY TCP4 {client} 127.0.0.1 40000 25"))
        .await;
    c
}

async fn starttls(mut c: Client<TcpStream>) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    c.cmd("EHLO me", 250).await;
    c.cmd("STARTTLS", 220).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::tls_client()
        .connect(name, c.stream.into_inner())
        .await
        .unwrap();
    let mut c = Client::new(tls);
    c.cmd("EHLO me", 250).await;
    c
}

#[tokio::test]
async fn only_loopback_may_send_by_default() {
    // No relay users: a stranger is turned away at connect.
    let up = Upstream::start(Script::default()).await;
    let relay = Relay::start(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nproxy_protocol = true\n[server]\nsupportEmail = \"n@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
        up.port()
    ))
    .await;
    let mut c = from(&relay, "203.0.113.5").await;
    assert!(c.expect(554).await.starts_with("554 5.7.1"));
    assert!(c.closed().await);
    // A header that names a loopback address is not this machine: no loopback trust.
    for named in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        let mut c = Client::connect(relay.smtp).await;
        let family = if named.contains(':') { "TCP6" } else { "TCP4" };
        let dst = if named.contains(':') {
            "::1"
        } else {
            "127.0.0.1"
        };
        c.send(&format!("PROXY {family} {named} {dst} 40000 25"))
            .await;
        let reply = c.expect(554).await;
        assert!(reply.starts_with("554 5.7.1"), "{named}: {reply}");
    }
    // Neither do UNKNOWN and v2 LOCAL: they are clients from outside the allow list.
    let mut c = Client::connect(relay.smtp).await;
    c.send("PROXY UNKNOWN").await;
    assert!(c.expect(554).await.starts_with("554 5.7.1"));
    let mut c = Client::connect(relay.smtp).await;
    c.send_raw(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00").await;
    assert!(c.expect(554).await.starts_with("554 5.7.1"));
    assert!(up.received().is_empty());
}

#[tokio::test]
async fn a_named_loopback_address_is_trusted_only_when_allow_names_it() {
    let up = Upstream::start(Script::default()).await;
    let relay = Relay::start(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nproxy_protocol = true\nallow = [\"127.0.0.1\"]\n[server]\nsupportEmail = \"n@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
        up.port()
    ))
    .await;
    let mut c = from(&relay, "127.0.0.1").await;
    c.expect(220).await;
    let reply = c
        .send_mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test]
async fn only_the_load_balancer_may_send_a_proxy_header() {
    let up = Upstream::start(Script::default()).await;
    let config = |from: &str| {
        format!(
            "[listener]\nsmtp = \"127.0.0.1:0\"\nproxy_protocol = true\nallow = [\"203.0.113.0/24\"]\n{from}\n[server]\nsupportEmail = \"n@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
            up.port()
        )
    };
    // This peer (loopback) is not the load balancer: closed before the greeting, whatever
    // its header says.
    let relay = Relay::start(&config("proxy_protocol_from = [\"192.0.2.0/24\"]")).await;
    let mut c = from(&relay, "203.0.113.5").await;
    assert!(c.closed().await, "closed without a greeting");
    // Named as the load balancer: its header is believed.
    let relay = Relay::start(&config("proxy_protocol_from = [\"127.0.0.1/32\"]")).await;
    let mut c = from(&relay, "203.0.113.5").await;
    c.expect(220).await;
    // A header that arrives in pieces, slowly, is waited for.
    let mut c = Client::connect(relay.smtp).await;
    for piece in ["PROXY TCP4 203.0", ".113.9 127.0.0.1 ", "40000 25\r\n"] {
        c.send_raw(piece.as_bytes()).await;
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    c.expect(220).await;
    c.cmd("EHLO me", 250).await;
}

#[tokio::test]
async fn the_allow_list_widens_it() {
    let (relay, _acme, server) = setup("allow = [\"203.0.113.0/24\"]").await;
    let mut c = from(&relay, "203.0.113.77").await;
    c.expect(220).await;
    assert!(
        c.send_mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n"
        )
        .await
        .starts_with("250")
    );
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn a_stranger_must_authenticate_and_is_bound_to_its_project() {
    let (relay, acme, server) = setup("").await;
    let mut c = from(&relay, "198.51.100.9").await;
    c.expect(220).await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(!ehlo.contains("AUTH"), "AUTH only after TLS: {ehlo}");
    c.cmd("MAIL FROM:<a@app.example>", 554).await;
    c.cmd(&format!("AUTH PLAIN {}", b64("\0acme-app\0acme-pass")), 538)
        .await;
    let mut c = starttls(c).await;
    c.cmd(&format!("AUTH PLAIN {}", b64("\0acme-app\0acme-pass")), 235)
        .await;
    // No project header: the authenticated project.
    let reply = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(acme.received()[0].mail_from, "noreply@acme.example");
    // A header naming another project is refused.
    let reply = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"X-Project-Id: beta\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let reply = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"X-Project-Id: acme\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(acme.received().len(), 2);
    assert!(server.received().is_empty());
}

#[tokio::test]
async fn auth_login_and_a_rotated_password() {
    let (relay, _acme, server) = setup("").await;
    let c = from(&relay, "198.51.100.9").await;
    let mut c = {
        let mut c = c;
        c.expect(220).await;
        starttls(c).await
    };
    c.cmd("AUTH LOGIN", 334).await;
    c.cmd(&b64("beta-app"), 334).await;
    c.cmd(&b64("beta-pass"), 235).await;
    let reply = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    // beta has no project SMTP: server transport.
    assert_eq!(server.received().len(), 1);

    let mut c = from(&relay, "198.51.100.9").await;
    c.expect(220).await;
    let mut c = starttls(c).await;
    c.cmd(&format!("AUTH PLAIN {}", b64("\0acme-app\0old-pass")), 235)
        .await;
}

#[tokio::test]
async fn failed_auth_is_slowed_down_and_then_disconnected() {
    let (relay, _acme, _server) = setup("").await;
    let mut c = from(&relay, "198.51.100.10").await;
    c.expect(220).await;
    let mut c = starttls(c).await;
    let bad = format!("AUTH PLAIN {}", b64("\0acme-app\0guess"));
    let started = Instant::now();
    assert!(c.cmd(&bad, 535).await.starts_with("535 5.7.8"));
    let first = started.elapsed();
    assert!(first >= Duration::from_millis(300), "{first:?}");
    c.cmd(&bad, 535).await;
    c.cmd(&bad, 535).await;
    // Failures 1+2+3 from this address: at least 300 + 600 + 900 ms in all.
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    assert!(c.expect(421).await.starts_with("421 4.7.0"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn require_auth_applies_to_trusted_peers_too() {
    // A real loopback peer (a PROXY header naming 127.0.0.1 is not one).
    let direct = Relay::start(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nrequire_auth = true\nallow_plaintext_auth = true\n[server.capture]\ndir = \"{dir}/outbox\"\n[server]\nsupportEmail = \"n@example.com\"\n[projects.beta]\nrelayUsername = \"beta-app\"\nrelayPassword = \"beta-pass\"\n",
    )
    .await;
    let mut c = direct.client().await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "plaintext AUTH allowed on loopback: {ehlo}"
    );
    assert!(
        c.cmd("MAIL FROM:<a@app.example>", 530)
            .await
            .starts_with("530 5.7.0")
    );
    c.cmd(&format!("AUTH PLAIN {}", b64("\0beta-app\0beta-pass")), 235)
        .await;
    c.cmd("MAIL FROM:<a@app.example>", 250).await;
    // Plaintext AUTH is for loopback only.
    let (relay, _acme, _server) = setup("require_auth = true\nallow_plaintext_auth = true").await;
    let mut c = from(&relay, "198.51.100.11").await;
    c.expect(220).await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let (relay, _acme, _server) =
        setup("max_connections_per_ip = 2\nallow = [\"192.0.2.0/24\"]").await;
    let mut a = from(&relay, "192.0.2.1").await;
    a.expect(220).await;
    let mut b = from(&relay, "192.0.2.1").await;
    b.expect(220).await;
    let mut c = from(&relay, "192.0.2.1").await;
    assert!(c.expect(421).await.starts_with("421 4.7.0"));
    // Another address is not affected, and loopback is never capped.
    let mut d = from(&relay, "192.0.2.2").await;
    d.expect(220).await;
    for _ in 0..3 {
        let mut l = from(&relay, "127.0.0.1").await;
        l.expect(220).await;
    }
    // A slot comes back when a session ends.
    a.cmd("QUIT", 221).await;
    assert!(a.closed().await);
    common::eventually(|| true).await;
    let mut ok = false;
    for _ in 0..50 {
        let mut e = from(&relay, "192.0.2.1").await;
        if e.reply().await.starts_with("220") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn proxy_protocol_v2_and_missing_headers() {
    let (relay, _acme, _server) = setup("").await;
    // v2, TCP4 from 127.0.0.1: a named loopback address is not this machine; it must
    // authenticate like any client outside the allow list.
    let mut c = Client::connect(relay.smtp).await;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1, 0x9c, 0x40, 0, 25]);
    c.send_raw(&header).await;
    c.expect(220).await;
    c.cmd("EHLO me", 250).await;
    c.cmd("MAIL FROM:<a@app.example>", 554).await;
    // v2 from a stranger: must authenticate.
    let mut c = Client::connect(relay.smtp).await;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1, 0x9c, 0x40, 0, 25]);
    c.send_raw(&header).await;
    c.expect(220).await;
    c.cmd("EHLO me", 250).await;
    c.cmd("MAIL FROM:<a@app.example>", 554).await;
    // No header at all: closed without a word.
    let mut c = Client::connect(relay.smtp).await;
    c.send("EHLO me").await;
    assert!(c.closed().await);
}
