//! Test harness: the relay started in-process on port 0, an upstream SMTP server that records
//! what it receives, and a raw dialogue client. The upstream server is written apart from
//! `src/smtp` on purpose, so one parser bug cannot hide on both sides.

#![allow(dead_code)]

pub mod medplum;
pub mod netns;
pub mod oauth;
pub mod process;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use project_relay::{Config, Listeners};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
pub use upstream::{Script, Upstream};

/// How long a test waits for any one reply before failing instead of hanging.
pub const STEP: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Relay {
    pub smtp: SocketAddr,
    pub smtps: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl Relay {
    /// Starts a relay from inline TOML. The listener keys are filled in for port 0 unless
    /// the TOML has its own `[listener]`. `{dir}` in the TOML is a fresh temporary folder.
    pub async fn start(toml: &str) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let toml = toml.replace("{dir}", dir.path().to_str().unwrap());
        let toml = if toml.contains("[listener]") {
            toml
        } else {
            format!("[listener]\nsmtp = \"127.0.0.1:0\"\nhostname = \"relay.test\"\n\n{toml}")
        };
        let config = Config::from_toml_str(&toml, &repo()).expect("test config is valid");
        Relay::start_config(config, dir).await
    }

    pub async fn start_config(config: Config, dir: tempfile::TempDir) -> Relay {
        let listeners = Listeners::bind(&config).await.unwrap();
        let smtp = listeners.smtp_addr().expect("smtp listener");
        let smtps = listeners.smtps_addr();
        let admin = listeners.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(project_relay::run(
            Arc::new(config),
            listeners,
            shutdown.clone(),
        ));
        Relay {
            smtp,
            smtps,
            admin,
            shutdown,
            task,
            dir,
        }
    }

    pub async fn client(&self) -> Client<TcpStream> {
        let mut c = Client::connect(self.smtp).await;
        c.expect(220).await;
        c
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A raw SMTP client: send lines or bytes, read whole (multi-line) replies.
pub struct Client<S> {
    pub stream: BufReader<S>,
}

impl Client<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client {
            stream: BufReader::new(tcp),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream: BufReader::new(stream),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    /// Reads one whole reply; returns it as text with CRLFs, or "" at EOF.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(STEP, self.stream.read_line(&mut line))
                .await
                .expect("reply timed out")
                .expect("read reply");
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Reads a reply and checks its code; returns its text.
    pub async fn expect(&mut self, code: u16) -> String {
        let r = self.reply().await;
        assert!(
            r.starts_with(&code.to_string()),
            "expected {code}, got {r:?}"
        );
        r
    }

    /// Sends a line and checks the reply's code.
    pub async fn cmd(&mut self, line: &str, code: u16) -> String {
        self.send(line).await;
        self.expect(code).await
    }

    /// True once the server has closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(STEP, self.stream.read_line(&mut line)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// EHLO, MAIL, RCPT..., DATA, the message (dot-stuffed here), returns the final reply.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], message: &[u8]) -> String {
        self.cmd("EHLO client.test", 250).await;
        self.mail(from, to, message).await
    }

    /// MAIL, RCPT..., DATA and the message on an already greeted session.
    pub async fn mail(&mut self, from: &str, to: &[&str], message: &[u8]) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), 250).await;
        }
        self.cmd("DATA", 354).await;
        self.send_raw(&stuff(message)).await;
        self.reply().await
    }
}

/// Dot-stuffs a message whose lines end in CRLF and appends the end marker.
pub fn stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Project `acme`'s table with its own relay at `host:port` (credentials `user-acme` /
/// `pw-acme`), plus `extra` keys.
pub fn acme_project(host: &str, port: u16, extra: &str) -> String {
    format!(
        "[projects.acme]\nsmtpHost = \"{host}\"\nsmtpPort = {port}\nsmtpUsername = \"user-acme\"\nsmtpPassword = \"pw-acme\"\nsmtpFromAddress = \"noreply@acme.example\"\n{extra}\n"
    )
}

/// An upstream script that takes acme's credentials, edited by `f`.
pub fn acme_script(f: impl FnOnce(&mut Script)) -> Script {
    let mut s = Script {
        auth: vec![("user-acme".into(), "pw-acme".into())],
        ..Script::default()
    };
    f(&mut s);
    s
}

/// A rustls client config trusting the shipped test CA.
pub fn tls_client() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(repo().join("certs/ca.crt")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Server-side TLS for the upstream test server, from a cert and key in the repo.
pub fn tls_server(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(repo().join(cert))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(repo().join(key)).unwrap();
    Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// Waits until `f` is true, polling; fails the test after `STEP`.
pub async fn eventually(mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A blocking HTTP GET/DELETE with a real client, off the async runtime.
pub async fn http(method: &'static str, url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = match method {
            "DELETE" => agent.delete(&url).call(),
            _ => agent.get(&url).call(),
        }
        .expect("HTTP request");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    })
    .await
    .unwrap()
}
