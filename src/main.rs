//! kproxy: a kube-proxy replacement. Parses flags, sets up logging, and hands over to `app`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// mimalloc hands freed pages back to the kernel soon after a burst (a relist, a re-read of
/// large manifests, a full sync of a big ruleset); glibc's allocator kept them, which doubled
/// kproxy's resident memory in large clusters.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use kproxy::app;
use kproxy::cli::{Cli, Command};
use kproxy::config::Config;

/// kube-proxy's klog verbosity mapped to tracing levels; RUST_LOG, when set, wins.
fn init_tracing(verbosity: u8) {
    let level = match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},kube=warn,hyper=warn,tower=warn")));
    // Colours only on a terminal: log files and `kubectl logs` get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (flags, render_output) = match cli.command {
        Some(Command::Render { flags, output }) => (flags, Some(output)),
        None => (cli.flags, None),
    };
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kproxy: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.verbosity);
    if flags.validate {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    // kube and the Ingress proxy share one rustls; install its provider before any TLS use.
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kproxy: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if flags.cleanup {
            return app::cleanup(config).await;
        }
        if let Some(output) = render_output {
            let text = app::render(config, &output).await?;
            print!("{text}");
            return Ok(());
        }
        app::run(config).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
