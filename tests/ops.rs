//! Running it: the admin listener (metrics, health, the capture inbox API), per-project
//! capture, `send-test`, `check --connect`, secrets from the environment and files, JSON logs.

mod common;

use std::process::Command;

use common::{Relay, Script, Upstream, http};

use common::process::{Process, command as bin};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn with_admin(extra: &str) -> (Relay, String) {
    let relay = Relay::start(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nhostname = \"relay.test\"\ncertificate = \"certs/localhost.crt\"\nprivate_key = \"certs/localhost.key\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[server]\nsupportEmail = \"Example <noreply@example.com>\"\n[server.capture]\ndir = \"{{dir}}/outbox\"\n{extra}"
    ))
    .await;
    let base = format!("http://{}", relay.admin.expect("admin listener"));
    (relay, base)
}

#[tokio::test]
async fn health_and_metrics() {
    let up = Upstream::start(Script {
        auth: vec![("u".into(), "p".into())],
        ..Script::default()
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (relay, base) = with_admin(&format!(
        "[projects.metrics-a]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@a.example\"\n[projects.metrics-down]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {closed}\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@down.example\"\n[projects.metrics-b]\nappName = \"B\"\n[projects.metrics-broken]\nsmtpHost = \"x\"\n",
        up.port()
    ))
    .await;
    assert_eq!(
        http("GET", format!("{base}/healthz")).await,
        (200, "ok\n".into())
    );
    assert_eq!(http("GET", format!("{base}/readyz")).await.0, 200);
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    for (project, code) in [
        ("metrics-a", "250"),
        ("metrics-down", "451"),
        ("metrics-b", "250"),
        ("metrics-b", "250"),
        ("metrics-broken", "451"),
    ] {
        let msg = format!("X-Project-Id: {project}\r\nFrom: x@else.example\r\n\r\nhi\r\n");
        let reply = c
            .mail("a@app.example", &["x@dest.example"], msg.as_bytes())
            .await;
        assert!(reply.starts_with(code), "{project}: {reply}");
    }
    // A TLS session, and an upstream connection that stays pooled.
    let mut t = relay.client().await;
    t.cmd("EHLO me", 250).await;
    t.cmd("STARTTLS", 220).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::tls_client()
        .connect(name, t.stream.into_inner())
        .await
        .unwrap();
    let mut t = common::Client::new(tls);
    t.cmd("EHLO me", 250).await;
    let (status, text) = http("GET", format!("{base}/metrics")).await;
    let gauge = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    // This test's two sessions are open now (other tests in this process may add theirs).
    assert!(gauge("relay_sessions_active") >= 2.0);
    assert!(gauge("relay_tls_sessions_total{kind=\"starttls\"}") >= 1.0);
    assert!(gauge("relay_upstream_connections_open{upstream=\"127.0.0.1\"}") >= 1.0);
    assert_eq!(status, 200);
    for needle in [
        r#"relay_messages_total{project="metrics-b",outcome="delivered"} 2"#,
        r#"relay_messages_total{project="metrics-a",outcome="delivered"} 1"#,
        r#"relay_messages_total{project="metrics-down",outcome="deferred"} 1"#,
        r#"relay_messages_total{project="metrics-broken",outcome="refused-config"} 1"#,
        r#"relay_from_rewrites_total{project="metrics-b"} 2"#,
        r#"relay_upstream_send_seconds_bucket{upstream="127.0.0.1""#,
        "relay_sessions_active",
        r#"relay_bytes_relayed_total{project="metrics-b"}"#,
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[tokio::test]
async fn capture_inbox_api() {
    let (relay, base) =
        with_admin("[projects.inbox-a]\nappName = \"A\"\n[projects.inbox-b]\n").await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    let before = "2000-01-01T00:00:00Z";
    for (project, to) in [
        ("inbox-a", "one@dest.example"),
        ("inbox-b", "two@dest.example"),
        ("inbox-a", "three@dest.example"),
    ] {
        let msg = format!("X-Project-Id: {project}\r\nSubject: for {to}\r\n\r\nhello {to}\r\n");
        assert!(
            c.mail("a@app.example", &[to], msg.as_bytes())
                .await
                .starts_with("250")
        );
    }
    assert!(
        c.mail(
            "a@app.example",
            &["four@dest.example"],
            b"Subject: server\r\n\r\nhi\r\n"
        )
        .await
        .starts_with("250")
    );

    let (status, body) = http("GET", format!("{base}/api/messages")).await;
    assert_eq!(status, 200);
    let all = json(&body)["messages"].as_array().unwrap().clone();
    assert_eq!(all.len(), 4);
    let (_, body) = http("GET", format!("{base}/api/messages?project=inbox-a")).await;
    let a = json(&body)["messages"].as_array().unwrap().clone();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["recipients"][0], "one@dest.example");
    let (_, body) = http("GET", format!("{base}/api/messages?to=TWO@dest.example")).await;
    assert_eq!(json(&body)["messages"][0]["project"], "inbox-b");
    let (_, body) = http("GET", format!("{base}/api/messages?project=_server")).await;
    assert_eq!(
        json(&body)["messages"][0]["recipients"][0],
        "four@dest.example"
    );
    let (_, body) = http("GET", format!("{base}/api/messages?since={before}")).await;
    assert_eq!(json(&body)["messages"].as_array().unwrap().len(), 4);
    let (_, body) = http(
        "GET",
        format!("{base}/api/messages?since=2999-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(json(&body)["messages"].as_array().unwrap().len(), 0);
    assert_eq!(
        http("GET", format!("{base}/api/messages?since=soon"))
            .await
            .0,
        400
    );

    let id = a[1]["id"].as_str().unwrap().to_string();
    let (status, body) = http("GET", format!("{base}/api/messages/{id}")).await;
    assert_eq!(status, 200);
    let one = json(&body);
    assert_eq!(one["recipients"][0], "three@dest.example");
    // inbox-a has no project SMTP: the server's From rules (appName is for project SMTP).
    assert_eq!(one["resolved_from"], "Example <noreply@example.com>");
    let headers = one["headers"].as_array().unwrap();
    assert!(
        headers.contains(&serde_json::json!(["Subject", "for three@dest.example"])),
        "{headers:?}"
    );
    let (status, raw) = http("GET", format!("{base}/api/messages/{id}/raw")).await;
    assert_eq!(status, 200);
    assert_eq!(
        raw,
        "From: Example <noreply@example.com>\r\nSubject: for three@dest.example\r\n\r\nhello three@dest.example\r\n"
    );

    assert_eq!(
        http("GET", format!("{base}/api/messages/nope")).await.0,
        404
    );
    assert_eq!(
        http("GET", format!("{base}/api/messages/..%2F..%2Fetc%2Fpasswd"))
            .await
            .0,
        404
    );
    let (status, body) = http("DELETE", format!("{base}/api/messages")).await;
    assert_eq!((status, json(&body)["deleted"].as_u64()), (200, Some(4)));
    let (_, body) = http("GET", format!("{base}/api/messages")).await;
    assert_eq!(json(&body)["messages"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_project_can_be_captured_while_others_go_out() {
    let up = Upstream::start(Script {
        auth: vec![("u".into(), "p".into())],
        ..Script::default()
    })
    .await;
    let project = |name: &str, extra: &str| {
        format!(
            "[projects.{name}]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@{name}.example\"\n{extra}\n",
            up.port()
        )
    };
    let (relay, base) = with_admin(&format!(
        "{}{}",
        project("staging", "captureDir = \"{dir}/staging-outbox\""),
        project("live", "")
    ))
    .await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    let r = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"X-Project-Id: staging\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: captured as"), "{r}");
    let r = c
        .mail(
            "a@app.example",
            &["x@dest.example"],
            b"X-Project-Id: live\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(up.received().len(), 1);
    assert_eq!(up.received()[0].mail_from, "noreply@live.example");
    let (_, body) = http("GET", format!("{base}/api/messages?project=staging")).await;
    let m = &json(&body)["messages"][0];
    assert_eq!(m["mail_from"], "noreply@staging.example");
    assert!(
        m["transport"]
            .as_str()
            .unwrap()
            .contains("smtp://127.0.0.1:"),
        "{m}"
    );
    assert!(relay.dir().join("staging-outbox/staging").is_dir());
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `project-relay send-test` for `project`, with `--from` when given.
fn send_test(path: &std::path::Path, project: &str, from: Option<&str>) -> Command {
    let mut cmd = bin();
    cmd.args([
        "send-test",
        "--project",
        project,
        "--to",
        "someone@dest.example",
    ]);
    if let Some(from) = from {
        cmd.args(["--from", from]);
    }
    cmd.arg("--config").arg(path);
    cmd
}

async fn run(mut cmd: Command) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn send_test_uses_the_projects_transport_and_from_rules() {
    let up = Upstream::start(Script {
        auth: vec![("u".into(), "pw-S3cret".into())],
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!(
            "[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {port}\nsmtpUsername = \"u\"\nsmtpPassword = \"pw-S3cret\"\nsmtpFromAddress = \"Acme <noreply@acme.example>\"\nsmtpApprovedSenders = \"alice@acme.example\"\n[projects.broken]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {port}\n",
            port = up.port()
        ),
    );
    let (code, out) = run(send_test(&path, "acme", Some("alice@acme.example"))).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("transport: project smtp://127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains("from:      alice@acme.example (kept: approved sender)"),
        "{out}"
    );
    assert!(out.contains("reply:     250 2.0.0"), "{out}");
    assert!(out.contains("time:"), "{out}");
    assert!(!out.contains("pw-S3cret"));
    let got = up.received();
    assert_eq!(got[0].mail_from, "alice@acme.example");
    assert_eq!(got[0].rcpts, ["someone@dest.example"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.contains("Subject: project-relay test message for acme")
            && !text.contains("X-Project-Id"),
        "{text}"
    );

    // An approved sender keeps its address when appName becomes its display name: still
    // "kept", never "(default From)".
    let named_dir = tempfile::tempdir().unwrap();
    let named = write_config(
        named_dir.path(),
        &format!(
            "[projects.acme]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {port}\nsmtpUsername = \"u\"\nsmtpPassword = \"pw-S3cret\"\nsmtpFromAddress = \"Acme <noreply@acme.example>\"\nsmtpApprovedSenders = \"alice@acme.example\"\nappName = \"Acme Health\"\n",
            port = up.port()
        ),
    );
    let (code, out) = run(send_test(&named, "acme", Some("alice@acme.example"))).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("from:      Acme Health <alice@acme.example> (kept: approved sender)"),
        "{out}"
    );
    assert!(!out.contains("default From"), "{out}");

    // An unapproved --from gets the default, as real mail would.
    let (code, out) = run(send_test(&path, "acme", Some("mallory@acme.example"))).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("from:      Acme <noreply@acme.example> (default From)"),
        "{out}"
    );

    let (code, out) = run(send_test(&path, "broken", None)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("reply:     451 4.3.5 Project SMTP configuration is incomplete or invalid"),
        "{out}"
    );

    up.script(|s| s.data_end = Some("550 5.7.1 not today".into()));
    let (code, out) = run(send_test(&path, "acme", None)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("reply:     550 5.7.1 Upstream refused: not today"),
        "{out}"
    );
}

#[tokio::test]
async fn check_connect_probes_every_upstream() {
    let up = Upstream::start(Script {
        auth: vec![("u".into(), "right-pw".into())],
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let project = |name: &str, pw: &str| {
        format!(
            "[projects.{name}]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpUsername = \"u\"\nsmtpPassword = \"{pw}\"\nsmtpFromAddress = \"noreply@{name}.example\"\n",
            up.port()
        )
    };
    let server = format!(
        "[server.smtp]\nhost = \"127.0.0.1\"\nport = {}\nusername = \"u\"\npassword = \"right-pw\"\n",
        up.port()
    );
    let path = write_config(
        dir.path(),
        &format!(
            "{server}{}{}",
            project("good", "right-pw"),
            project("other", "right-pw")
        ),
    );
    let mut cmd = bin();
    cmd.args(["check", "--connect", "--config"]).arg(&path);
    let (code, out) = run(cmd).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("good: ok: smtp via 127.0.0.1:") && out.contains("connected"),
        "{out}"
    );
    assert!(out.contains("authenticated"), "{out}");
    assert!(out.contains("server: smtp via 127.0.0.1:"), "{out}");
    assert!(up.received().is_empty(), "no mail is sent");
    assert!(up.commands().iter().any(|c| c == "QUIT"));

    let path = write_config(
        dir.path(),
        &format!(
            "{}{}",
            project("good", "right-pw"),
            project("bad", "wrong-pw")
        ),
    );
    let mut cmd = bin();
    cmd.args(["check", "--connect", "--config"]).arg(&path);
    let (code, out) = run(cmd).await;
    assert_eq!(code, 1, "{out}");
    let bad = out.lines().find(|l| l.starts_with("bad:")).unwrap();
    assert!(bad.contains("error") && bad.contains("4.7.0"), "{bad}");
    assert!(
        !out.contains("wrong-pw") && !out.contains("right-pw"),
        "{out}"
    );
}

#[tokio::test]
async fn secrets_from_the_environment_and_from_files() {
    let up = Upstream::start(Script {
        auth: vec![("env-user".into(), "from-a-file".into())],
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("acme_smtp"), "from-a-file\n").unwrap();
    let path = write_config(
        dir.path(),
        &format!(
            "[projects.acme]\nsmtpHost = \"${{RELAY_TEST_HOST}}\"\nsmtpPort = {}\nsmtpUsername = \"${{RELAY_TEST_USER}}\"\nsmtpPasswordFile = \"acme_smtp\"\nsmtpFromAddress = \"noreply@acme.example\"\n",
            up.port()
        ),
    );
    let mut cmd = send_test(&path, "acme", None);
    cmd.env("RELAY_TEST_HOST", "127.0.0.1")
        .env("RELAY_TEST_USER", "env-user");
    let (code, out) = run(cmd).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(up.received()[0].auth_user.as_deref(), Some("env-user"));

    // A missing variable is a config error naming it.
    let mut cmd = bin();
    cmd.args(["check", "--config"]).arg(&path);
    cmd.env("RELAY_TEST_HOST", "127.0.0.1")
        .env_remove("RELAY_TEST_USER");
    let (code, out) = run(cmd).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("projects.acme.smtpUsername: environment variable RELAY_TEST_USER is not set"),
        "{out}"
    );
}

/// The relay binary on `toml` with JSON logs, once it listens; with its "listening on" line.
fn with_json_logs(toml: &str) -> (tempfile::TempDir, Process, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), toml);
    let mut cmd = bin();
    cmd.args(["--log-format", "json", "--config"]).arg(&path);
    let mut relay = Process::start(cmd);
    let line = relay.wait_for("listening on ");
    (dir, relay, line)
}

#[tokio::test]
async fn json_logs_one_event_per_message() {
    let (_dir, mut relay, line) = with_json_logs(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"outbox\"\n[projects.acme]\n",
    );
    assert!(
        json(&line)["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("listening on ")
    );
    let addr = relay.listening_in(&line);
    let mut c = common::Client::connect(addr).await;
    c.expect(220).await;
    assert!(
        c.send_mail(
            "a@app.example",
            &["x@dest.example", "y@dest.example"],
            b"X-Project-Id: acme\r\n\r\nhi\r\n"
        )
        .await
        .starts_with("250")
    );
    let event = json(&relay.wait_for("\"message\":\"message\""));
    let f = &event["fields"];
    assert_eq!(f["project"], "acme");
    assert_eq!(f["transport"], "capture");
    assert_eq!(f["mail_from"], "noreply@example.com");
    assert_eq!(f["recipients"], 2);
    assert_eq!(f["code"], 250);
    assert_eq!(f["from_rewritten"], true);
    assert!(f["size"].as_u64().unwrap() > 0 && f["ms"].is_u64());
    let (status, _) = relay.stop();
    assert!(status.success());
}

/// Behind a load balancer the abnormal end of a session names the client its PROXY header
/// named, beside the balancer's own address.
#[tokio::test]
async fn a_session_that_ends_abnormally_is_logged_with_its_proxied_client() {
    let (_dir, mut relay, line) = with_json_logs(
        "[listener]\nsmtp = \"127.0.0.1:0\"\nproxy_protocol = true\nallow = [\"203.0.113.0/24\"]\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"outbox\"\n",
    );
    let addr = relay.listening_in(&line);
    let mut c = common::Client::connect(addr).await;
    c.send("PROXY TCP4 203.0.113.7 127.0.0.1 40000 25").await;
    c.expect(220).await;
    // Reset while the relay waits for a command: an i/o error, not a clean close.
    let tcp = c.stream.into_inner();
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    let event = json(&relay.wait_for("connection ended"));
    let f = &event["fields"];
    assert_eq!(f["client"], "203.0.113.7:40000", "{event}");
    assert!(
        f["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{event}"
    );
    let (status, _) = relay.stop();
    assert!(status.success());
}

#[tokio::test]
async fn since_with_any_bytes_is_a_400_never_a_panic() {
    let (_relay, base) = with_admin("").await;
    // Percent-encoded so the bytes reach the handler as they are: multi-byte UTF-8 at the
    // positions the parser slices at, an overlong value, garbage.
    for since in [
        "2026-11-2%E2%82%ACT23%3A18%3A58Z",
        "%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9",
        "123456789%C3%A9",
        &"9".repeat(10_000),
        "%FF%FE",
        "%00",
    ] {
        let (status, body) = http("GET", format!("{base}/api/messages?since={since}")).await;
        assert_eq!(status, 400, "{since}: {body}");
        assert!(json(&body)["error"].as_str().unwrap().starts_with("since:"));
    }
    // The listener is still serving.
    assert_eq!(http("GET", format!("{base}/healthz")).await.0, 200);
}

#[tokio::test]
async fn a_capture_folder_that_does_not_exist_yet_hides_no_message() {
    // `{dir}/a-empty` sorts before `{dir}/outbox` and has received no mail.
    let (relay, base) = with_admin("[projects.quiet]\ncaptureDir = \"{dir}/a-empty\"\n").await;
    let mut c = relay.client().await;
    let reply = c
        .send_mail(
            "a@app.example",
            &["one@dest.example"],
            b"Subject: s\r\n\r\nhi\r\n",
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let (_, body) = http("GET", format!("{base}/api/messages")).await;
    let id = json(&body)["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = http("GET", format!("{base}/api/messages/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["recipients"][0], "one@dest.example");
    let (status, body) = http("GET", format!("{base}/api/messages/{id}/raw")).await;
    assert_eq!(status, 200);
    assert!(body.contains("Subject: s"), "{body}");
}

#[tokio::test]
async fn inbox_page_api_attachments_delete_one_and_activity() {
    let (relay, base) = with_admin("[projects.page-a]\nappName = \"A\"\n").await;
    let mut c = relay.client().await;
    c.cmd("EHLO me", 250).await;
    let msg = "X-Project-Id: page-a\r\nFrom: someone@elsewhere.example\r\nSubject: =?UTF-8?Q?Rechnung_M=C3=A4rz?=\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n\
        --b\r\nContent-Type: application/pdf; name=\"invoice.pdf\"\r\nContent-Disposition: attachment; filename=\"invoice.pdf\"\r\n\
        Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n";
    assert!(
        c.mail("a@app.example", &["bob@dest.example"], msg.as_bytes())
            .await
            .starts_with("250")
    );
    assert!(
        c.mail(
            "a@app.example",
            &["carol@dest.example"],
            b"X-Project-Id: page-a\r\nSubject: second\r\n\r\nhi\r\n"
        )
        .await
        .starts_with("250")
    );
    let two = "X-Project-Id: page-a\r\nX-Project-Id: page-b\r\n\r\nhi\r\n";
    assert!(
        c.mail("a@app.example", &["x@dest.example"], two.as_bytes())
            .await
            .starts_with("550")
    );

    // The page itself: served with a policy that allows nothing from elsewhere.
    let page = tokio::task::spawn_blocking({
        let url = format!("{base}/");
        move || ureq::get(&url).call().unwrap()
    })
    .await
    .unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );

    // Newest first, with a total, searchable by Subject (decoded) and recipient.
    let (_, body) = http("GET", format!("{base}/api/messages?newest=1")).await;
    let page1 = json(&body);
    assert_eq!(page1["total"], 2);
    assert_eq!(page1["messages"][0]["subject"], "second");
    let (_, body) = http("GET", format!("{base}/api/messages?newest=10&q=m%C3%A4rz")).await;
    let found = json(&body)["messages"].as_array().unwrap().clone();
    assert_eq!(found.len(), 1);
    let id = found[0]["id"].as_str().unwrap().to_owned();
    let (_, body) = http("GET", format!("{base}/api/messages?newest=10&q=CAROL")).await;
    assert_eq!(json(&body)["messages"][0]["subject"], "second");

    let (_, body) = http("GET", format!("{base}/api/messages/{id}")).await;
    let one = json(&body);
    assert_eq!(one["subject"], "Rechnung März");
    assert_eq!(one["text"], "See attached.");
    assert!(one["html"].is_null(), "no HTML is made up from the text");
    assert_eq!(one["project_header"], "X-Project-Id: page-a");
    assert_eq!(
        one["from_decision"],
        "someone@elsewhere.example is not in the server's approvedSenderEmails: replaced by supportEmail"
    );
    assert_eq!(
        one["attachments"],
        serde_json::json!([{"index": 0, "name": "invoice.pdf", "type": "application/pdf", "size": 9}])
    );
    let download = tokio::task::spawn_blocking({
        let url = format!("{base}/api/messages/{id}/attachments/0");
        move || {
            let mut r = ureq::get(&url).call().unwrap();
            let disposition = r.headers()["content-disposition"]
                .to_str()
                .unwrap()
                .to_owned();
            (disposition, r.body_mut().read_to_vec().unwrap())
        }
    })
    .await
    .unwrap();
    assert_eq!(download.0, "attachment; filename=\"invoice.pdf\"");
    assert_eq!(download.1, b"%PDF-1.4\n");
    assert_eq!(
        http("GET", format!("{base}/api/messages/{id}/attachments/1"))
            .await
            .0,
        404
    );

    assert_eq!(
        http("DELETE", format!("{base}/api/messages/{id}")).await.0,
        200
    );
    assert_eq!(
        http("GET", format!("{base}/api/messages/{id}")).await.0,
        404
    );
    assert_eq!(
        http("DELETE", format!("{base}/api/messages/{id}")).await.0,
        404
    );
    let (_, body) = http("GET", format!("{base}/api/messages?newest=10")).await;
    assert_eq!(json(&body)["total"], 1);

    // Every outcome, newest first: the refusal too, with its code.
    // (The refusal came before any project was known: it is the server's.)
    let (_, body) = http("GET", format!("{base}/api/activity")).await;
    let entries = json(&body)["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0]["code"], 550);
    assert!(
        entries[0]["reply"]
            .as_str()
            .unwrap()
            .starts_with("550 5.7.1")
    );
    assert_eq!(entries[0]["outcome"], "refused");
    assert_eq!(entries[1]["outcome"], "delivered");
    let newest = entries[0]["seq"].as_u64().unwrap();
    let (_, body) = http("GET", format!("{base}/api/activity?after={}", newest - 1)).await;
    assert_eq!(json(&body)["entries"].as_array().unwrap().len(), 1);
    let (_, body) = http(
        "GET",
        format!("{base}/api/activity?project=page-a&outcome=delivered"),
    )
    .await;
    assert_eq!(json(&body)["entries"].as_array().unwrap().len(), 2);
    assert_eq!(
        http("GET", format!("{base}/api/activity?after=x")).await.0,
        400
    );
}
