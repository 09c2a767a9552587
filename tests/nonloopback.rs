//! The upstream on another host (a network namespace the test makes), where the relay's
//! loopback exception does not apply: credentials go only over TLS the relay negotiated
//! itself, whether implicit or by STARTTLS, and `check --connect` says which; captured mail
//! on the admin listener is never served to a non-loopback client without the admin token.

mod common;

use common::netns::{HOST_ADDR, TestHost};
use common::{Relay, Upstream};

fn project(up: &Upstream, extra: &str) -> String {
    format!(
        "[upstream]\nca_file = \"certs/ca.crt\"\ntimeout_secs = 5\n\n{}",
        common::acme_project(&HOST_ADDR.to_string(), up.port(), extra)
    )
}

use common::acme_script as script;

const MSG: &[u8] = b"X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n";

async fn send(relay: &Relay) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", &["x@dest.example"], MSG)
        .await
}

fn tls() -> std::sync::Arc<rustls::ServerConfig> {
    common::tls_server("certs/localhost.crt", "certs/localhost.key")
}

#[tokio::test]
async fn non_loopback_upstreams() {
    // One test host at a time (its address is fixed), so the cases run in one test.
    let host = TestHost::create();

    // Implicit TLS (smtpSecure = true): delivered, authenticated, over TLS.
    let up = Upstream::start_on(host.listen(), script(|s| s.implicit_tls = Some(tls())));
    let relay = Relay::start(&project(&up, "smtpSecure = true")).await;
    let reply = send(&relay).await;
    assert!(reply.starts_with("250"), "implicit TLS: {reply}");
    let got = &up.received()[0];
    assert!(got.tls);
    assert_eq!(got.auth_user.as_deref(), Some("user-acme"));

    // STARTTLS: the same.
    let up = Upstream::start_on(host.listen(), script(|s| s.starttls = Some(tls())));
    let relay = Relay::start(&project(&up, "")).await;
    let reply = send(&relay).await;
    assert!(reply.starts_with("250"), "STARTTLS: {reply}");
    let got = &up.received()[0];
    assert!(got.tls);
    assert_eq!(got.auth_user.as_deref(), Some("user-acme"));

    // No STARTTLS offered: the password is never sent in clear, and the session ends with QUIT.
    let up = Upstream::start_on(host.listen(), script(|_| {}));
    let relay = Relay::start(&project(&up, "")).await;
    let reply = send(&relay).await;
    assert!(reply.starts_with("451 4.7.0"), "no STARTTLS: {reply}");
    assert!(reply.contains("not sent in clear"), "{reply}");
    let commands = up.commands();
    assert!(
        !commands.iter().any(|c| c.starts_with("AUTH")),
        "{commands:?}"
    );
    assert_eq!(
        commands.last().map(String::as_str),
        Some("QUIT"),
        "{commands:?}"
    );
    assert!(up.received().is_empty());

    // `check --connect` says what each connection really is.
    let implicit = Upstream::start_on(host.listen(), script(|s| s.implicit_tls = Some(tls())));
    let starttls = Upstream::start_on(host.listen(), script(|s| s.starttls = Some(tls())));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let text = format!(
        "{}\n[projects.beta]\nsmtpHost = \"{HOST_ADDR}\"\nsmtpPort = {}\nsmtpUsername = \"user-acme\"\nsmtpPassword = \"pw-acme\"\nsmtpFromAddress = \"noreply@beta.example\"\n",
        project(&implicit, "smtpSecure = true").replace(
            "certs/ca.crt",
            &common::repo().join("certs/ca.crt").display().to_string()
        ),
        starttls.port()
    );
    std::fs::write(&config, text).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        common::process::command()
            .args(["check", "--connect", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"))
            .to_owned()
    };
    let acme = line("acme");
    assert!(acme.contains(", TLS, authenticated"), "{acme}");
    assert!(!acme.contains("no TLS"), "{acme}");
    let beta = line("beta");
    assert!(beta.contains(", TLS (STARTTLS), authenticated"), "{beta}");
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_serves_mail_to_the_network_only_with_the_token() {
    let host = TestHost::create();
    let base_config = |admin: &str| {
        format!(
            "[listener]\nsmtp = \"127.0.0.1:0\"\nhostname = \"relay.test\"\n[admin]\nlisten = \"0.0.0.0:0\"\n{admin}\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"{{dir}}/outbox\"\n"
        )
    };
    let get = |path: &str, auth: &str| format!("GET {path} HTTP/1.1\r\n{auth}");

    // No token: mail content for loopback only; probes and metrics open to all.
    let relay = Relay::start(&base_config("")).await;
    let port = relay.admin.unwrap().port();
    let h = &host;
    let (status, body) = tokio::task::block_in_place(|| h.http(port, &get("/api/messages", "")));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback clients only"), "{body}");
    for open in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = tokio::task::block_in_place(|| h.http(port, &get(open, "")));
        assert_eq!(status, 200, "{open}");
    }
    let (status, _) =
        tokio::task::block_in_place(|| h.http(port, "DELETE /api/messages HTTP/1.1\r\n"));
    assert_eq!(status, 403, "nor may it delete them");
    for closed in [
        "/",
        "/app.js",
        "/api/activity",
        "/api/messages/x/attachments/0",
    ] {
        let (status, _) = tokio::task::block_in_place(|| h.http(port, &get(closed, "")));
        assert_eq!(status, 403, "{closed}");
    }

    // With a token: required from everyone, loopback included.
    let relay = Relay::start(&base_config("token = \"t0ken-for-tests\"")).await;
    let port = relay.admin.unwrap().port();
    let (status, _) = tokio::task::block_in_place(|| h.http(port, &get("/api/messages", "")));
    assert_eq!(status, 401);
    let (status, _) = tokio::task::block_in_place(|| h.http(port, &get("/api/activity", "")));
    assert_eq!(status, 401);
    // The page holds no mail: with a token set it loads anywhere, and asks for the token.
    let (status, _) = tokio::task::block_in_place(|| h.http(port, &get("/", "")));
    assert_eq!(status, 200);
    let (status, _) = tokio::task::block_in_place(|| {
        h.http(
            port,
            &get("/api/messages", "Authorization: Bearer wrong\r\n"),
        )
    });
    assert_eq!(status, 401);
    let (status, body) = tokio::task::block_in_place(|| {
        h.http(
            port,
            &get("/api/messages", "Authorization: Bearer t0ken-for-tests\r\n"),
        )
    });
    assert_eq!(status, 200, "{body}");
    let local = tokio::task::spawn_blocking(move || {
        ureq::get(format!("http://127.0.0.1:{port}/api/messages"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap()
            .status()
            .as_u16()
    })
    .await
    .unwrap();
    assert_eq!(local, 401, "loopback needs the token too once one is set");
    drop(host);
}
