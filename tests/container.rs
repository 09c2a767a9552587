//! The container and sidecar files: the configs they ship load, the Dockerfile builds and
//! copies the same release binary, and `healthcheck` (the image's HEALTHCHECK) works.

mod common;

use std::process::Command;

use project_relay::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(common::repo().join(path)).unwrap()
}

#[test]
fn dockerfile_builds_and_copies_the_release_binary() {
    let docker = read("Dockerfile");
    let cargo = read("Cargo.toml");
    assert!(cargo.contains("name = \"project-relay\""));
    assert!(
        docker.contains("RUN cargo build --release --locked"),
        "same build as CI and bench"
    );
    assert!(docker.contains(
        "COPY --from=build /src/target/release/project-relay /usr/local/bin/project-relay"
    ));
    assert!(docker.contains("USER nonroot"));
    assert!(docker.contains("HEALTHCHECK") && docker.contains("\"healthcheck\""));
    assert!(docker.contains("COPY deploy/relay.toml /etc/project-relay/relay.toml"));
    // The ports it exposes are the ones its config listens on.
    let config = Config::from_toml_str(&read("deploy/relay.toml"), &common::repo()).unwrap();
    let expose: Vec<&str> = docker
        .lines()
        .find(|l| l.starts_with("EXPOSE"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .collect();
    for addr in [
        config.listener.smtp.clone().unwrap(),
        config.admin_listen.clone().unwrap(),
    ] {
        let port = addr.rsplit(':').next().unwrap();
        assert!(expose.contains(&port), "{port} not exposed: {expose:?}");
    }
}

/// The deploy configs use only real keys; the only problems are the secret files that exist
/// in a running pod and not here.
#[test]
fn deploy_configs_are_valid() {
    let k8s = read("deploy/kubernetes.yaml");
    let start = k8s.find("relay.toml: |").unwrap();
    let embedded: String = k8s[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    for (name, text) in [
        ("kubernetes", embedded),
        ("compose", read("deploy/relay.compose.toml")),
    ] {
        // SAFETY of the environment: the variable is this test's own.
        unsafe { std::env::set_var("RELAY_SUPPORT_EMAIL", "Example <noreply@example.com>") };
        let err = Config::from_toml_str(&text, &common::repo())
            .expect_err("secrets are not here")
            .to_string();
        for line in err.lines() {
            assert!(line.contains("cannot read /run/secrets/"), "{name}: {line}");
        }
    }
}

#[tokio::test]
async fn healthcheck_asks_the_running_relay() {
    let bin = env!("CARGO_BIN_EXE_project-relay");
    let relay = common::Relay::start(
        "[listener]\nsmtp = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let write = |text: String| {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |path: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(bin)
                .arg("healthcheck")
                .arg("--config")
                .arg(path)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let out = run(write(format!(
        "[listener]\nsmtp = \"127.0.0.1:1\"\n[admin]\nlisten = \"{}\"\n",
        relay.admin.unwrap()
    )))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(write(format!("[listener]\nsmtp = \"{}\"\n", relay.smtp))).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = run(write(format!("[listener]\nsmtp = \"{closed}\"\n"))).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
}
