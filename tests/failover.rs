//! The fallback relay, the circuit that skips a failing primary, and the per-sender rate and
//! connection limits, end to end over loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Relay, Script, Upstream};

const MSG: &[u8] = b"X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n";

fn auth_script() -> Script {
    Script {
        auth: vec![("u".into(), "p".into())],
        ..Script::default()
    }
}

fn project(primary_port: u16, extra: &str) -> String {
    format!(
        "[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"{{dir}}/server\"\n\
         [projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {primary_port}\nsmtpSecure = false\nsmtpUsername = \"u\"\n\
         smtpPassword = \"p\"\nsmtpFromAddress = \"noreply@acme.example\"\n{extra}"
    )
}

fn fallback(port: u16) -> String {
    format!(
        "smtpFallbackHost = \"127.0.0.1\"\nsmtpFallbackPort = {port}\nsmtpFallbackSecure = false\nsmtpFallbackUsername = \"u\"\nsmtpFallbackPassword = \"p\"\n"
    )
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn send(relay: &Relay, to: &str) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", &[to], MSG).await
}

#[tokio::test]
async fn the_fallback_takes_mail_the_primary_could_not_take() {
    let fb = Upstream::start(auth_script()).await;
    // Refusing connections.
    let relay = Relay::start(&project(closed_port().await, &fallback(fb.port()))).await;
    let reply = send(&relay, "x@dest.example").await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(fb.received().len(), 1);

    // 421 to the greeting, and 451 to RCPT.
    for script in [
        Script {
            greeting: Some("421 4.3.2 Service not available".into()),
            ..auth_script()
        },
        Script {
            rcpt: [(
                "x@dest.example".to_owned(),
                "451 4.3.0 try later".to_owned(),
            )]
            .into(),
            ..auth_script()
        },
    ] {
        let fb = Upstream::start(auth_script()).await;
        let primary = Upstream::start(script).await;
        let relay = Relay::start(&project(primary.port(), &fallback(fb.port()))).await;
        let reply = send(&relay, "x@dest.example").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(primary.received().len(), 0);
        assert_eq!(fb.received().len(), 1);
    }
}

#[tokio::test]
async fn a_verdict_on_the_message_or_a_silence_after_the_dot_never_fails_over() {
    let fb = Upstream::start(auth_script()).await;
    let primary = Upstream::start(Script {
        rcpt: [(
            "nobody@dest.example".to_owned(),
            "550 5.1.1 no such user".to_owned(),
        )]
        .into(),
        ..auth_script()
    })
    .await;
    let relay = Relay::start(&project(primary.port(), &fallback(fb.port()))).await;
    let reply = send(&relay, "nobody@dest.example").await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert!(fb.received().is_empty());

    // Silent after the final dot: it may have been delivered, so no second copy.
    let primary = Upstream::start(Script {
        stall_after_data: true,
        ..auth_script()
    })
    .await;
    let relay = Relay::start(&format!(
        "[upstream]\ntimeout_secs = 1\n{}",
        project(primary.port(), &fallback(fb.port()))
    ))
    .await;
    let reply = send(&relay, "x@dest.example").await;
    assert!(reply.starts_with("451 4.4.2"), "{reply}");
    assert!(reply.contains("may have been delivered"), "{reply}");
    assert!(fb.received().is_empty(), "the fallback never receives it");
}

#[tokio::test]
async fn when_the_fallback_fails_too_the_client_gets_its_reply() {
    let relay = Relay::start(&project(
        closed_port().await,
        &fallback(closed_port().await),
    ))
    .await;
    let reply = send(&relay, "x@dest.example").await;
    assert!(reply.starts_with("451 4.4.1"), "{reply}");
}

#[tokio::test]
async fn the_circuit_opens_after_failures_in_a_row_and_closes_after_a_success() {
    let fb = Upstream::start(auth_script()).await;
    let primary = Upstream::start(Script {
        greeting: Some("421 4.3.2 down for maintenance".into()),
        ..auth_script()
    })
    .await;
    let relay = Relay::start(&format!(
        "[upstream]\ncircuit_failures = 2\ncircuit_open_secs = 1\n{}",
        project(primary.port(), &fallback(fb.port()))
    ))
    .await;
    for _ in 0..4 {
        assert!(send(&relay, "x@dest.example").await.starts_with("250"));
    }
    assert_eq!(primary.connections(), 2, "skipped once the circuit opened");
    assert_eq!(fb.received().len(), 4);
    primary.script(|s| s.greeting = None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, "x@dest.example").await.starts_with("250"));
    assert_eq!(
        primary.received().len(),
        1,
        "one message tried the primary again"
    );
    assert!(send(&relay, "x@dest.example").await.starts_with("250"));
    assert_eq!(primary.received().len(), 2, "the circuit closed");
    assert_eq!(fb.received().len(), 4);
}

#[tokio::test]
async fn without_a_fallback_failures_open_no_circuit() {
    let primary = Upstream::start(Script {
        greeting: Some("421 4.3.2 down".into()),
        ..auth_script()
    })
    .await;
    let relay = Relay::start(&format!(
        "[upstream]\ncircuit_failures = 1\n{}",
        project(primary.port(), "")
    ))
    .await;
    for _ in 0..3 {
        let reply = send(&relay, "x@dest.example").await;
        assert!(reply.starts_with("451"), "{reply}");
    }
    assert_eq!(primary.connections(), 3);
}

#[tokio::test]
async fn a_rate_limit_is_a_sliding_window_under_concurrent_clients() {
    let up = Upstream::start(auth_script()).await;
    let relay = Arc::new(Relay::start(&project(up.port(), "smtpRateLimit = \"6/s\"\n")).await);
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let relay = relay.clone();
            tokio::spawn(async move {
                let mut c = relay.client().await;
                c.cmd("EHLO client.test", 250).await;
                while started.elapsed() < Duration::from_secs(3) {
                    let reply = c.mail("app@app.example", &["x@dest.example"], MSG).await;
                    assert!(reply.starts_with("250"), "{reply}");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let mut at: Vec<Instant> = up.received().iter().map(|r| r.at).collect();
    at.sort();
    assert!(
        at.len() >= 18,
        "the limit still lets 6/s through: {}",
        at.len()
    );
    // Seen at the upstream, a message lags its admission by its connect and send time, so
    // the window is taken a little shorter than the limit's. A burst bucket (6 at once, then
    // one every 1/6 s) or a fixed window (up to 12 across its edge) puts 9 or more in it.
    for (i, first) in at.iter().enumerate() {
        let within = at[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) < Duration::from_millis(800))
            .count();
        assert!(
            within <= 6,
            "{within} messages within one second: {:?}",
            at.iter()
                .map(|t| t.duration_since(started).as_millis())
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn max_connections_is_never_passed_and_a_long_wait_is_451_4_4_5() {
    let up = Upstream::start(Script {
        delay_after_data: Some(Duration::from_millis(200)),
        ..auth_script()
    })
    .await;
    let relay = Arc::new(Relay::start(&project(up.port(), "smtpMaxConnections = 2\n")).await);
    let sends: Vec<_> = (0..6)
        .map(|_| {
            let relay = relay.clone();
            tokio::spawn(async move { send(&relay, "x@dest.example").await })
        })
        .collect();
    for s in sends {
        assert!(s.await.unwrap().starts_with("250"));
    }
    assert_eq!(up.received().len(), 6);
    assert_eq!(up.max_open(), 2);

    let up = Upstream::start(auth_script()).await;
    let relay = Relay::start(&format!(
        "[upstream]\nlimit_wait_secs = 1\n{}",
        project(up.port(), "smtpRateLimit = \"1/min\"\n")
    ))
    .await;
    assert!(send(&relay, "x@dest.example").await.starts_with("250"));
    let reply = send(&relay, "x@dest.example").await;
    assert!(
        reply.starts_with("451 4.4.5") && reply.contains("acme may send 1/min"),
        "{reply}"
    );
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_loses_its_place() {
    let up = Upstream::start(auth_script()).await;
    let relay = Relay::start(&project(up.port(), "smtpRateLimit = \"1/s\"\n")).await;
    assert!(send(&relay, "x@dest.example").await.starts_with("250"));
    let mut c = relay.client().await;
    c.cmd("EHLO client.test", 250).await;
    c.cmd("MAIL FROM:<app@app.example>", 250).await;
    c.cmd("RCPT TO:<x@dest.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send_raw(&common::stuff(MSG)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        up.received().len(),
        1,
        "nothing was sent for the client that left"
    );
}

#[tokio::test]
async fn failovers_limits_and_open_circuits_are_counted_and_the_server_provider_is_limited_too() {
    let fb = Upstream::start(auth_script()).await;
    let up = Upstream::start(Script::default()).await;
    let closed = closed_port().await;
    let relay = Relay::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nlimit_wait_secs = 1\ncircuit_failures = 1\n\
         [server]\nsupportEmail = \"noreply@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\nrate_limit = \"1/min\"\n\
         [projects.metered]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpSecure = false\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\n\
         smtpFromAddress = \"noreply@acme.example\"\n{}",
        up.port(),
        closed,
        fallback(fb.port())
    ))
    .await;
    let server_msg = b"Subject: s\r\n\r\nhi\r\n";
    let mut c = relay.client().await;
    c.cmd("EHLO client.test", 250).await;
    assert!(
        c.mail("a@app.example", &["x@dest.example"], server_msg)
            .await
            .starts_with("250")
    );
    let reply = c
        .mail("a@app.example", &["x@dest.example"], server_msg)
        .await;
    assert!(
        reply.starts_with("451 4.4.5") && reply.contains("server may send 1/min"),
        "{reply}"
    );
    let metered = b"X-Project-Id: metered\r\n\r\nhi\r\n";
    assert!(
        c.mail("a@app.example", &["x@dest.example"], metered)
            .await
            .starts_with("250")
    );
    assert_eq!(fb.received().len(), 1);
    let url = format!("http://{}/metrics", relay.admin.unwrap());
    let (status, text) = common::http("GET", url).await;
    assert_eq!(status, 200, "{text}");
    for line in [
        r#"relay_limit_total{sender="server",limit="rate",result="refused"} 1"#,
        r#"relay_failovers_total{sender="metered"} 1"#,
        &format!(r#"relay_circuit_open{{upstream="127.0.0.1:{closed}"}} 1"#),
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

#[tokio::test]
async fn a_client_that_half_closes_after_the_dot_still_has_its_message_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start(auth_script()).await;
    let relay = Relay::start(&project(up.port(), "")).await;
    let mut tcp = tokio::net::TcpStream::connect(relay.smtp).await.unwrap();
    // Pipelined: wait for the 354 before the message, as a client must.
    tcp.write_all(
        b"EHLO client.test\r\nMAIL FROM:<app@app.example>\r\nRCPT TO:<x@dest.example>\r\nDATA\r\n",
    )
    .await
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("354") {
        let n = tokio::time::timeout(common::STEP, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    tcp.write_all(&common::stuff(MSG)).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut rest = String::new();
    let _ = tokio::time::timeout(common::STEP, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
    .await;
    assert!(rest.contains("250 2.0.0"), "{rest}");
    assert_eq!(up.received().len(), 1);
}
