//! Being a good SMTP client to a real MTA: the EHLO name, SIZE up front, clean session ends
//! with QUIT, an upstream 421 kept apart from the relay's own, the per-upstream connection
//! cap, and the per-session message limits of OpenSMTPD, Exim and hosted relays.

mod common;

use std::time::Duration;

use common::{Relay, Upstream};

fn project(up: &Upstream, extra: &str) -> String {
    common::acme_project("127.0.0.1", up.port(), extra)
}

use common::acme_script as script;

const MSG: &[u8] = b"X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n";

async fn send(relay: &Relay, msg: &[u8]) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", &["x@dest.example"], msg)
        .await
}

fn ehlo_names(up: &Upstream) -> Vec<String> {
    up.commands()
        .into_iter()
        .filter(|c| c.starts_with("EHLO "))
        .collect()
}

// ----- EHLO name -----

#[tokio::test]
async fn ehlo_uses_upstream_helo_name() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = Relay::start(&format!(
        "[upstream]\nhelo_name = \"mta.relay.example\"\n{}",
        project(&up, "")
    ))
    .await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(ehlo_names(&up), ["EHLO mta.relay.example"]);
}

#[tokio::test]
async fn ehlo_defaults_to_the_listener_hostname_then_the_machine_name() {
    let up = Upstream::start(script(|_| {})).await;
    // The harness sets `[listener] hostname = "relay.test"`.
    let relay = Relay::start(&project(&up, "")).await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(ehlo_names(&up), ["EHLO relay.test"]);

    let up = Upstream::start(script(|_| {})).await;
    let relay = Relay::start(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n\n{}",
        project(&up, "")
    ))
    .await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(ehlo_names(&up), [format!("EHLO {}", machine.trim())]);
}

// ----- SIZE -----

#[tokio::test]
async fn size_is_declared_with_mail_and_a_message_over_the_limit_is_never_sent() {
    let up = Upstream::start(script(|s| s.size = Some(1000))).await;
    let relay = Relay::start(&project(&up, "")).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = &up.received()[0];
    assert_eq!(got.mail_params, format!("SIZE={}", got.data.len()));

    let mut big = MSG.to_vec();
    big.extend(std::iter::repeat_n(b"0123456789abcdef\r\n".as_slice(), 100).flatten());
    let reply = send(&relay, &big).await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    assert!(reply.contains("at most 1000"), "names the limit: {reply}");
    assert_eq!(up.received().len(), 1);
    let mails = up
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 1, "nothing of the large message went upstream");
    // The connection was not spoiled by it.
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(up.connections(), 1);
}

// ----- QUIT -----

#[tokio::test]
async fn pooled_connections_are_ended_with_quit_at_shutdown() {
    let up = Upstream::start(script(|_| {})).await;
    let mut relay = Relay::start(&project(&up, "")).await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    relay.shutdown.cancel();
    let task = &mut relay.task;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("relay stops")
        .unwrap()
        .unwrap();
    assert_eq!(up.commands_of(1).last().map(String::as_str), Some("QUIT"));
    common::eventually(|| up.open() == 0).await;
}

#[tokio::test]
async fn a_connection_abandoned_after_a_refused_auth_is_ended_with_quit() {
    let up = Upstream::start(script(|s| {
        s.auth_reply = Some("535 5.7.8 Authentication credentials invalid".into())
    }))
    .await;
    let relay = Relay::start(&project(&up, "")).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("451 4.7.0"), "{reply}");
    let commands = up.commands_of(1);
    assert!(
        commands.iter().any(|c| c.starts_with("AUTH")),
        "{commands:?}"
    );
    assert_eq!(
        commands.last().map(String::as_str),
        Some("QUIT"),
        "{commands:?}"
    );
}

#[tokio::test]
async fn connections_beyond_pool_size_are_ended_with_quit_once_idle() {
    let up = Upstream::start(script(|s| {
        s.delay_after_data = Some(Duration::from_millis(300))
    }))
    .await;
    let relay = Relay::start(&format!("[upstream]\npool_size = 1\n{}", project(&up, ""))).await;
    let (a, b) = (spawn_send(relay.smtp), spawn_send(relay.smtp));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a.starts_with("250") && b.starts_with("250"), "{a} {b}");
    assert_eq!(up.connections(), 2);
    // One connection is beyond pool_size: closed once idle a few seconds, with QUIT, while
    // the other stays open.
    common::eventually(|| up.open() == 1).await;
    let quit = (1..=2)
        .filter(|id| up.commands_of(*id).last().map(String::as_str) == Some("QUIT"))
        .count();
    assert_eq!(quit, 1);
}

// ----- 421 -----

#[tokio::test]
async fn an_upstream_421_reaches_the_client_as_451_and_the_session_goes_on() {
    let up = Upstream::start(script(|s| {
        s.mail = Some("421 4.3.2 System not accepting network messages".into())
    }))
    .await;
    let relay = Relay::start(&project(&up, "")).await;
    let mut c = relay.client().await;
    let reply = c
        .send_mail("app@app.example", &["x@dest.example"], MSG)
        .await;
    assert!(
        reply.starts_with("451 4.3.2 Upstream refused: System not accepting"),
        "{reply}"
    );
    // The client's session is not closed: the relay did not close it.
    c.cmd("NOOP", 250).await;
    up.script(|s| s.mail = None);
    let reply = c.mail("app@app.example", &["x@dest.example"], MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    // A connection that said 421 is never used again.
    assert_eq!(up.connections(), 2);
    assert_eq!(up.received()[0].connection, 2);
}

// ----- connection cap -----

#[tokio::test]
async fn at_most_max_connections_per_upstream_are_open_at_once() {
    let up = Upstream::start(script(|s| {
        s.delay_after_data = Some(Duration::from_millis(200))
    }))
    .await;
    let relay = Relay::start(&format!(
        "[upstream]\nmax_connections_per_upstream = 2\n{}",
        project(&up, "")
    ))
    .await;
    let sends: Vec<_> = (0..6).map(|_| spawn_send(relay.smtp)).collect();
    for task in sends {
        let reply = task.await.unwrap();
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert_eq!(up.received().len(), 6);
    assert_eq!(
        up.max_open(),
        2,
        "never more than the cap, and the cap used"
    );
}

#[tokio::test]
async fn a_message_waiting_past_limit_wait_secs_is_deferred_with_451_4_4_5() {
    let up = Upstream::start(script(|s| {
        s.delay_after_data = Some(Duration::from_secs(3))
    }))
    .await;
    let relay = Relay::start(&format!(
        "[upstream]\nmax_connections_per_upstream = 1\nlimit_wait_secs = 1\n{}",
        project(&up, "")
    ))
    .await;
    let slow = send(&relay, MSG);
    let waiting = async {
        // Let the first message take the only connection.
        common::eventually(|| up.commands().iter().any(|c| c == "DATA")).await;
        send(&relay, MSG).await
    };
    let (first, second) = tokio::join!(slow, waiting);
    assert!(first.starts_with("250"), "{first}");
    assert!(second.starts_with("451 4.4.5"), "{second}");
    assert!(second.contains("all 1 connections"), "{second}");
    assert_eq!(up.received().len(), 1);
    assert_eq!(up.max_open(), 1);
}

// ----- per-session message limits -----

#[tokio::test]
async fn an_upstream_per_session_limit_does_not_stall_the_project() {
    let up = Upstream::start(script(|s| s.max_mails_per_session = Some(5))).await;
    // The default max_messages_per_connection (100) is above this upstream's cap.
    let relay = Relay::start(&project(&up, "")).await;
    for i in 0..12 {
        let reply = send(&relay, MSG).await;
        assert!(reply.starts_with("250"), "message {i}: {reply}");
    }
    assert_eq!(up.received().len(), 12);
    // Each full connection was retired with QUIT after its 452.
    for id in 1..=2 {
        let commands = up.commands_of(id);
        assert_eq!(
            commands.last().map(String::as_str),
            Some("QUIT"),
            "{commands:?}"
        );
    }
}

#[tokio::test]
async fn max_messages_per_connection_replaces_connections_before_the_upstream_cap() {
    let up = Upstream::start(script(|_| {})).await;
    let relay = Relay::start(&format!(
        "[upstream]\nmax_messages_per_connection = 3\n{}",
        project(&up, "")
    ))
    .await;
    for i in 0..7 {
        let reply = send(&relay, MSG).await;
        assert!(reply.starts_with("250"), "message {i}: {reply}");
    }
    let got = up.received();
    assert_eq!(got.len(), 7);
    for id in 1..=up.connections() {
        let carried = got.iter().filter(|r| r.connection == id).count();
        assert!(carried <= 3, "connection {id} carried {carried}");
    }
    assert_eq!(up.connections(), 3);
    // The two retired connections ended with QUIT (asynchronously, after their last reply).
    common::eventually(|| {
        (1..=2).all(|id| up.commands_of(id).last().map(String::as_str) == Some("QUIT"))
    })
    .await;
}

/// One message on its own session to `addr`, in a task of its own.
fn spawn_send(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut c = common::Client::connect(addr).await;
        c.expect(220).await;
        c.send_mail("app@app.example", &["x@dest.example"], MSG)
            .await
    })
}

#[tokio::test]
async fn an_auth_answered_with_250_is_accepted_as_postfix_smtp_sink_answers_it() {
    let up = common::Upstream::start(common::Script {
        auth: vec![("u".into(), "p".into())],
        auth_reply: Some("250 2.0.0 Ok".into()),
        ..common::Script::default()
    })
    .await;
    let relay = Relay::start(&project(&up, "")).await;
    let reply = send(&relay, MSG).await;
    // (The test upstream counts a scripted AUTH reply as no authentication, so MAIL then
    // gets 530: what matters is that the relay went on past AUTH.)
    assert!(
        up.commands().iter().any(|c| c.starts_with("MAIL")),
        "{reply}"
    );
}

#[tokio::test]
async fn smtp_auth_method_picks_the_mechanism() {
    for (method, expect) in [("login", "AUTH LOGIN"), ("plain", "AUTH PLAIN")] {
        let up = Upstream::start(script(|_| {})).await;
        let relay = Relay::start(&project(&up, &format!("smtpAuthMethod = \"{method}\""))).await;
        let reply = send(&relay, MSG).await;
        assert!(reply.starts_with("250"), "{method}: {reply}");
        assert!(
            up.commands().iter().any(|c| c.starts_with(expect)),
            "{method}: {:?}",
            up.commands()
        );
    }
}
