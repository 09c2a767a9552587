//! The relay binary run as a user runs it, its log (stderr) read line by line.

use std::io::{BufRead, BufReader, Lines};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};

/// `project-relay` from this build, in the repo folder, with a clean environment for it.
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_project-relay"));
    c.current_dir(super::repo());
    c.env_remove("PROJECT_RELAY_CONFIG");
    c.env("NO_COLOR", "1");
    c
}

pub struct Process {
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    /// Every log line read so far.
    pub log: String,
}

impl Process {
    pub fn start(mut cmd: Command) -> Process {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("start the relay");
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        Process {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Reads the log until a line contains `needle`, and returns that line.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .next()
                .unwrap_or_else(|| panic!("relay exited before {needle:?}:\n{}", self.log))
                .unwrap();
            self.log.push_str(&line);
            self.log.push('\n');
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The address of the next `listening on ADDR` line (text or JSON logs).
    pub fn listening(&mut self) -> SocketAddr {
        let line = self.wait_for("listening on ");
        self.listening_in(&line)
    }

    /// The address in a `listening on ADDR` line.
    pub fn listening_in(&self, line: &str) -> SocketAddr {
        let rest = line
            .split("listening on ")
            .nth(1)
            .expect("a listening line");
        let addr: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"')
            .collect();
        addr.parse()
            .unwrap_or_else(|_| panic!("no address in {line:?}"))
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, then the exit status and the whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        for line in self.lines.by_ref() {
            self.log.push_str(&line.unwrap());
            self.log.push('\n');
        }
        (status, std::mem::take(&mut self.log))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary once with `args` on the config `toml` (written to a temporary file), off
/// the async runtime; returns whether it succeeded, and its stdout.
pub async fn run_once(toml: String, args: &'static [&'static str]) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml).unwrap();
        let out = command()
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), stdout)
    })
    .await
    .unwrap()
}
