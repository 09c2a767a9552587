//! Project secrets read live from Medplum, end to end over real sockets: the relay, a Medplum
//! test server (tests/common/medplum.rs) and recording upstreams, all on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::medplum::{ClientApp, Fault, Medplum, smtp_secrets};
use common::{Relay, Script, Upstream};
use project_relay::{Config, Listeners, Server};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const PID: &str = "cabd683a-dc09-492f-a513-416c6f3c16bd";
const CLIENT: &str = "acme-client";
const CLIENT_SECRET: &str = "acme-client-secret-9f8e";
const MSG: &[u8] =
    b"X-Project-Id: cabd683a-dc09-492f-a513-416c6f3c16bd\r\nFrom: alice@acme.example\r\nSubject: s\r\n\r\nhi\r\n";

fn upstream_script() -> Script {
    Script {
        auth: vec![("u".into(), "pw-one".into()), ("u".into(), "pw-two".into())],
        ..Script::default()
    }
}

/// The relay's config: the server provider is `server`, `acme` is read from `medplum`.
const FLEET_SECRET: &str = "fleet-secret";

/// A super-admin client for the fleet credential; returns the `[medplum]` lines naming it.
fn fleet_client(medplum: &Medplum) -> &'static str {
    medplum.add_client(
        "fleet",
        ClientApp {
            secret: FLEET_SECRET.into(),
            project: "super-admin-project".into(),
            admin: true,
            super_admin: true,
        },
    );
    "client_id = \"fleet\"\nclient_secret = \"fleet-secret\""
}

fn toml(medplum: &Medplum, server: &Upstream, medplum_extra: &str, project: &str) -> String {
    format!(
        "[server]\nsupportEmail = \"Example <noreply@example.com>\"\n[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\n\
         [medplum]\nbase_url = \"{}\"\n{medplum_extra}\n{project}",
        server.port(),
        medplum.base_url(),
    )
}

fn acme_table() -> String {
    format!(
        "[projects.{PID}]\nmedplumClientId = \"{CLIENT}\"\nmedplumClientSecret = \"{CLIENT_SECRET}\"\n"
    )
}

struct World {
    medplum: Medplum,
    project: Upstream,
    server: Upstream,
}

async fn world() -> World {
    let medplum = Medplum::start().await;
    let project = Upstream::start(upstream_script()).await;
    let server = Upstream::start(Script::default()).await;
    medplum.add_project(
        PID,
        CLIENT,
        CLIENT_SECRET,
        smtp_secrets(project.port(), "pw-one", "alice@acme.example"),
    );
    World {
        medplum,
        project,
        server,
    }
}

impl World {
    async fn relay(&self, medplum_extra: &str) -> Relay {
        Relay::start(&toml(
            &self.medplum,
            &self.server,
            medplum_extra,
            &acme_table(),
        ))
        .await
    }
}

async fn send(relay: &Relay, msg: &[u8]) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", &["x@dest.example"], msg)
        .await
}

#[tokio::test]
async fn medplum_secrets_route_the_project_and_a_change_is_seen_within_refresh_secs() {
    let w = world().await;
    let relay = w.relay("refresh_secs = 1").await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = w.project.received();
    assert_eq!(got.len(), 1);
    // alice is approved in Medplum: her From is kept.
    assert_eq!(got[0].mail_from, "alice@acme.example");
    assert!(w.server.received().is_empty());

    // A Project Admin moves the project to another relay, with another password, and no
    // longer approves alice.
    let moved = Upstream::start(upstream_script()).await;
    w.medplum.set_secrets(
        PID,
        smtp_secrets(moved.port(), "pw-two", "bob@acme.example"),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(
        w.project.received().len(),
        1,
        "the old relay got nothing more"
    );
    let got = moved.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "noreply@acme.example");
    assert!(String::from_utf8_lossy(&got[0].data).starts_with("From: Acme <noreply@acme.example>"));

    // smtpHost removed: the server provider, with the server's default From.
    w.medplum.set_secrets(PID, vec![]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(w.server.received().len(), 1);
    assert_eq!(w.server.received()[0].mail_from, "noreply@example.com");
}

#[tokio::test]
async fn a_changed_password_never_reuses_a_connection_made_with_the_old_one() {
    let w = world().await;
    let relay = w.relay("refresh_secs = 1").await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(w.project.connections(), 1);
    w.medplum.set_secrets(
        PID,
        smtp_secrets(w.project.port(), "pw-two", "alice@acme.example"),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(
        w.project.connections(),
        2,
        "a new connection for the new password"
    );
    let second = w.project.commands_of(2).join("\n");
    assert!(second.contains("AUTH"), "{second}");
    // The pool of the old password is closed within seconds (QUIT).
    common::eventually(|| w.project.commands_of(1).iter().any(|c| c == "QUIT")).await;
    assert!(
        !w.project.commands_of(2).iter().any(|c| c == "QUIT"),
        "the new pool stays"
    );
}

#[tokio::test]
async fn a_hundred_messages_make_one_token_request_and_one_read() {
    let w = world().await;
    let relay = Arc::new(w.relay("refresh_secs = 60").await);
    // Ten sessions at once, ten messages each: the first messages race for the first read.
    let sessions: Vec<_> = (0..10)
        .map(|_| {
            let relay = relay.clone();
            tokio::spawn(async move {
                let mut c = relay.client().await;
                c.cmd("EHLO client.test", 250).await;
                for _ in 0..10 {
                    let reply = c.mail("app@app.example", &["x@dest.example"], MSG).await;
                    assert!(reply.starts_with("250"), "{reply}");
                }
            })
        })
        .collect();
    for s in sessions {
        s.await.unwrap();
    }
    assert_eq!(w.project.received().len(), 100);
    assert_eq!(w.medplum.token_requests(), 1);
    assert_eq!(w.medplum.reads(PID), 1);
}

#[tokio::test]
async fn medplum_down_keeps_the_last_good_secrets_for_max_stale_secs_then_451_4_4_3() {
    let w = world().await;
    let relay = w.relay("refresh_secs = 1\nmax_stale_secs = 3").await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    let read_at = tokio::time::Instant::now();
    w.medplum.fault(Fault::Status(500));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reads = w.medplum.reads(PID);
    let reply = send(&relay, MSG).await;
    assert!(
        reply.starts_with("250"),
        "stale secrets still serve: {reply}"
    );
    assert_eq!(w.project.received().len(), 2);
    assert!(w.medplum.reads(PID) > reads, "a re-read was tried");
    tokio::time::sleep_until(read_at + Duration::from_millis(3300)).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert_eq!(w.project.received().len(), 2);
    assert!(w.server.received().is_empty(), "never the server provider");
    // Medplum is back: mail flows again.
    w.medplum.fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test]
async fn a_project_never_read_while_medplum_is_silent_gets_451_4_4_3() {
    let w = world().await;
    w.medplum.fault(Fault::Silent);
    let relay = w.relay("timeout_secs = 1").await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert!(w.project.received().is_empty() && w.server.received().is_empty());
}

#[tokio::test]
async fn a_project_medplum_will_not_let_us_read_gets_451_4_3_5_never_the_server() {
    let w = world().await;
    // Another project's admin client, a member that is not admin, and a wrong secret.
    let other = "0f0f0f0f-0000-4000-8000-000000000001";
    w.medplum
        .add_project(other, "other-client", "other-secret", vec![]);
    w.medplum.add_client(
        "member-client",
        ClientApp {
            secret: "member-secret".into(),
            project: PID.into(),
            admin: false,
            super_admin: false,
        },
    );
    for (client, secret, why) in [
        (
            "other-client",
            "other-secret",
            "belongs to Project/0f0f0f0f",
        ),
        ("member-client", "member-secret", "(403)"),
        (CLIENT, "wrong-secret", "invalid_client"),
    ] {
        let table = format!(
            "[projects.{PID}]\nmedplumClientId = \"{client}\"\nmedplumClientSecret = \"{secret}\"\n"
        );
        let relay = Relay::start(&toml(&w.medplum, &w.server, "", &table)).await;
        let reply = send(&relay, MSG).await;
        assert!(reply.starts_with("451 4.3.5"), "{client}: {reply}");
        assert!(reply.contains(why), "{client}: {reply}");
        assert!(!reply.contains(secret), "{reply}");
    }
    assert!(w.server.received().is_empty(), "never the server provider");
    assert!(w.project.received().is_empty());
}

#[tokio::test]
async fn a_port_given_as_text_in_medplum_is_named_invalid() {
    let w = world().await;
    let mut secrets = smtp_secrets(w.project.port(), "pw-one", "");
    secrets[1] = json!({"name": "smtpPort", "valueString": w.project.port().to_string()});
    w.medplum.set_secrets(PID, secrets);
    let relay = w.relay("").await;
    let reply = send(&relay, MSG).await;
    assert!(
        reply
            .starts_with("451 4.3.5 Project SMTP configuration is incomplete or invalid: smtpPort"),
        "{reply}"
    );
    assert!(w.server.received().is_empty() && w.project.received().is_empty());
}

#[tokio::test]
async fn a_project_medplum_does_not_have_takes_the_server_provider() {
    let w = world().await;
    w.medplum.lock().projects.remove(PID);
    let relay = w.relay("").await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(w.server.received().len(), 1);
}

#[tokio::test]
async fn a_refused_token_is_renewed_once() {
    let w = world().await;
    let relay = w.relay("refresh_secs = 1").await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    w.medplum.expire_tokens();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(w.medplum.token_requests(), 2);
}

#[tokio::test]
async fn a_short_token_lifetime_is_trusted() {
    let w = world().await;
    w.medplum.lock().expires_in = 1;
    let relay = w.relay("refresh_secs = 1").await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    // Renewed ahead of expiry, not after a 401: no read was refused.
    assert_eq!(w.medplum.token_requests(), 2);
    assert_eq!(w.medplum.reads(PID), 2);
}

#[tokio::test]
async fn a_429_is_honoured_until_retry_after() {
    let w = world().await;
    let relay = w.relay("refresh_secs = 1").await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    w.medplum.fault(Fault::RateLimited(30));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, MSG).await.starts_with("250"), "stale secrets");
    let reads = w.medplum.reads(PID);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        assert!(send(&relay, MSG).await.starts_with("250"));
    }
    assert_eq!(w.medplum.reads(PID), reads, "no read before Retry-After");
}

#[tokio::test]
async fn the_fleet_credential_reads_any_project_named_in_the_header() {
    let w = world().await;
    let fleet = fleet_client(&w.medplum);
    let relay = Relay::start(&toml(&w.medplum, &w.server, fleet, "")).await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(w.project.received().len(), 1);
    // An id Medplum does not know, and a header that is no resource id: the server provider.
    let unknown = b"X-Project-Id: 11111111-2222-4333-8444-555555555555\r\n\r\nhi\r\n";
    assert!(send(&relay, unknown).await.starts_with("250"));
    assert!(
        send(&relay, b"X-Project-Id: ../admin\r\n\r\nhi\r\n")
            .await
            .starts_with("250")
    );
    assert_eq!(w.server.received().len(), 2);
    assert_eq!(w.medplum.reads("11111111-2222-4333-8444-555555555555"), 1);
    assert!(
        w.medplum
            .lock()
            .seen
            .iter()
            .all(|s| !s.contains("../admin"))
    );
}

/// A relay served with a reload handle, for the reload tests.
struct Served {
    addr: std::net::SocketAddr,
    reloader: project_relay::Reloader,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn listener_config(text: &str) -> Config {
    let text = format!("[listener]\nsmtp = \"127.0.0.1:0\"\n{text}");
    Config::from_toml_str(&text, &common::repo()).unwrap()
}

async fn serve(text: &str) -> Served {
    let config = listener_config(text);
    let listeners = Listeners::bind(&config).await.unwrap();
    let addr = listeners.smtp_addr().unwrap();
    let server = Server::new(Arc::new(config), listeners).unwrap();
    let reloader = server.reloader();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Served {
        addr,
        reloader,
        shutdown,
        task,
    }
}

impl Served {
    async fn send(&self) -> String {
        let mut c = common::Client::connect(self.addr).await;
        c.expect(220).await;
        c.send_mail("app@app.example", &["x@dest.example"], MSG)
            .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_reload_keeps_warm_connections_and_the_medplum_cache() {
    let w = world().await;
    let text = toml(&w.medplum, &w.server, "refresh_secs = 60", &acme_table());
    let relay = serve(&text).await;
    assert!(relay.send().await.starts_with("250"));
    relay.reloader.reload(listener_config(&text)).unwrap();
    // Let the pool retirer run at least once after the reload.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(relay.send().await.starts_with("250"));
    assert_eq!(w.project.received().len(), 2);
    assert_eq!(w.project.connections(), 1, "the warm connection was kept");
    assert_eq!(w.medplum.token_requests(), 1);
    assert_eq!(w.medplum.reads(PID), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_client_secret_fixed_by_a_reload_is_used_at_once() {
    let w = world().await;
    let wrong = format!(
        "[projects.{PID}]\nmedplumClientId = \"{CLIENT}\"\nmedplumClientSecret = \"wrong\"\n"
    );
    let relay = serve(&toml(&w.medplum, &w.server, "refresh_secs = 60", &wrong)).await;
    assert!(relay.send().await.starts_with("451 4.3.5"));
    let right = toml(&w.medplum, &w.server, "refresh_secs = 60", &acme_table());
    relay.reloader.reload(listener_config(&right)).unwrap();
    let reply = relay.send().await;
    assert!(reply.starts_with("250"), "{reply}");
    relay.stop().await;
}

/// The binary at trace level, its log written to a file (a pipe left unread would block it).
struct Binary {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(toml: &str, args: &[&str]) -> (Binary, std::net::SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, format!("[listener]\nsmtp = \"127.0.0.1:0\"\n{toml}")).unwrap();
        let log = dir.path().join("log");
        let mut cmd = common::process::command();
        cmd.args(args)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "trace")
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let binary = Binary {
            child,
            log,
            _dir: dir,
        };
        let mut addr = None;
        common::eventually(|| {
            let text = binary.log();
            addr = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .and_then(|a| a.split_whitespace().next()?.parse().ok());
            addr.is_some()
        })
        .await;
        (binary, addr.unwrap())
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
        self.log()
    }
}

#[tokio::test]
async fn a_trace_log_holds_no_secret_and_says_once_when_reads_fail_and_recover() {
    let w = world().await;
    let (relay, addr) = Binary::start(
        &toml(&w.medplum, &w.server, "refresh_secs = 1", &acme_table()),
        &[],
    )
    .await;
    let send = || async move {
        let mut c = common::Client::connect(addr).await;
        c.expect(220).await;
        c.send_mail("app@app.example", &["x@dest.example"], MSG)
            .await
    };
    assert!(send().await.starts_with("250"));
    w.medplum.fault(Fault::Status(500));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(send().await.starts_with("250"), "stale secrets");
    }
    w.medplum.fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send().await.starts_with("250"));
    let log = relay.stop();
    assert!(log.contains("TRACE"), "a trace-level log");
    for secret in [
        CLIENT_SECRET,
        "tok-acme-client",
        "pw-one",
        "bot-secret-value",
        "valueString",
    ] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    assert_eq!(
        log.matches("Medplum secrets cannot be read").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("Medplum secrets read again").count(), 1);
    assert_eq!(w.project.received().len(), 5);
}

#[tokio::test]
async fn check_and_send_test_read_medplum_projects_as_the_relay_does() {
    let w = world().await;
    let config = toml(&w.medplum, &w.server, "", &acme_table());
    let (ok, out) = common::process::run_once(config.clone(), &["check", "--connect"]).await;
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(PID))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(&format!(
            "ok: smtp via 127.0.0.1:{} (starttls)",
            w.project.port()
        )) && line.contains("(from Medplum)"),
        "{line}"
    );
    assert!(
        !out.contains(CLIENT_SECRET) && !out.contains("pw-one"),
        "{out}"
    );

    let (ok, out) = common::process::run_once(
        config,
        &["send-test", "--project", PID, "--to", "x@dest.example"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("reply:     250"), "{out}");
    assert_eq!(w.project.received().len(), 1);

    // With a fleet credential, check obtains its token and says so.
    let fleet = fleet_client(&w.medplum);
    let config = toml(&w.medplum, &w.server, fleet, &acme_table());
    let (ok, out) = common::process::run_once(config, &["check"]).await;
    assert!(
        ok && out.contains("medplum: fleet client: token ok"),
        "{out}"
    );
    assert!(!out.contains(FLEET_SECRET), "{out}");

    // A client Medplum refuses: check says why, as the relay's reply would, and fails.
    let table = format!(
        "[projects.{PID}]\nmedplumClientId = \"{CLIENT}\"\nmedplumClientSecret = \"wrong\"\n"
    );
    let (ok, out) =
        common::process::run_once(toml(&w.medplum, &w.server, "", &table), &["check"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{PID}: error: Project SMTP configuration cannot be read"
        )) && out.contains("invalid_client"),
        "{out}"
    );
}

#[tokio::test]
async fn medplum_reads_tokens_and_stale_mail_are_counted() {
    let w = world().await;
    let id = "feed0000-0000-4000-8000-00000000beef";
    w.medplum.add_project(
        id,
        "metrics-client",
        "metrics-secret",
        smtp_secrets(w.project.port(), "pw-one", ""),
    );
    let table = format!(
        "[projects.{id}]\nmedplumClientId = \"metrics-client\"\nmedplumClientSecret = \"metrics-secret\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    let relay = Relay::start(&toml(&w.medplum, &w.server, "refresh_secs = 1", &table)).await;
    let msg = format!("X-Project-Id: {id}\r\n\r\nhi\r\n");
    assert!(send(&relay, msg.as_bytes()).await.starts_with("250"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, msg.as_bytes()).await.starts_with("250"));
    w.medplum.fault(Fault::Status(503));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, msg.as_bytes()).await.starts_with("250"));
    let url = format!("http://{}/metrics", relay.admin.unwrap());
    let (status, text) = common::http("GET", url).await;
    assert_eq!(status, 200, "{text}");
    for line in [
        format!(r#"relay_medplum_reads_total{{project="{id}",result="ok"}} 1"#),
        format!(r#"relay_medplum_reads_total{{project="{id}",result="not_modified"}} 1"#),
        format!(r#"relay_medplum_reads_total{{project="{id}",result="error"}} 1"#),
        format!(r#"relay_medplum_stale_served_total{{project="{id}"}} 1"#),
        r#"relay_medplum_token_requests_total{result="ok"}"#.to_owned(),
    ] {
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
}

#[tokio::test]
async fn a_fallback_and_limits_written_in_medplum_hold_as_in_relay_toml() {
    let w = world().await;
    let fallback = Upstream::start(upstream_script()).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut secrets = smtp_secrets(closed_port, "pw-one", "");
    secrets.extend([
        json!({"name": "smtpFallbackHost", "valueString": "127.0.0.1"}),
        json!({"name": "smtpFallbackPort", "valueInteger": fallback.port()}),
        json!({"name": "smtpFallbackSecure", "valueBoolean": false}),
        json!({"name": "smtpFallbackUsername", "valueString": "u"}),
        json!({"name": "smtpFallbackPassword", "valueString": "pw-two"}),
        json!({"name": "smtpRateLimit", "valueString": "1/min"}),
        json!({"name": "smtpMaxConnections", "valueInteger": 1}),
    ]);
    w.medplum.set_secrets(PID, secrets);
    let relay = Relay::start(&format!(
        "[upstream]\nlimit_wait_secs = 1\n{}",
        toml(&w.medplum, &w.server, "", &acme_table())
    ))
    .await;
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(fallback.received().len(), 1, "the fallback took it");
    let reply = send(&relay, MSG).await;
    assert!(reply.starts_with("451 4.4.5"), "{reply}");
    assert_eq!(fallback.received().len(), 1);
}

#[tokio::test]
async fn a_401_again_after_a_fresh_token_is_451_4_3_5() {
    let w = world().await;
    w.medplum.fault(Fault::Status(401));
    let relay = w.relay("").await;
    let reply = send(&relay, MSG).await;
    assert!(
        reply.starts_with("451 4.3.5") && reply.contains("fresh token"),
        "{reply}"
    );
    assert_eq!(w.medplum.token_requests(), 2, "one fresh token, no more");
    assert!(w.server.received().is_empty(), "never the server provider");
}

#[tokio::test]
async fn a_404_is_remembered_for_refresh_secs_and_a_project_created_later_is_seen() {
    let w = world().await;
    let secrets = w.medplum.lock().projects.remove(PID).unwrap().secrets;
    let relay = w.relay("refresh_secs = 1").await;
    for _ in 0..3 {
        assert!(send(&relay, MSG).await.starts_with("250"));
    }
    assert_eq!(
        w.server.received().len(),
        3,
        "not in Medplum: the server provider"
    );
    assert_eq!(w.medplum.reads(PID), 1, "the 404 was remembered");
    w.medplum.lock().projects.insert(
        PID.into(),
        common::medplum::Project {
            version: 1,
            secrets,
            settings: Vec::new(),
        },
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(send(&relay, MSG).await.starts_with("250"));
    assert_eq!(
        w.project.received().len(),
        1,
        "created later, seen within refresh_secs"
    );
}
