//! The admin page in a real browser: headless Chromium driven over WebDriver (chromedriver),
//! against a relay started in-process, with mail sent over SMTP. Screenshots of the inbox and
//! of a message are saved under `target/screenshots/` for a person to look at.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them
//! the tests say so and pass, unless `RELAY_REQUIRE_BROWSER=1` (set by CI) makes that a
//! failure.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Relay;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

struct Browser {
    client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A headless Chromium, or `None` (after saying why) when it is not installed here.
async fn browser() -> Option<Browser> {
    if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var("RELAY_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "{CHROMEDRIVER} and {CHROMIUM} are required (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: no {CHROMEDRIVER} (apt-get install chromium chromium-driver)");
        return None;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--no-default-browser-check"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(client) => return Some(Browser { client, driver }),
            Err(e) if std::time::Instant::now() > deadline => panic!("chromedriver: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn config(extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n[server]\nsupportEmail = \"Example <noreply@example.com>\"\n\
         [server.capture]\ndir = \"{{dir}}/outbox\"\n\
         [projects.acme]\ncaptureDir = \"{{dir}}/acme\"\nsmtpHost = \"smtp.acme.example\"\nsmtpPort = 587\nsmtpUsername = \"u\"\n\
         smtpPassword = \"p\"\nsmtpFromAddress = \"Acme <noreply@acme.example>\"\nsmtpApprovedSenders = \"alice@acme.example\"\n"
    )
}

async fn send(relay: &Relay, message: &str) -> String {
    let mut c = relay.client().await;
    c.send_mail("app@app.example", &["bob@dest.example"], message.as_bytes())
        .await
}

fn page(relay: &Relay) -> String {
    format!("http://{}/", relay.admin.unwrap())
}

async fn rows(client: &Client, selector: &str) -> usize {
    client
        .find_all(Locator::Css(selector))
        .await
        .map(|r| r.len())
        .unwrap_or(0)
}

/// Waits up to `within` for `selector` to match `n` elements.
async fn wait_rows(client: &Client, selector: &str, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while rows(client, selector).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{selector}: not {n} within {within:?} (now {})",
            rows(client, selector).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `op` on the element `what` finds, finding it again if the page redrew it meanwhile
/// (new mail arriving redraws the list).
async fn on_element<T, F>(client: &Client, what: Locator<'_>, op: impl Fn(Element) -> F) -> T
where
    F: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut attempt = 0;
    loop {
        match op(client.find(what).await.unwrap()).await {
            Ok(t) => return t,
            Err(e) if attempt < 5 => {
                eprintln!("retrying on a redrawn element: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what:?}: {e}"),
        }
        attempt += 1;
    }
}

async fn click(client: &Client, what: Locator<'_>) {
    on_element(client, what, |e| async move { e.click().await }).await
}

async fn text(client: &Client, what: Locator<'_>) -> String {
    on_element(client, what, |e| async move { e.text().await }).await
}

fn save(name: &str, png: &[u8]) {
    let dir = common::repo().join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test]
async fn new_mail_appears_within_two_seconds_with_its_from_decision() {
    let Some(b) = browser().await else { return };
    let relay = Relay::start(&config("")).await;
    b.client.goto(&page(&relay)).await.unwrap();
    b.client
        .wait()
        .for_element(Locator::Id("empty"))
        .await
        .unwrap();
    let reply = send(
        &relay,
        "X-Project-Id: acme\r\nFrom: Mallory <mallory@other.example>\r\nTo: bob@dest.example\r\nSubject: =?UTF-8?B?UmVwb3J0IGbDvHIgTcOkcno=?=\r\n\r\nThe quarterly numbers.\r\n",
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    wait_rows(&b.client, "tr.message", 1, Duration::from_secs(2)).await;
    let row_text = text(&b.client, Locator::Css("tr.message")).await;
    assert!(row_text.contains("Report für März"), "{row_text}");
    assert!(
        row_text.contains("Acme <noreply@acme.example>")
            && row_text.contains("mallory@other.example"),
        "{row_text}"
    );
    save("inbox.png", &b.client.screenshot().await.unwrap());

    click(&b.client, Locator::Css("tr.message")).await;
    b.client
        .wait()
        .for_element(Locator::Css("#m-decision"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let decision = text(&b.client, Locator::Id("m-decision")).await;
    assert!(
        decision.contains(
            "mallory@other.example is not in acme's smtpApprovedSenders: replaced by smtpFromAddress"
        ),
        "{decision}"
    );
    let envelope = text(&b.client, Locator::Id("m-envelope")).await;
    assert!(envelope.contains("X-Project-Id: acme"), "{envelope}");
    let body = text(&b.client, Locator::Id("m-text")).await;
    assert!(body.contains("The quarterly numbers."), "{body}");
    save("message.png", &b.client.screenshot().await.unwrap());
}

/// Counts requests to a local HTTP port: what a remote image or a script's beacon would hit.
async fn beacon() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn captured_html_never_runs_script_or_loads_remote_content() {
    let Some(b) = browser().await else { return };
    let (addr, hits) = beacon().await;
    let relay = Relay::start(&config("")).await;
    let html = format!(
        "<html><body><p id=\"hello\">Hello</p>\
         <script>document.body.setAttribute('data-ran','yes');try{{parent.document.title='pwned'}}catch(e){{}}\
         new Image().src='http://{addr}/script.png';</script>\
         <img src=\"http://{addr}/remote.png\"><img src=\"x\" onerror=\"document.body.setAttribute('data-ran','onerror')\">\
         <link rel=\"stylesheet\" href=\"http://{addr}/style.css\"></body></html>"
    );
    let message = format!(
        "X-Project-Id: acme\r\nFrom: alice@acme.example\r\nSubject: html\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n\
         --b\r\nContent-Type: text/html\r\n\r\n{html}\r\n--b--\r\n"
    );
    assert!(send(&relay, &message).await.starts_with("250"));
    b.client.goto(&page(&relay)).await.unwrap();
    wait_rows(&b.client, "tr.message", 1, Duration::from_secs(2)).await;
    click(&b.client, Locator::Css("tr.message")).await;
    b.client
        .wait()
        .for_element(Locator::Css("#m-decision"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.client.title().await.unwrap(), "project-relay");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing remote was fetched");
    // Inside the frame: the body is shown, and no script (nor handler) ran.
    b.client.enter_frame(Some(0)).await.unwrap();
    let hello = b.client.find(Locator::Id("hello")).await.unwrap();
    assert_eq!(hello.text().await.unwrap(), "Hello");
    let body = b.client.find(Locator::Css("body")).await.unwrap();
    assert_eq!(body.attr("data-ran").await.unwrap(), None);
    b.client.enter_parent_frame().await.unwrap();
}

#[tokio::test]
async fn activity_shows_a_refused_message_and_delete_all_empties_the_inbox() {
    let Some(b) = browser().await else { return };
    let relay = Relay::start(&config("")).await;
    for _ in 0..2 {
        assert!(
            send(&relay, "X-Project-Id: acme\r\nSubject: s\r\n\r\nhi\r\n")
                .await
                .starts_with("250")
        );
    }
    let reply = send(
        &relay,
        "X-Project-Id: acme\r\nX-Project-Id: other\r\nSubject: s\r\n\r\nhi\r\n",
    )
    .await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    b.client.goto(&page(&relay)).await.unwrap();
    wait_rows(&b.client, "tr.message", 2, Duration::from_secs(2)).await;

    click(&b.client, Locator::Id("tab-activity")).await;
    wait_rows(&b.client, "tr.activity", 3, Duration::from_secs(2)).await;
    let refused = text(&b.client, Locator::Css("tr.activity[data-outcome=refused]")).await;
    assert!(refused.contains("550 5.7.1"), "{refused}");
    save("activity.png", &b.client.screenshot().await.unwrap());

    click(&b.client, Locator::Id("tab-inbox")).await;
    click(&b.client, Locator::Id("delete-all")).await;
    b.client.accept_alert().await.unwrap();
    wait_rows(&b.client, "tr.message", 0, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn with_a_token_the_page_shows_no_mail_until_it_is_given() {
    let Some(b) = browser().await else { return };
    let relay = Relay::start(&config("token = \"s3cret-admin-token\"")).await;
    assert!(
        send(
            &relay,
            "X-Project-Id: acme\r\nSubject: private\r\n\r\nhi\r\n"
        )
        .await
        .starts_with("250")
    );
    b.client.goto(&page(&relay)).await.unwrap();
    let login = b
        .client
        .wait()
        .for_element(Locator::Id("login"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(login.is_displayed().await.unwrap(), "asks for the token");
    assert_eq!(rows(&b.client, "tr.message").await, 0, "no mail without it");
    let source = b.client.source().await.unwrap();
    assert!(!source.contains("private"), "no mail in the page");

    let input = b.client.find(Locator::Id("token")).await.unwrap();
    input.send_keys("s3cret-admin-token").await.unwrap();
    click(&b.client, Locator::Css("#login-form button")).await;
    wait_rows(&b.client, "tr.message", 1, Duration::from_secs(2)).await;
}
