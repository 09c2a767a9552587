//! The binary: `check` output and exit codes, and `serve` announcing its listeners.

mod common;

use std::io::{BufRead, BufReader};

use common::process::{Process, command as bin};

fn write_config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = bin()
        .args(["check", "--config", "relay.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo: server transport"), "{stdout}");
    assert!(stdout.contains("server: capture to"), "{stdout}");
}

#[test]
fn check_warns_when_the_ehlo_name_is_not_fully_qualified() {
    let project = "[projects.acme]\nsmtpHost = \"smtp.acme.example\"\nsmtpPort = 587\nsmtpUsername = \"u\"\nsmtpPassword = \"p\"\nsmtpFromAddress = \"noreply@acme.example\"\n";
    let check = |upstream: &str| {
        let (_dir, path) = write_config(&format!("[upstream]\n{upstream}\n{project}"));
        let out = bin()
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "a warning, not an error");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stdout = check("helo_name = \"printer\"");
    assert!(
        stdout.contains(
            "upstream: warning: the EHLO name \"printer\" is not a fully qualified domain name"
        ),
        "{stdout}"
    );
    let stdout = check("helo_name = \"mta.example.com\"");
    assert!(!stdout.contains("warning"), "{stdout}");
    // A name that is not even a host name is a config error.
    let (_dir, path) = write_config("[upstream]\nhelo_name = \"not a name\"\n");
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.helo_name"));
}

const PROJECTS: &str = r#"
[server.capture]
dir = "outbox"
[projects.acme]
smtpHost = "smtp.acme.example"
smtpPort = 465
smtpUsername = "apikey"
smtpPassword = "hunter2-acme-password"
smtpFromAddress = "Acme <noreply@acme.example>"
[projects.beta]
smtpHost = "smtp.beta.example"
smtpPort = 587
smtpUsername = "u"
smtpPassword = "hunter2-beta-password"
smtpFromAddress = "noreply@beta.example"
[projects.plain]
appName = "Plain"
[projects.broken]
smtpHost = "smtp.broken.example"
smtpPort = "587"
smtpPassword = "hunter2-broken-password"
smtpFromAddress = "noreply@broken.example"
"#;

#[test]
fn check_reports_each_project_and_never_a_password() {
    let (_dir, path) = write_config(PROJECTS);
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "misconfigured project fails the check"
    );
    assert!(
        stdout.contains("acme: ok: smtp via smtp.acme.example:465 (tls)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("beta: ok: smtp via smtp.beta.example:587 (starttls)"),
        "{stdout}"
    );
    assert!(stdout.contains("plain: server transport"), "{stdout}");
    let broken = stdout.lines().find(|l| l.starts_with("broken:")).unwrap();
    assert!(broken.starts_with("broken: error:"), "{broken}");
    assert!(
        broken.contains("smtpPort") && broken.contains("smtpUsername"),
        "{broken}"
    );
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );

    let fixed = PROJECTS
        .replace(
            "[projects.broken]",
            "[projects.broken]\nsmtpUsername = \"u\"",
        )
        .replace("smtpPort = \"587\"", "smtpPort = 587");
    let (_dir, path) = write_config(&fixed);
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn check_names_an_unknown_key_and_its_line() {
    let (_dir, path) =
        write_config("[projects.acme]\nsmtpHots = \"x\"\nsmtpPassword = \"hunter2\"\n");
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("line 2") && stderr.contains("smtpHots"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"));
}

#[test]
fn config_path_may_come_from_the_environment() {
    let out = bin()
        .arg("check")
        .env("PROJECT_RELAY_CONFIG", "relay.toml")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn serve_logs_its_listeners_and_stops_on_sigterm() {
    let (_dir, path) = write_config(&format!(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n[server.capture]\ndir = \"{}\"\n{}",
        "outbox",
        PROJECTS.replace("[server.capture]\ndir = \"outbox\"", "")
    ));
    let mut cmd = bin();
    cmd.arg("--config").arg(&path);
    let mut relay = Process::start(cmd);
    let addr = relay.listening();
    assert_ne!(addr.port(), 0);
    assert!(greeting(addr).starts_with("220 "));
    let (status, log) = relay.stop();
    assert!(status.success(), "exit 0 on SIGTERM");
    assert!(log.contains("broken") && !log.contains("hunter2"), "{log}");
}

#[test]
fn serve_runs_on_the_worker_threads_it_is_given() {
    let (_dir, path) =
        write_config("[listener]\nsmtp = \"127.0.0.1:0\"\n[server.capture]\ndir = \"outbox\"\n");
    for (args, env, want) in [
        (&["--threads", "1"][..], None, "worker threads: 1"),
        (&[][..], Some("3"), "worker threads: 3"),
    ] {
        let mut cmd = bin();
        cmd.arg("--config").arg(&path).args(args);
        if let Some(n) = env {
            cmd.env("PROJECT_RELAY_THREADS", n);
        }
        let mut relay = Process::start(cmd);
        let addr = relay.listening();
        assert!(greeting(addr).starts_with("220 "));
        let (status, log) = relay.stop();
        assert!(status.success());
        assert!(log.contains(want), "{args:?} {env:?}: {log}");
    }
    // Zero threads is not a number of threads.
    let out = bin()
        .arg("--config")
        .arg(&path)
        .args(["--threads", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--threads"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn greeting(addr: std::net::SocketAddr) -> String {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let mut g = String::new();
    BufReader::new(&mut sock).read_line(&mut g).unwrap();
    g
}

#[test]
fn sighup_reloads_a_valid_file_and_keeps_the_old_one_when_invalid() {
    let (_dir, path) =
        write_config("[listener]\nsmtp = \"127.0.0.1:0\"\nhostname = \"first.test\"\n");
    let mut cmd = bin();
    cmd.arg("--config").arg(&path);
    let mut relay = Process::start(cmd);
    let addr = relay.listening();
    assert!(greeting(addr).starts_with("220 first.test"));

    std::fs::write(
        &path,
        "[listener]\nsmtp = \"127.0.0.1:0\"\nhostname = \"second.test\"\n",
    )
    .unwrap();
    relay.signal("HUP");
    relay.wait_for("reloaded");
    assert!(greeting(addr).starts_with("220 second.test"));

    std::fs::write(&path, "[listener]\nhostnme = \"typo.test\"\n").unwrap();
    relay.signal("HUP");
    let line = relay.wait_for("reload failed");
    assert!(line.contains("hostnme"), "{line}");
    assert!(greeting(addr).starts_with("220 second.test"));
    let (status, _) = relay.stop();
    assert!(status.success());
}

#[test]
fn the_message_log_line_names_the_client() {
    use std::io::{Read, Write};
    let (dir, path) = write_config(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"outbox\"\n",
    );
    let mut cmd = bin();
    cmd.arg("--config").arg(&path).current_dir(dir.path());
    let mut relay = Process::start(cmd);
    let addr = relay.listening();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let local = sock.local_addr().unwrap();
    sock.write_all(b"EHLO me\r\nMAIL FROM:<a@app.example>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("354") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    sock.write_all(b"Subject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        .unwrap();
    let _ = sock.read_to_end(&mut seen);
    let line = relay.wait_for(" message ");
    assert!(line.contains(&format!("client={local}")), "{line}");
    let (_, log) = relay.stop();
    assert!(
        !log.contains("session{"),
        "no per-session span at info: {log}"
    );
}
