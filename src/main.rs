//! The `confab` binary: parse the command line, load config, run the node until
//! Ctrl-C or SIGTERM, then shut down gracefully; or, with `admin`, call a
//! node's server API.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use confab::admin::AdminCommand;
use confab::http::HttpUrl;
use confab::{Config, Server};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "confab", version, about = "Real-time chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Config file layered over the built-in defaults (see config/default.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Call a node's server API (docs/API.md).
    Admin {
        /// The API's address (`api.listen`): https, or http on loopback.
        #[arg(long, env = "CONFAB_ADMIN_API", default_value = "http://127.0.0.1:7310")]
        api: String,
        /// One of the node's `api.keys`.
        #[arg(long, env = "CONFAB_ADMIN_KEY", hide_env_values = true)]
        key: String,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    let result = match command {
        Command::Serve { config } => serve(config),
        Command::Admin { api, key, command } => admin(&api, &key, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref())?;
    init_tracing(&config.log.level)?;
    for name in &config.ignored_env {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no config key");
    }
    raise_open_files_limit();
    disable_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the main runtime")?;
    // Outside the runtime: the node builds runtimes of its own, and one must not
    // be dropped (on a startup error) inside another.
    let server = Server::start(config)?;
    runtime.block_on(async {
        // A machine-readable line for scripts and tests that start the binary.
        let mut stdout = std::io::stdout().lock();
        // One write, so a reader that stops after the first line loses nothing.
        let mut lines = format!("listening on {}\n", server.local_addr());
        if let Some(addr) = server.websocket_addr() {
            lines += &format!("websocket on {addr}\n");
        }
        if let Some(addr) = server.quic_addr() {
            lines += &format!("quic on {addr}\n");
        }
        if let Some(addr) = server.metrics_addr() {
            lines += &format!("metrics on {addr}\n");
        }
        if let Some(addr) = server.api_addr() {
            lines += &format!("api on {addr}\n");
        }
        if let Some(fingerprint) = server.tls_fingerprint() {
            lines += &format!("tls certificate sha256 {fingerprint}\n");
        }
        if let Some(fingerprint) = server.quic_fingerprint() {
            lines += &format!("quic certificate sha256 {fingerprint}\n");
        }
        stdout.write_all(lines.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        shutdown_signal().await?;
        tracing::info!("shutting down");
        server.shutdown().await.context("closing the store")
    })
}

fn admin(api: &str, key: &str, command: AdminCommand) -> anyhow::Result<()> {
    let api = HttpUrl::parse(api).with_context(|| format!("--api {api}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let answer = runtime.block_on(confab::admin::run(&api, key, command))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{answer}")?;
    Ok(())
}

/// Every connection is a descriptor: use the hard limit. The node derives its
/// connection limit from what this leaves (see `limits.reserved_file_descriptors`).
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open files limit"),
    }
}

/// The allocator asks for transparent huge pages for its arenas, so the first
/// touch of each 2 MiB of heap zeroes all of it in one page fault, on whichever
/// thread touched it: a shard or the store writer stalled for 20–50 ms that way
/// (seen with `perf sched timehist`, stacks in `folio_zero_user`). Like Redis,
/// the node opts out for the whole process; later faults take 4 KiB pages.
fn disable_transparent_huge_pages() {
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %err, "could not opt out of transparent huge pages");
    }
}

fn init_tracing(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::try_new(env).context("RUST_LOG")?,
        _ => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("invalid config key `log.level`: {level:?}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    Ok(())
}
