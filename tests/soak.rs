//! Soak: many concurrent clients against an upstream that randomly defers, drops connections
//! and stalls. Afterwards every message a client saw acknowledged with 250 was received by
//! the upstream exactly once, and every other one got a 4xx/5xx the client saw.
//!
//! CI size: 200 clients, 20,000 messages in all. `SOAK_MESSAGES=200000` (and optionally
//! `SOAK_CLIENTS`) runs a larger one.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Client, Relay, Script, Upstream};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_no_acknowledged_message_is_lost_or_duplicated() {
    let clients = env("SOAK_CLIENTS", 200);
    let total = env("SOAK_MESSAGES", 20_000);
    let up = Upstream::start(Script {
        chaos_percent: 3,
        ..Script::default()
    })
    .await;
    let relay = Relay::start(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nmax_connections = 1000\n[upstream]\ntimeout_secs = 1\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n",
        up.port()
    ))
    .await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (acked, refused, next) = (acked.clone(), refused.clone(), next.clone());
        let addr = relay.smtp;
        tasks.push(tokio::spawn(async move {
            let mut session: Option<Client<tokio::net::TcpStream>> = None;
            loop {
                let seq = next.fetch_add(1, Ordering::SeqCst);
                if seq >= total {
                    return;
                }
                let c = match session.as_mut() {
                    Some(c) => c,
                    None => {
                        let mut c = Client::connect(addr).await;
                        c.expect(220).await;
                        c.cmd("EHLO soak", 250).await;
                        session.insert(c)
                    }
                };
                let msg = format!("Subject: soak {seq}\r\nX-Seq: {seq}\r\n\r\nmessage {seq}\r\n");
                let reply = c
                    .mail("app@app.example", &["x@dest.example"], msg.as_bytes())
                    .await;
                match reply.get(..1) {
                    Some("2") => acked.lock().unwrap().push(seq),
                    Some("4") | Some("5") => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => panic!("message {seq}: unexpected reply {reply:?}"),
                }
                // Now and then a new session, as real clients do.
                if seq % 50 == 0 {
                    c.cmd("QUIT", 221).await;
                    session = None;
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("soak client hung")
            .expect("soak client failed");
    }
    let acked = acked.lock().unwrap().clone();
    let refused = refused.load(Ordering::SeqCst);
    assert_eq!(acked.len() + refused, total, "every message got an answer");

    let mut seen: HashMap<usize, usize> = HashMap::new();
    for r in up.received() {
        let text = String::from_utf8_lossy(&r.data);
        let seq: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Seq: "))
            .expect("X-Seq header")
            .trim()
            .parse()
            .unwrap();
        *seen.entry(seq).or_default() += 1;
    }
    for seq in &acked {
        assert_eq!(
            seen.get(seq),
            Some(&1),
            "acknowledged message {seq} received {:?} times",
            seen.get(seq)
        );
    }
    assert_eq!(
        seen.len(),
        acked.len(),
        "the upstream received only acknowledged messages"
    );
    assert!(refused > 0, "the faults were exercised");
    eprintln!(
        "soak: {total} messages from {clients} clients in {:?}: {} acknowledged, {refused} refused, {} upstream connections",
        started.elapsed(),
        acked.len(),
        up.connections()
    );
}
