//! Reloading the config: new messages use it, a message in flight finishes on the old one,
//! open connections are kept, and changed credentials never reuse an old connection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, Script, Upstream};
use project_relay::{Config, Listeners, Server};
use tokio_util::sync::CancellationToken;

fn config(up: &Upstream, password: &str) -> Config {
    let text = format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpUsername = \"u\"\nsmtpPassword = \"{password}\"\nsmtpFromAddress = \"noreply@acme.example\"\n",
        up.port()
    );
    Config::from_toml_str(&text, &common::repo()).unwrap()
}

fn upstream_script() -> Script {
    Script {
        auth: vec![("u".into(), "one".into()), ("u".into(), "two".into())],
        delay_after_data: Some(Duration::from_millis(600)),
        ..Script::default()
    }
}

const MSG: &[u8] = b"X-Project-Id: acme\r\n\r\nhi\r\n";

#[tokio::test]
async fn reload_applies_to_the_next_message_and_keeps_connections() {
    let first = Upstream::start(upstream_script()).await;
    let second = Upstream::start(upstream_script()).await;
    let cfg = config(&first, "one");
    let listeners = Listeners::bind(&cfg).await.unwrap();
    let addr = listeners.smtp_addr().unwrap();
    let server = Server::new(Arc::new(cfg), listeners).unwrap();
    let reloader = server.reloader();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));

    let mut c = Client::connect(addr).await;
    c.expect(220).await;
    c.cmd("EHLO me", 250).await;
    c.cmd("MAIL FROM:<a@app.example>", 250).await;
    c.cmd("RCPT TO:<x@dest.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send_raw(&common::stuff(MSG)).await;
    // While the first upstream is still answering, switch acme to the second one.
    common::eventually(|| first.commands().iter().any(|c| c == "DATA")).await;
    reloader.reload(config(&second, "two")).unwrap();
    let reply = c.reply().await;
    assert!(
        reply.starts_with("250"),
        "in-flight message finished: {reply}"
    );
    assert_eq!(first.received().len(), 1);

    // Same connection, next message: the new config.
    let reply = c.mail("a@app.example", &["x@dest.example"], MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(second.received().len(), 1);
    assert_eq!(second.received()[0].auth_user.as_deref(), Some("u"));
    assert_eq!(first.received().len(), 1);

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn changed_credentials_make_a_new_connection() {
    let up = Upstream::start(Script {
        delay_after_data: None,
        ..upstream_script()
    })
    .await;
    let cfg = config(&up, "one");
    let listeners = Listeners::bind(&cfg).await.unwrap();
    let addr = listeners.smtp_addr().unwrap();
    let server = Server::new(Arc::new(cfg), listeners).unwrap();
    let reloader = server.reloader();
    let shutdown = CancellationToken::new();
    let _task = tokio::spawn(server.run(shutdown.clone()));

    let mut c = Client::connect(addr).await;
    c.expect(220).await;
    assert!(
        c.send_mail("a@app.example", &["x@dest.example"], MSG)
            .await
            .starts_with("250")
    );
    assert!(
        c.mail("a@app.example", &["x@dest.example"], MSG)
            .await
            .starts_with("250")
    );
    assert_eq!(up.connections(), 1);
    reloader.reload(config(&up, "two")).unwrap();
    assert!(
        c.mail("a@app.example", &["x@dest.example"], MSG)
            .await
            .starts_with("250")
    );
    assert_eq!(up.connections(), 2);
    let got = up.received();
    assert_ne!(got[1].connection, got[2].connection);
    shutdown.cancel();
}
