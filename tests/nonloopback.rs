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

/// An HTTPS server on the test host that answers each request with the body of the first
/// route whose path prefix matches (200, JSON), and counts the requests it served.
fn https_json(
    host: &TestHost,
    routes: Vec<(&'static str, String)>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = host.listen();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, routes, count) = (acceptor.clone(), routes.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let path = text
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let body = routes
                    .iter()
                    .find(|(prefix, _)| path.starts_with(prefix))
                    .map(|(_, b)| b.clone());
                let reply = match body {
                    Some(b) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                            b.len()
                        )
                    }
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into()
                    }
                };
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, served)
}

#[tokio::test]
async fn oauth2_and_medplum_over_https_to_another_host() {
    let host = TestHost::create();
    let h = HOST_ADDR;

    // XOAUTH2: the token from an HTTPS endpoint on the other host (its certificate checked
    // against ca_file), then AUTH XOAUTH2 over implicit TLS to an upstream there.
    let issued = common::oauth::Issued::default();
    issued.issue("tok-remote-1", std::time::Duration::from_secs(3600));
    let (token_port, token_requests) = https_json(
        &host,
        vec![(
            "/token",
            r#"{"access_token":"tok-remote-1","token_type":"Bearer","expires_in":3600}"#.into(),
        )],
    );
    let oauth = |up: &Upstream, secure: bool| {
        format!(
            "[upstream]\nca_file = \"certs/ca.crt\"\ntimeout_secs = 5\n[projects.acme]\nsmtpHost = \"{h}\"\nsmtpPort = {}\nsmtpSecure = {secure}\n\
             smtpUsername = \"printer@contoso.example\"\nsmtpAuthMethod = \"xoauth2\"\nsmtpOAuthTokenUrl = \"https://{h}:{token_port}/token\"\n\
             smtpOAuthClientId = \"app\"\nsmtpOAuthClientSecret = \"s3cret\"\nsmtpFromAddress = \"printer@contoso.example\"\n",
            up.port()
        )
    };
    let xoauth2 = common::upstream::XOAuth2 {
        tokens: issued.clone(),
        google: false,
    };
    let up = Upstream::start_on(
        host.listen(),
        script(|s| {
            s.implicit_tls = Some(tls());
            s.xoauth2 = Some(xoauth2.clone());
        }),
    );
    let relay = Relay::start(&oauth(&up, true)).await;
    let reply = send(&relay).await;
    assert!(reply.starts_with("250"), "XOAUTH2 over TLS: {reply}");
    let got = &up.received()[0];
    assert!(got.tls);
    assert_eq!(got.auth_user.as_deref(), Some("printer@contoso.example"));
    assert_eq!(token_requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The same upstream without TLS: no bearer token is sent in clear (nor fetched for it).
    let up = Upstream::start_on(host.listen(), script(|s| s.xoauth2 = Some(xoauth2.clone())));
    let relay = Relay::start(&oauth(&up, false)).await;
    let reply = send(&relay).await;
    assert!(
        reply.starts_with("451 4.7.0") && reply.contains("not sent in clear"),
        "{reply}"
    );
    assert!(!up.commands().iter().any(|c| c.starts_with("AUTH")));
    assert_eq!(token_requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Medplum over HTTPS on the other host: its secrets route the project to an upstream
    // there, over STARTTLS.
    let up = Upstream::start_on(host.listen(), script(|s| s.starttls = Some(tls())));
    let pid = "cabd683a-dc09-492f-a513-416c6f3c16bd";
    let project = format!(
        r#"{{"resourceType":"Project","id":"{pid}","meta":{{"versionId":"1"}},"secret":[
            {{"name":"smtpHost","valueString":"{h}"}},{{"name":"smtpPort","valueInteger":{}}},
            {{"name":"smtpUsername","valueString":"user-acme"}},{{"name":"smtpPassword","valueString":"pw-acme"}},
            {{"name":"smtpFromAddress","valueString":"noreply@acme.example"}}]}}"#,
        up.port()
    );
    let (medplum_port, medplum_requests) = https_json(
        &host,
        vec![
            (
                "/oauth2/token",
                format!(
                    r#"{{"access_token":"mp-token","token_type":"Bearer","expires_in":3600,"project":{{"reference":"Project/{pid}"}}}}"#
                ),
            ),
            ("/fhir/R4/Project/", project),
        ],
    );
    let relay = Relay::start(&format!(
        "[upstream]\nca_file = \"certs/ca.crt\"\ntimeout_secs = 5\n[medplum]\nbase_url = \"https://{h}:{medplum_port}/\"\nca_file = \"certs/ca.crt\"\n\
         [projects.{pid}]\nmedplumClientId = \"acme-client\"\nmedplumClientSecret = \"acme-secret\"\n"
    ))
    .await;
    let msg = format!("X-Project-Id: {pid}\r\nSubject: s\r\n\r\nhi\r\n");
    let mut c = relay.client().await;
    let reply = c
        .send_mail("app@app.example", &["x@dest.example"], msg.as_bytes())
        .await;
    assert!(reply.starts_with("250"), "Medplum over HTTPS: {reply}");
    assert!(up.received()[0].tls);
    assert_eq!(
        medplum_requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    drop(host);
}
