//! The `project-relay` command: `serve` (the default) and `check`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use project_relay::config::{Config, ProjectSmtp, Provider};
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Load and validate the config; one line per project. Exit 0 only if all is well.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_logging();
            match serve(&cli.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check => check(&cli.config),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(path).context("invalid configuration")?);
    warn_misconfigured(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
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

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::from(2);
        }
    };
    let mut ok = true;
    if let Some(files) = &config.listener.tls
        && let Err(e) = tls::server_config(&files.certificate, &files.private_key)
    {
        println!("listener: error: {e}");
        ok = false;
    }
    if let Err(e) = tls::client_config(config.upstream.ca_file.as_deref()) {
        println!("upstream: error: {e}");
        ok = false;
    }
    match &config.server.provider {
        Some(Provider::Smtp(t)) => println!("server: smtp via {}:{} ({})", t.host, t.port, t.tls),
        Some(Provider::Capture(dir)) => println!("server: capture to {}", dir.display()),
        None => println!("server: no provider; server mail is refused with 451 4.3.5"),
    }
    for (name, line) in config.check_report() {
        match line {
            Ok(text) => println!("{name}: {text}"),
            Err(text) => {
                println!("{name}: {text}");
                ok = false;
            }
        }
    }
    let misconfigured = config
        .projects
        .values()
        .filter(|p| matches!(p.smtp, ProjectSmtp::Misconfigured(_)))
        .count();
    if misconfigured > 0 && config.server.allow_project_smtp {
        eprintln!("{misconfigured} project(s) misconfigured: their mail is refused with 451 4.3.5");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
