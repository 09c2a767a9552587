//! The `project-relay` command: `serve` (the default), `check` and `send-test`.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use project_relay::config::{Config, LogFormat, ProjectSmtp, Provider, Source};
use project_relay::policy::FromDecision;
use project_relay::relay::Relay;
use project_relay::{Listeners, Reloader, Server, tls};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "SMTP relay proxy that applies the Project SMTP rules"
)]
struct Cli {
    /// Path to relay.toml.
    #[arg(
        long,
        short,
        global = true,
        env = "PROJECT_RELAY_CONFIG",
        default_value = "relay.toml"
    )]
    config: PathBuf,
    /// Log format; overrides `[log] format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<Format>,
    /// Worker threads of `serve` (default: one per CPU the process may use). A sidecar given
    /// about one core may as well have 1, so no second thread wakes for nothing.
    #[arg(long, global = true, env = "PROJECT_RELAY_THREADS")]
    threads: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Load and validate the config; one line per project. Exit 0 only if all is well.
    Check {
        /// Also connect to each upstream: TCP, TLS and AUTH, no mail sent.
        #[arg(long)]
        connect: bool,
    },
    /// Send a short test message through the transport and From rules of a project.
    SendTest {
        /// The project, as its mail would name it in the project header.
        #[arg(long)]
        project: String,
        /// The recipient.
        #[arg(long)]
        to: String,
        /// A From address to ask for (kept only if approved, as for real mail).
        #[arg(long)]
        from: Option<String>,
    },
    /// For container health checks: exit 0 if the running relay answers (`/healthz` on the
    /// admin listener, else the SMTP greeting).
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config, cli.log_format, cli.threads),
        Command::Check { connect } => check(&cli.config, connect),
        Command::SendTest { project, to, from } => {
            send_test(&cli.config, &project, &to, from.as_deref())
        }
        Command::Healthcheck => healthcheck(&cli.config),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none(),
            )
            .init(),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn runtime_with(threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.get());
    }
    builder.enable_all().build()
}

fn serve(path: &Path, format: Option<Format>, threads: Option<NonZeroUsize>) -> ExitCode {
    let loaded = Config::load(path);
    let format = match (format, &loaded) {
        (Some(Format::Json), _) => LogFormat::Json,
        (Some(Format::Text), _) => LogFormat::Text,
        (None, Ok(config)) => config.log_format,
        (None, Err(_)) => LogFormat::Text,
    };
    init_logging(format);
    let result = loaded
        .context("invalid configuration")
        .and_then(|config| run(path, Arc::new(config), threads));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path, config: Arc<Config>, threads: Option<NonZeroUsize>) -> anyhow::Result<()> {
    warn_misconfigured(&config);
    let rt = runtime_with(threads)?;
    tracing::info!("worker threads: {}", rt.metrics().num_workers());
    rt.block_on(async {
        // Handlers first: a signal that came before them would kill the process.
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())?;
        let hup = signal(SignalKind::hangup())?;
        let listeners = Listeners::bind(&config).await?;
        let server = Server::new(config, listeners)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(term, shutdown.clone()));
        tokio::spawn(reload_on_sighup(hup, path.to_owned(), server.reloader()));
        server.run(shutdown).await
    })
}

/// SIGHUP: read and validate the file again; use it if it is valid, else keep the running
/// config and log every problem. Open connections are not touched.
async fn reload_on_sighup(mut hup: tokio::signal::unix::Signal, path: PathBuf, reloader: Reloader) {
    while hup.recv().await.is_some() {
        let loaded = Config::load(&path).map_err(anyhow::Error::from);
        match loaded.and_then(|c| {
            warn_misconfigured(&c);
            reloader.reload(c)
        }) {
            Ok(()) => tracing::info!("reloaded {}", path.display()),
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!("reload failed, keeping the running config: {line}");
                }
            }
        }
    }
}

fn warn_misconfigured(config: &Config) {
    for (name, line) in config.check_report() {
        if let Err(problem) = line {
            tracing::warn!("project {name}: {problem}; its mail will be refused with 451 4.3.5");
        }
    }
}

async fn stop_on_signal(mut term: tokio::signal::unix::Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: no new connections, finishing transactions in flight");
    shutdown.cancel();
}

fn load_or_report(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            None
        }
    }
}

fn check(path: &Path, connect: bool) -> ExitCode {
    let Some(config) = load_or_report(path) else {
        return ExitCode::from(2);
    };
    let mut ok = true;
    if let Some(files) = &config.listener.tls
        && let Err(e) = tls::server_config(&files.certificate, &files.private_key)
    {
        println!("listener: error: {e}");
        ok = false;
    }
    // Only matters where mail goes to an upstream, so not for a capture-only setup.
    let helo = &config.upstream.helo_name;
    if !project_relay::address::is_fqdn_helo(helo)
        && !project_relay::relay::upstream_targets(&config).is_empty()
    {
        println!(
            "upstream: warning: the EHLO name {helo:?} is not a fully qualified domain name; \
             many submission services refuse it before AUTH (set [upstream] helo_name)"
        );
    }
    let relay = match Relay::new(Arc::new(config.clone())) {
        Ok(r) => Some(r),
        Err(e) => {
            println!("upstream: error: {e}");
            ok = false;
            None
        }
    };
    let rt = runtime().expect("tokio runtime");
    let probe = |target: &project_relay::config::SmtpTarget| match (&relay, connect) {
        (Some(relay), true) => match rt.block_on(relay.upstreams.probe(target)) {
            Ok(what) => Ok(format!(": {what}")),
            Err(e) => Err(format!(": error: {}", e.into_reply(target))),
        },
        _ => Ok(String::new()),
    };
    // One line per relay: the primary, then its fallback when it has one.
    let relay_line = |who: &str, t: &project_relay::config::SmtpTarget| {
        let result = probe(t);
        let said = result.as_ref().unwrap_or_else(|why| why);
        println!("{who}: smtp via {}:{} ({}){said}", t.host, t.port, t.tls);
        result.is_ok()
    };
    match &config.server.provider {
        Some(Provider::Smtp(t)) => {
            ok &= relay_line("server", t);
            if let Some(fb) = &config.server.fallback {
                ok &= relay_line("server fallback", fb);
            }
        }
        Some(Provider::Capture(dir)) => println!("server: capture to {}", dir.display()),
        None => println!("server: no provider; server mail is refused with 451 4.3.5"),
    }
    if let (Some(relay), Some(m)) = (&relay, &config.medplum) {
        match rt.block_on(relay.sources.check_fleet()) {
            Some(Ok(())) => println!("medplum: fleet client: token ok ({})", m.base_url),
            Some(Err(why)) => {
                println!("medplum: fleet client: error: {why}");
                ok = false;
            }
            None => println!("medplum: {} (per-project clients)", m.base_url),
        }
    }
    let mut misconfigured = 0;
    for (name, project) in &config.projects {
        let (secrets, from) = match (&project.source, &relay) {
            (Source::File(s), _) => (Ok(Some(s.clone())), ""),
            (Source::Medplum(_), Some(relay)) => (
                rt.block_on(relay.sources.find(&config, name))
                    .map(|found| found.map(|f| f.secrets)),
                " (from Medplum)",
            ),
            (Source::Medplum(_), None) => continue,
        };
        let line = match &secrets {
            Ok(Some(s)) => config.describe(s),
            Ok(None) => Ok("server transport".to_owned()),
            Err(reply) => Err(format!("error: {}", reply.text)),
        };
        if let Ok(Some(s)) = &secrets
            && matches!(s.smtp, ProjectSmtp::Misconfigured(_))
        {
            misconfigured += 1;
        }
        let line = match (line, &secrets) {
            (Ok(text), Ok(Some(s))) if config.server.allow_project_smtp => match &s.smtp {
                ProjectSmtp::Active(r) => probe(&r.target)
                    .map(|what| format!("{text}{what}"))
                    .map_err(|why| format!("error: {}{why}", text.trim_start_matches("ok: "))),
                _ => Ok(text),
            },
            (line, _) => line,
        };
        let capture = project
            .capture_dir
            .as_ref()
            .map(|d| format!(" (captured to {})", d.display()))
            .unwrap_or_default();
        match line {
            Ok(text) => println!("{name}: {text}{from}{capture}"),
            Err(text) => {
                println!("{name}: {text}{from}{capture}");
                ok = false;
            }
        }
        if let Ok(Some(s)) = &secrets
            && let ProjectSmtp::Active(r) = &s.smtp
            && let Some(fb) = &r.fallback
            && config.server.allow_project_smtp
        {
            ok &= relay_line(&format!("{name} fallback"), fb);
        }
    }
    if misconfigured > 0 && config.server.allow_project_smtp {
        eprintln!("{misconfigured} project(s) misconfigured: their mail is refused with 451 4.3.5");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Needs no HTTP client in the image: one request, written by hand, to our own listener.
fn healthcheck(path: &Path) -> ExitCode {
    use std::io::{Read, Write};
    let Some(config) = load_or_report(path) else {
        return ExitCode::from(2);
    };
    let (addr, request, expect) = match (&config.admin_listen, &config.listener.smtp) {
        (Some(admin), _) => (
            admin.clone(),
            &b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
            "HTTP/1.1 200",
        ),
        (None, Some(smtp)) => (smtp.clone(), &b"QUIT\r\n"[..], "220 "),
        (None, None) => {
            eprintln!("unhealthy: no admin or plain SMTP listener to ask");
            return ExitCode::FAILURE;
        }
    };
    // A wildcard listen address is reached on loopback.
    let addr = addr
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    let answer = (|| -> std::io::Result<String> {
        use std::net::ToSocketAddrs;
        let target = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let limit = std::time::Duration::from_secs(5);
        let mut sock = std::net::TcpStream::connect_timeout(&target, limit)?;
        sock.set_read_timeout(Some(limit))?;
        sock.write_all(request)?;
        let mut buf = [0u8; 64];
        let n = sock.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })();
    match answer {
        Ok(a) if a.starts_with(expect) => {
            println!("healthy: {addr}");
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!(
                "unhealthy: {addr} answered {:?}",
                a.lines().next().unwrap_or("")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn send_test(path: &Path, project: &str, to: &str, from: Option<&str>) -> ExitCode {
    let Some(config) = load_or_report(path) else {
        return ExitCode::from(2);
    };
    let fleet = config.medplum.as_ref().is_some_and(|m| m.fleet.is_some());
    if !config.projects.contains_key(project) && !fleet {
        eprintln!(
            "error: no [projects.{project}] in {}; its mail would take the server transport",
            path.display()
        );
        return ExitCode::from(2);
    }
    let relay = match Relay::new(Arc::new(config)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match runtime() {
        Ok(rt) => rt.block_on(relay.send_test(project, to, from)),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("project:   {project}");
    println!("transport: {}", outcome.transport);
    if let Some(from) = &outcome.resolved_from {
        let note = match outcome.from_decision {
            Some(FromDecision::Kept | FromDecision::KeptNamed) => " (kept: approved sender)",
            Some(FromDecision::Replaced | FromDecision::Added) => " (default From)",
            None => "",
        };
        println!("from:      {from}{note}");
    }
    println!("to:        {to}");
    println!("reply:     {}", outcome.reply);
    println!("time:      {} ms", outcome.took.as_millis());
    if outcome.reply.is_positive() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
