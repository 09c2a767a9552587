//! Graceful stop: idle sessions are told 421 4.3.0, a transaction in flight is finished.

mod common;

use std::time::Duration;

use common::{Relay, Script, Upstream};

#[tokio::test]
async fn shutdown_tells_idle_sessions_and_finishes_the_one_in_flight() {
    let up = Upstream::start(Script {
        delay_after_data: Some(Duration::from_millis(800)),
        ..Script::default()
    })
    .await;
    let mut relay = Relay::start(&format!(
        "[server]\nsupportEmail = \"noreply@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
        up.port()
    ))
    .await;
    let mut idle = relay.client().await;
    idle.cmd("EHLO idle", 250).await;
    let mut busy = relay.client().await;
    busy.cmd("EHLO busy", 250).await;
    busy.cmd("MAIL FROM:<app@app.example>", 250).await;
    busy.cmd("RCPT TO:<x@dest.example>", 250).await;
    busy.cmd("DATA", 354).await;
    busy.send_raw(b"Subject: in flight\r\n\r\nhi\r\n.\r\n")
        .await;
    // Let the message reach the upstream, then ask the relay to stop.
    common::eventually(|| up.commands().iter().any(|c| c == "DATA")).await;
    relay.shutdown.cancel();

    let r = idle.reply().await;
    assert!(r.starts_with("421 4.3.0"), "{r}");
    assert!(idle.closed().await);
    let r = busy.reply().await;
    assert!(r.starts_with("250"), "in-flight message finished: {r}");
    let r = busy.reply().await;
    assert!(r.starts_with("421 4.3.0"), "{r}");
    assert_eq!(up.received().len(), 1);

    let task = &mut relay.task;
    let result = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "run returns cleanly");
    // No new sessions after the stop.
    assert!(tokio::net::TcpStream::connect(relay.smtp).await.is_err());
}
