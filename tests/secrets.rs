//! Passwords never show: the relay runs at the most verbose log level, relays through an
//! upstream that wants AUTH, takes listener AUTH (right and wrong), and its logs, replies and
//! `check` output are searched for every password and its base64 forms.

mod common;

use base64::Engine;
use common::{Client, Script, Upstream};

const UPSTREAM_PW: &str = "Upstream-S3cret-pw";
const RELAY_PW: &str = "Listener-S3cret-pw";
const SERVER_PW: &str = "Server-S3cret-pw";

fn forms(pw: &str, user: &str) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    vec![
        pw.to_string(),
        b64(pw),
        b64(&format!("\0{user}\0{pw}")),
        b64(&format!("{user}\0{user}\0{pw}")),
    ]
}

#[tokio::test]
async fn no_password_in_logs_replies_or_check_output() {
    let up = Upstream::start(Script {
        auth: vec![("up-user".into(), UPSTREAM_PW.into())],
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[listener]
smtp = "127.0.0.1:0"
allow_plaintext_auth = true
auth_failure_delay_ms = 1
[server]
supportEmail = "noreply@example.com"
[server.smtp]
host = "127.0.0.1"
port = 9
username = "server-user"
password = "{SERVER_PW}"
[projects.acme]
smtpHost = "127.0.0.1"
smtpPort = {port}
smtpUsername = "up-user"
smtpPassword = "{UPSTREAM_PW}"
smtpFromAddress = "noreply@acme.example"
relayUsername = "app"
relayPassword = "{RELAY_PW}"
[projects.wrongpw]
smtpHost = "127.0.0.1"
smtpPort = {port}
smtpUsername = "up-user"
smtpPassword = "{UPSTREAM_PW}-wrong"
smtpFromAddress = "noreply@wrong.example"
"#,
            port = up.port()
        ),
    )
    .unwrap();
    let mut cmd = common::process::command();
    cmd.arg("--config").arg(&path).env("RUST_LOG", "trace");
    let mut relay = common::process::Process::start(cmd);
    let addr = relay.listening();

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut replies = String::new();
    let mut c = Client::connect(addr).await;
    replies += &c.reply().await;
    replies += &c.cmd("EHLO me", 250).await;
    replies += &c
        .cmd(
            &format!("AUTH PLAIN {}", b64(&format!("\0app\0{RELAY_PW}x"))),
            535,
        )
        .await;
    replies += &c
        .cmd(
            &format!("AUTH PLAIN {}", b64(&format!("\0app\0{RELAY_PW}"))),
            235,
        )
        .await;
    replies += &c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    let mut c = Client::connect(addr).await;
    c.reply().await;
    c.cmd("EHLO me", 250).await;
    replies += &c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"X-Project-Id: wrongpw\r\n\r\nhi\r\n",
        )
        .await;
    replies += &c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"Subject: server\r\n\r\nhi\r\n",
        )
        .await;
    c.cmd("QUIT", 221).await;
    assert_eq!(up.received().len(), 1, "{replies}");

    let (_, log) = relay.stop();

    let check = common::process::command()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let check = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    assert!(
        log.contains("AUTH failed"),
        "the log is verbose enough to matter"
    );
    for (pw, user) in [
        (UPSTREAM_PW, "up-user"),
        (RELAY_PW, "app"),
        (SERVER_PW, "server-user"),
    ] {
        for form in forms(pw, user) {
            assert!(!log.contains(&form), "{form} in the log");
            assert!(!replies.contains(&form), "{form} in a reply");
            assert!(!check.contains(&form), "{form} in check output");
        }
    }
}
