//! Whole-relay tests over loopback: routing, From rules, byte-exactness, capture.

mod common;

use common::{Client, Relay, Script, Upstream};
use lettre::AsyncTransport;

/// A relay with project `acme` on `project` upstream and the server provider on `server`.
fn config(project: &Upstream, server: &Upstream, extra: &str) -> String {
    format!(
        r#"
[server]
allowProjectSmtp = {allow}
supportEmail = "Example <noreply@example.com>"
approvedSenderEmails = "alerts@example.com, billing@example.com"
[server.smtp]
host = "127.0.0.1"
port = {server_port}

[upstream]
timeout_secs = 5

[projects.acme]
smtpHost = "127.0.0.1"
smtpPort = {project_port}
smtpUsername = "apikey"
smtpPassword = "s3cret-acme"
smtpFromAddress = "Acme <noreply@acme.example>"
smtpApprovedSenders = "alice@acme.example, Bob@Acme.example"

[projects.plain]
appName = "Plain"

[projects.broken]
smtpHost = "127.0.0.1"
smtpPort = "{project_port}"
smtpUsername = "apikey"
smtpPassword = ""
smtpFromAddress = "noreply@broken.example"
{extra}
"#,
        allow = !extra.contains("allow=false"),
        server_port = server.port(),
        project_port = project.port(),
        extra = extra.replace("allow=false", ""),
    )
}

fn auth_script() -> Script {
    Script {
        auth: vec![("apikey".into(), "s3cret-acme".into())],
        ..Script::default()
    }
}

async fn setup(extra: &str) -> (Relay, Upstream, Upstream) {
    let project = Upstream::start(auth_script()).await;
    let server = Upstream::start(Script::default()).await;
    let relay = Relay::start(&config(&project, &server, extra)).await;
    (relay, project, server)
}

const BODY: &str = "Subject: test\r\nTo: Carol <carol@dest.example>\r\n\r\nline one\r\n.starts with a dot\r\n..two dots\r\n.\r\nnon-ascii: h\u{e9}llo w\u{f6}rld\r\n";

#[tokio::test]
async fn project_mail_goes_to_the_project_relay_byte_exact() {
    let (relay, project, server) = setup("").await;
    let mut long_line = "x".repeat(998);
    long_line.push_str("\r\n");
    let msg = format!(
        "Received: from app\r\n\tby host; folded\r\nX-Project-Id: acme\r\nFrom: Alice A <alice@acme.example>\r\n{BODY}{long_line}"
    );
    let mut c = relay.client().await;
    let reply = c
        .send_mail(
            "bounce@app.example",
            &["carol@dest.example"],
            msg.as_bytes(),
        )
        .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(
        reply.contains("queued as TEST"),
        "upstream's text passed on: {reply}"
    );

    let got = project.received();
    assert_eq!(got.len(), 1);
    assert!(server.received().is_empty());
    assert_eq!(got[0].mail_from, "alice@acme.example");
    assert_eq!(got[0].rcpts, ["carol@dest.example"]);
    assert_eq!(got[0].auth_user.as_deref(), Some("apikey"));
    let expected = msg.replace("X-Project-Id: acme\r\n", "");
    assert_eq!(String::from_utf8_lossy(&got[0].data), expected);
    // Dot-stuffed on the wire, and no extra empty line before the end marker.
    let wire = String::from_utf8_lossy(&got[0].wire);
    assert!(
        wire.contains("\r\n..starts with a dot\r\n...two dots\r\n..\r\n"),
        "{wire}"
    );
    assert!(wire.ends_with(&format!("{long_line}.\r\n")), "{wire:?}");
    assert!(
        got[0].mail_params.contains("BODY=8BITMIME"),
        "8-bit announced: {}",
        got[0].mail_params
    );
}

#[tokio::test]
async fn unapproved_from_is_replaced_by_the_project_default() {
    let (relay, project, _server) = setup("").await;
    let msg = "X-Project-Id: acme\r\nFrom: Mallory <mallory@acme.example>\r\nSender: mallory@acme.example\r\nSubject: s\r\n\r\nhi\r\n";
    let mut c = relay.client().await;
    let reply = c
        .send_mail("mallory@acme.example", &["x@dest.example"], msg.as_bytes())
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = project.received();
    assert_eq!(got[0].mail_from, "noreply@acme.example");
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: Acme <noreply@acme.example>\r\nSender: noreply@acme.example\r\nSubject: s\r\n\r\nhi\r\n"
    );
}

#[tokio::test]
async fn approved_from_matches_case_insensitively_and_keeps_its_name() {
    let (relay, project, _server) = setup("").await;
    let msg = "x-project-id:  acme \r\nFrom: \"Bob, the builder\" <bob@ACME.example>\r\n\r\nhi\r\n";
    let mut c = relay.client().await;
    assert!(
        c.send_mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    let got = project.received();
    assert_eq!(got[0].mail_from, "bob@ACME.example");
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: \"Bob, the builder\" <bob@ACME.example>\r\n\r\nhi\r\n"
    );
}

#[tokio::test]
async fn a_from_strict_readers_read_as_another_address_is_replaced() {
    let (relay, project, _server) = setup("").await;
    // mail-parser reads alice (approved); a strict RFC 5322 reader reads evil, or nothing.
    let msg = "X-Project-Id: acme\r\nFrom: evil@evil.example <alice@acme.example>\r\nSubject: s\r\n\r\nhi\r\n";
    let mut c = relay.client().await;
    let reply = c
        .send_mail("alice@acme.example", &["x@dest.example"], msg.as_bytes())
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = project.received();
    assert_eq!(got[0].mail_from, "noreply@acme.example");
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: Acme <noreply@acme.example>\r\nSubject: s\r\n\r\nhi\r\n"
    );
}

#[tokio::test]
async fn missing_from_is_added_and_several_become_one() {
    let (relay, project, _server) = setup("").await;
    let mut c = relay.client().await;
    let msg = "X-Project-Id: acme\r\nSubject: none\r\n\r\nhi\r\n";
    assert!(
        c.send_mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    let msg =
        "From: alice@acme.example\r\nX-Project-Id: acme\r\nFrom: bob@acme.example\r\n\r\nhi\r\n";
    assert!(
        c.mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    let got = project.received();
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: Acme <noreply@acme.example>\r\nSubject: none\r\n\r\nhi\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&got[1].data),
        "From: Acme <noreply@acme.example>\r\n\r\nhi\r\n"
    );
}

#[tokio::test]
async fn server_routes_use_the_server_rules() {
    let (relay, project, server) = setup("").await;
    let mut c = relay.client().await;
    c.cmd("EHLO client.test", 250).await;
    for (i, header) in ["", "X-Project-Id: nosuch\r\n", "X-Project-Id: plain\r\n"]
        .iter()
        .enumerate()
    {
        // alice is approved for acme only: on the server transport she is replaced.
        let msg = format!("{header}From: alice@acme.example\r\n\r\nmsg {i}\r\n");
        let reply = c
            .mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await;
        assert!(reply.starts_with("250"), "{reply}");
        let got = server.received();
        assert_eq!(got[i].mail_from, "noreply@example.com");
        assert_eq!(
            String::from_utf8_lossy(&got[i].data),
            format!("From: Example <noreply@example.com>\r\n\r\nmsg {i}\r\n")
        );
    }
    // A server-approved sender is kept.
    let msg = "From: Alerts <alerts@example.com>\r\n\r\nhi\r\n";
    assert!(
        c.mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    assert_eq!(server.received()[3].mail_from, "alerts@example.com");
    assert!(project.received().is_empty());
    assert_eq!(project.connections(), 0);
}

#[tokio::test]
async fn allow_project_smtp_false_routes_everything_to_the_server() {
    let (relay, project, server) = setup("allow=false").await;
    let mut c = relay.client().await;
    for id in ["acme", "broken"] {
        let msg = format!("X-Project-Id: {id}\r\nFrom: alice@acme.example\r\n\r\nhi\r\n");
        let reply = c.mail_greeted(&msg).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert_eq!(server.received().len(), 2);
    assert_eq!(server.received()[0].mail_from, "noreply@example.com");
    assert_eq!(project.connections(), 0);
}

#[tokio::test]
async fn misconfigured_project_is_refused_and_nothing_is_sent() {
    let (relay, project, server) = setup("").await;
    let mut c = relay.client().await;
    let msg = "X-Project-Id: broken\r\nFrom: a@broken.example\r\n\r\nhi\r\n";
    let reply = c
        .send_mail("b@app.example", &["x@dest.example"], msg.as_bytes())
        .await;
    assert!(
        reply.starts_with("451 4.3.5 Project SMTP configuration is incomplete or invalid"),
        "{reply}"
    );
    assert!(
        reply.contains("smtpPort") && reply.contains("smtpPassword"),
        "{reply}"
    );
    assert!(!reply.contains("smtpUsername"), "{reply}");
    assert_eq!(project.connections() + server.connections(), 0);
    // Other projects keep working on the same session.
    let msg = "X-Project-Id: acme\r\nFrom: alice@acme.example\r\n\r\nhi\r\n";
    assert!(
        c.mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    assert_eq!(project.received().len(), 1);
}

#[tokio::test]
async fn two_project_headers_are_refused() {
    let (relay, project, server) = setup("").await;
    let mut c = relay.client().await;
    let msg = "X-Project-Id: acme\r\nX-PROJECT-ID: acme\r\n\r\nhi\r\n";
    let reply = c
        .send_mail("b@app.example", &["x@dest.example"], msg.as_bytes())
        .await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert_eq!(project.connections() + server.connections(), 0);
}

#[tokio::test]
async fn no_server_provider_is_refused_not_dropped() {
    let project = Upstream::start(auth_script()).await;
    let relay = Relay::start(&format!(
        "[server]\nsupportEmail = \"noreply@example.com\"\n[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpUsername = \"apikey\"\nsmtpPassword = \"s3cret-acme\"\nsmtpFromAddress = \"noreply@acme.example\"\n",
        project.port()
    ))
    .await;
    let mut c = relay.client().await;
    let reply = c
        .send_mail(
            "b@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("451 4.3.5"), "{reply}");
    let reply = c
        .mail(
            "b@app.example",
            &["x@dest.example"],
            b"X-Project-Id: acme\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test]
async fn several_recipients_reach_the_upstream() {
    let (relay, project, _server) = setup("").await;
    let mut c = relay.client().await;
    let rcpts = ["a@one.example", "b@two.example", "c@three.example"];
    let reply = c
        .send_mail("b@app.example", &rcpts, b"X-Project-Id: acme\r\n\r\nhi\r\n")
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(project.received()[0].rcpts, rcpts);
}

#[tokio::test]
async fn ten_megabyte_message_is_byte_exact() {
    let (relay, project, _server) = setup("").await;
    let mut msg =
        b"X-Project-Id: acme\r\nFrom: alice@acme.example\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while msg.len() < 10 * 1024 * 1024 {
        // Varied lines: some start with a dot, some are 8-bit.
        let line = match i % 5 {
            0 => format!(".{i:0>70}\r\n"),
            1 => format!("{}\r\n", "\u{e9}".repeat(30)),
            _ => format!("{i:x>76}\r\n"),
        };
        msg.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let mut c = relay.client().await;
    let reply = c
        .send_mail("b@app.example", &["x@dest.example"], &msg)
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = project.received();
    let expected = &msg[b"X-Project-Id: acme\r\n".len()..];
    assert!(got[0].data == expected, "10 MB message differs");
}

#[tokio::test]
async fn capture_transport_writes_eml_and_envelope() {
    let relay = Relay::start(
        "[server]\nsupportEmail = \"Example <noreply@example.com>\"\n[server.capture]\ndir = \"{dir}/outbox\"\n[projects.demo]\nappName = \"Demo\"\n",
    )
    .await;
    let mut c = relay.client().await;
    let msg = "X-Project-Id: demo\r\nFrom: someone@else.example\r\nSubject: s\r\n\r\nhi\r\n";
    let reply = c
        .send_mail(
            "app@else.example",
            &["x@dest.example", "y@dest.example"],
            msg.as_bytes(),
        )
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: captured as"), "{reply}");
    let c2 = c
        .mail(
            "app@else.example",
            &["z@dest.example"],
            b"Subject: server\r\n\r\nhi\r\n",
        )
        .await;
    assert!(c2.starts_with("250"), "{c2}");

    let files = |sub: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(relay.dir().join("outbox").join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let demo = files("demo");
    assert_eq!(demo.len(), 2, "{demo:?}");
    let (eml, json) = (&demo[0], &demo[1]);
    assert_eq!(eml.extension().unwrap(), "eml");
    assert_eq!(json.extension().unwrap(), "json");
    assert_eq!(eml.file_stem(), json.file_stem());
    assert_eq!(
        std::fs::read_to_string(eml).unwrap(),
        "From: Example <noreply@example.com>\r\nSubject: s\r\n\r\nhi\r\n"
    );
    let env: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    assert_eq!(env["project"], "demo");
    assert_eq!(env["mail_from"], "noreply@example.com");
    assert_eq!(env["client_mail_from"], "app@else.example");
    assert_eq!(
        env["recipients"],
        serde_json::json!(["x@dest.example", "y@dest.example"])
    );
    assert_eq!(env["original_from"], "someone@else.example");
    assert_eq!(env["resolved_from"], "Example <noreply@example.com>");
    assert_eq!(env["from_rewritten"], true);
    assert_eq!(env["transport"], "capture");
    assert_eq!(files("_server").len(), 2);
}

#[tokio::test]
async fn lettre_client_happy_path() {
    let (relay, project, _server) = setup("").await;
    let transport =
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(relay.smtp.port())
            .build();
    let envelope = lettre::address::Envelope::new(
        Some("app@app.example".parse().unwrap()),
        vec!["carol@dest.example".parse().unwrap()],
    )
    .unwrap();
    // lettre appends CRLF.CRLF itself, so the message's last line goes without its CRLF.
    let msg = b"X-Project-Id: acme\r\nFrom: Alice <alice@acme.example>\r\nSubject: via lettre\r\n\r\n.hello";
    let response = transport
        .send_raw(&envelope, msg)
        .await
        .expect("relay accepts");
    assert_eq!(response.code().to_string(), "250");
    let got = project.received();
    assert_eq!(got[0].mail_from, "alice@acme.example");
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: Alice <alice@acme.example>\r\nSubject: via lettre\r\n\r\n.hello\r\n"
    );
}

#[tokio::test]
async fn the_shipped_relay_toml_runs() {
    let mut config = project_relay::Config::load(&common::repo().join("relay.toml"))
        .expect("shipped relay.toml is valid");
    let dir = tempfile::tempdir().unwrap();
    config.listener.smtp = Some("127.0.0.1:0".into());
    config.listener.smtps = Some("127.0.0.1:0".into());
    assert_eq!(config.admin_listen.as_deref(), Some("127.0.0.1:8025"));
    config.admin_listen = Some("127.0.0.1:0".into());
    let project_relay::config::Provider::Capture(outbox) = config.server.provider.as_mut().unwrap()
    else {
        panic!("the shipped relay.toml captures server mail")
    };
    assert!(outbox.ends_with("outbox"));
    *outbox = dir.path().join("outbox");
    let relay = Relay::start_config(config, dir).await;
    let mut c = relay.client().await;
    let ehlo = c.cmd("EHLO me", 250).await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    let reply = c
        .mail(
            "me@app.example",
            &["you@example.com"],
            b"X-Project-Id: demo\r\nSubject: hi\r\n\r\nhello\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let written: Vec<_> = std::fs::read_dir(relay.dir().join("outbox/demo"))
        .unwrap()
        .collect();
    assert_eq!(written.len(), 2);
    assert!(relay.smtps.is_some());
    // The admin page the README points at.
    let page = format!("http://{}/", relay.admin.unwrap());
    let (status, html) = common::http("GET", page).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<title>project-relay</title>"), "{html}");
}

impl Client<tokio::net::TcpStream> {
    /// MAIL/RCPT/DATA with a fixed envelope, on a session greeted earlier or now.
    async fn mail_greeted(&mut self, msg: &str) -> String {
        self.send("RSET").await;
        let r = self.reply().await;
        if r.starts_with("503") || r.starts_with("250") {
            self.send("EHLO client.test").await;
            self.reply().await;
        }
        self.mail("b@app.example", &["x@dest.example"], msg.as_bytes())
            .await
    }
}

#[tokio::test]
async fn smtputf8_recipients_and_headers_pass_through() {
    let project = Upstream::start(Script {
        smtputf8: true,
        ..auth_script()
    })
    .await;
    let server = Upstream::start(Script::default()).await;
    let relay = Relay::start(&config(&project, &server, "")).await;
    let mut c = relay.client().await;
    c.cmd("EHLO client.test", 250).await;
    c.cmd("MAIL FROM:<jörg@app.example> SMTPUTF8", 250).await;
    c.cmd("RCPT TO:<josé@bücher.example>", 250).await;
    c.cmd("DATA", 354).await;
    let msg = "X-Project-Id: acme\r\nFrom: Jörg <jörg@app.example>\r\nSubject: Grüße\r\n\r\nÄ\r\n";
    c.send_raw(&common::stuff(msg.as_bytes())).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = project.received();
    assert_eq!(got[0].rcpts, ["josé@bücher.example"]);
    assert!(
        got[0].mail_params.contains("SMTPUTF8"),
        "{}",
        got[0].mail_params
    );
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        "From: Acme <noreply@acme.example>\r\nSubject: Grüße\r\n\r\nÄ\r\n"
    );
    // An upstream without SMTPUTF8 cannot take a non-ASCII recipient: a clear 5xx.
    project.script(|s| s.smtputf8 = false);
    project.kill_connections(); // so the relay sees the new EHLO
    c.cmd("MAIL FROM:<a@app.example> SMTPUTF8", 250).await;
    c.cmd("RCPT TO:<josé@bücher.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send_raw(&common::stuff(b"X-Project-Id: acme\r\n\r\nx\r\n"))
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("554 5.3.3"), "{reply}");
}

#[tokio::test]
async fn app_name_names_a_bare_project_from() {
    let project = Upstream::start(auth_script()).await;
    let server = Upstream::start(Script::default()).await;
    let relay = Relay::start(&config(&project, &server, "").replace(
        "smtpFromAddress = \"Acme <noreply@acme.example>\"",
        "smtpFromAddress = \"noreply@acme.example\"\nappName = \"Acme Health\"",
    ))
    .await;
    let mut c = relay.client().await;
    let reply = c
        .send_mail(
            "b@app.example",
            &["x@dest.example"],
            b"X-Project-Id: acme\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(
        String::from_utf8_lossy(&project.received()[0].data),
        "From: Acme Health <noreply@acme.example>\r\n\r\nhi\r\n"
    );
}
