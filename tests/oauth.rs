//! XOAUTH2 upstreams (Microsoft 365, Google) end to end: a printer speaks plain SMTP to the
//! relay, the relay gets OAuth2 tokens from a test token endpoint and authenticates with
//! XOAUTH2 to a test upstream that accepts only the tokens that endpoint issued.

mod common;

use std::time::Duration;

use common::oauth::TokenEndpoint;
use common::upstream::XOAuth2;
use common::{Relay, Script, Upstream};

const CLIENT_SECRET: &str = "app-secret-value-7Q~x";
const MSG: &[u8] =
    b"X-Project-Id: m365\r\nFrom: printer@contoso.example\r\nSubject: scan\r\n\r\npdf\r\n";

async fn upstream(endpoint: &TokenEndpoint, google: bool) -> Upstream {
    Upstream::start(Script {
        xoauth2: Some(XOAuth2 {
            tokens: endpoint.issued.clone(),
            google,
        }),
        ..Script::default()
    })
    .await
}

fn config(endpoint: &TokenEndpoint, up: &Upstream, extra: &str, upstream_extra: &str) -> String {
    format!(
        "[upstream]\n{upstream_extra}\n[server]\nsupportEmail = \"noreply@example.com\"\n[server.capture]\ndir = \"{{dir}}/server\"\n\
         [projects.m365]\nsmtpHost = \"127.0.0.1\"\nsmtpPort = {}\nsmtpSecure = false\nsmtpUsername = \"printer@contoso.example\"\n\
         smtpAuthMethod = \"xoauth2\"\nsmtpOAuthTokenUrl = \"{}\"\nsmtpOAuthClientId = \"app-id\"\nsmtpOAuthClientSecret = \"{CLIENT_SECRET}\"\n\
         smtpOAuthScope = \"https://outlook.office365.com/.default\"\nsmtpFromAddress = \"printer@contoso.example\"\n{extra}",
        up.port(),
        endpoint.url()
    )
}

async fn send(relay: &Relay) -> String {
    let mut c = relay.client().await;
    c.send_mail("scanner@printer.local", &["x@dest.example"], MSG)
        .await
}

#[tokio::test]
async fn fifty_messages_through_an_xoauth2_only_upstream_take_one_token() {
    let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
    let up = upstream(&endpoint, false).await;
    let relay = Relay::start(&config(
        &endpoint,
        &up,
        "",
        "max_messages_per_connection = 10",
    ))
    .await;
    for _ in 0..50 {
        let reply = send(&relay).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    let got = up.received();
    assert_eq!(got.len(), 50);
    assert_eq!(got[0].auth_user.as_deref(), Some("printer@contoso.example"));
    assert!(
        up.connections() >= 5,
        "new connections reused the cached token"
    );
    assert_eq!(endpoint.requests(), 1);
    let grants = endpoint.lock().grants.clone();
    assert_eq!(
        grants,
        [(
            "client_credentials".to_owned(),
            Some("https://outlook.office365.com/.default".to_owned())
        )]
    );
}

#[tokio::test]
async fn a_token_that_expires_between_messages_is_renewed_before_it_is_refused() {
    let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
    endpoint.lock().expires_in = 2;
    let up = upstream(&endpoint, false).await;
    // One message per connection: every message authenticates with the token of the moment.
    let relay = Relay::start(&config(
        &endpoint,
        &up,
        "",
        "max_messages_per_connection = 1",
    ))
    .await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let reply = send(&relay).await;
        assert!(reply.starts_with("250"), "{reply}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let refused = up
        .commands()
        .iter()
        .filter(|c| c.starts_with("AUTH"))
        .count()
        - up.received().len();
    assert_eq!(refused, 0, "no AUTH was refused: no expired token was sent");
    assert!(endpoint.requests() >= 3, "renewed: {}", endpoint.requests());
}

#[tokio::test]
async fn a_revoked_token_is_replaced_after_one_refused_auth() {
    for google in [false, true] {
        let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
        let up = upstream(&endpoint, google).await;
        let relay = Relay::start(&config(
            &endpoint,
            &up,
            "",
            "max_messages_per_connection = 1",
        ))
        .await;
        assert!(send(&relay).await.starts_with("250"));
        endpoint.issued.revoke_all();
        let reply = send(&relay).await;
        assert!(reply.starts_with("250"), "google={google}: {reply}");
        assert_eq!(endpoint.requests(), 2);
        assert_eq!(up.received().len(), 2);
        // With google, the upstream waited for the empty line that answers its 334 challenge
        // (and says 501 to anything else) before its 535: the 250 above needed it.
        // The upstream now refuses every token (the mailbox lost its permission): one more
        // try with a new token, then 451 4.7.0 with the upstream's reply.
        up.script(|s| {
            s.xoauth2 = Some(XOAuth2 {
                tokens: Default::default(),
                google,
            })
        });
        let reply = send(&relay).await;
        assert!(
            reply.starts_with("451 4.7.0") && reply.contains("535"),
            "{reply}"
        );
        assert_eq!(endpoint.requests(), 3);
    }
}

#[tokio::test]
async fn the_refresh_token_grant_takes_a_rotated_refresh_token() {
    let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
    {
        let mut m = endpoint.lock();
        m.refresh_tokens = vec!["refresh-0".into()];
        m.rotate = true;
        m.expires_in = 1;
    }
    let up = upstream(&endpoint, false).await;
    let relay = Relay::start(&config(
        &endpoint,
        &up,
        "smtpOAuthRefreshToken = \"refresh-0\"",
        "max_messages_per_connection = 1",
    ))
    .await;
    for _ in 0..3 {
        let reply = send(&relay).await;
        assert!(reply.starts_with("250"), "{reply}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // Each request used the refresh token the one before it returned (the old one no longer
    // works): all were granted.
    let grants = endpoint.lock().grants.clone();
    assert!(grants.len() >= 3, "{grants:?}");
    assert!(grants.iter().all(|(g, _)| g == "refresh_token"));
    assert_eq!(up.received().len(), 3);
}

#[tokio::test]
async fn the_token_endpoint_down_or_refusing_is_451_4_7_0_naming_it_and_no_secret() {
    let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
    endpoint.lock().down = true;
    let up = upstream(&endpoint, false).await;
    let relay = Relay::start(&config(&endpoint, &up, "", "")).await;
    let reply = send(&relay).await;
    assert!(reply.starts_with("451 4.7.0"), "{reply}");
    assert!(
        reply.contains(&endpoint.addr.to_string()) && reply.contains("temporarily_unavailable"),
        "{reply}"
    );
    endpoint.lock().down = false;
    endpoint.lock().client_secret = "rotated-by-the-admin".into();
    let reply = send(&relay).await;
    assert!(reply.contains("invalid_client"), "{reply}");
    assert!(
        !reply.contains(CLIENT_SECRET) && !reply.contains("AADSTS"),
        "{reply}"
    );
    assert!(up.received().is_empty());
}

#[tokio::test]
async fn check_connect_authenticates_with_xoauth2_and_probes_the_fallback() {
    let endpoint = TokenEndpoint::start("app-id", CLIENT_SECRET).await;
    let up = upstream(&endpoint, false).await;
    let fb = Upstream::start(Script {
        auth: vec![("b".into(), "bp".into())],
        ..Script::default()
    })
    .await;
    let extra = format!(
        "smtpFallbackHost = \"127.0.0.1\"\nsmtpFallbackPort = {}\nsmtpFallbackSecure = false\nsmtpFallbackUsername = \"b\"\nsmtpFallbackPassword = \"bp\"\n",
        fb.port()
    );
    let toml =
        config(&endpoint, &up, &extra, "").replace("{dir}", std::env::temp_dir().to_str().unwrap());
    let (ok, out) = common::process::run_once(toml, &["check", "--connect"]).await;
    assert!(ok, "{out}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {out}"))
            .to_owned()
    };
    assert!(
        line("m365: ok: smtp via").contains("authenticated"),
        "{out}"
    );
    assert!(
        line("m365 fallback: smtp via").contains("authenticated"),
        "{out}"
    );
    assert_eq!(endpoint.requests(), 1);
    assert!(
        !out.contains(CLIENT_SECRET) && !out.contains("access-"),
        "{out}"
    );
}
