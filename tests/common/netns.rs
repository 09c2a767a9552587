//! A test host that is not loopback: a network namespace joined to this one by a veth pair,
//! made (and removed) by the test itself. The relay reaches it at `HOST_ADDR` exactly as it
//! would reach a provider on another machine, so no loopback exception can hide a rule.
//! Needs root and iproute2's `ip` (CI runs as root and installs it).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Command;

/// The test host's address; the shipped test certificate names it.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 77, 2);
/// This side of the veth pair.
const LOCAL_ADDR: &str = "10.231.77.1/30";
const NAMESPACE: &str = "project-relay-test";
const LOCAL_LINK: &str = "prelay-host";
const REMOTE_LINK: &str = "prelay-peer";

pub struct TestHost {
    /// Held for the host's lifetime: one address, so one test host at a time on this machine
    /// (test binaries and nextest processes run in parallel).
    _lock: File,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestHost {
    pub fn create() -> TestHost {
        let lock = File::create(std::env::temp_dir().join("project-relay-netns.lock")).unwrap();
        // SAFETY: flock on a file descriptor we own; it is released when the file closes.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        // Left over from a run that was killed.
        let _ = ip(&["netns", "del", NAMESPACE]);
        let _ = ip(&["link", "del", LOCAL_LINK]);
        let remote = format!("{HOST_ADDR}/30");
        let steps: [&[&str]; 8] = [
            &["netns", "add", NAMESPACE],
            &[
                "link",
                "add",
                LOCAL_LINK,
                "type",
                "veth",
                "peer",
                "name",
                REMOTE_LINK,
            ],
            &["link", "set", REMOTE_LINK, "netns", NAMESPACE],
            &["addr", "add", LOCAL_ADDR, "dev", LOCAL_LINK],
            &["link", "set", LOCAL_LINK, "up"],
            &["-n", NAMESPACE, "addr", "add", &remote, "dev", REMOTE_LINK],
            &["-n", NAMESPACE, "link", "set", REMOTE_LINK, "up"],
            &["-n", NAMESPACE, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if let Err(e) = ip(step) {
                let _ = ip(&["netns", "del", NAMESPACE]);
                panic!("making the non-loopback test host: {e}");
            }
        }
        TestHost { _lock: lock }
    }

    /// A listener inside the namespace, on `HOST_ADDR` and a free port, usable from tokio.
    pub fn listen(&self) -> tokio::net::TcpListener {
        let listener = std::thread::spawn(|| {
            // A socket belongs to the namespace it was made in: make it from a thread that
            // joined the namespace, then hand it back.
            let ns = File::open(format!("/var/run/netns/{NAMESPACE}")).unwrap();
            // SAFETY: setns on a namespace file descriptor we own; it affects this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind((IpAddr::V4(HOST_ADDR), 0)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .expect("listener thread");
        tokio::net::TcpListener::from_std(listener).unwrap()
    }
}

impl TestHost {
    /// This machine's address as the test host sees it.
    pub fn local_addr() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, 77, 1))
    }

    /// One HTTP/1.1 request from the test host (a non-loopback client) to `port` on this
    /// machine; returns the status code and the body.
    pub fn http(&self, port: u16, request_head: &str) -> (u16, String) {
        let head = request_head.to_owned();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let ns = File::open(format!("/var/run/netns/{NAMESPACE}")).unwrap();
            // SAFETY: as in `listen`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let mut tcp = std::net::TcpStream::connect((TestHost::local_addr(), port)).unwrap();
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            tcp.write_all(format!("{head}Host: relay\r\nConnection: close\r\n\r\n").as_bytes())
                .unwrap();
            let mut response = String::new();
            tcp.read_to_string(&mut response).unwrap();
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            (status, body)
        })
        .join()
        .expect("client thread")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Removing the namespace removes its end of the veth pair, and so the pair.
        let _ = ip(&["netns", "del", NAMESPACE]);
        let _ = ip(&["link", "del", LOCAL_LINK]);
    }
}
