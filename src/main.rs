//! kproxy: a kube-proxy replacement. Parses flags, sets up logging, and hands over to `app`.
// Denied, not forbidden: the one exception is the allocator's option, set before any thread
// exists (`set_allocator_policy`).
#![deny(unsafe_code)]

use std::process::ExitCode;

/// mimalloc hands freed pages back to the kernel soon after a burst (a relist, a re-read of
/// large manifests, a full sync of a big ruleset); glibc's allocator kept them, which doubled
/// kproxy's resident memory in large clusters.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (libmimalloc-sys does not export it;
/// `tests::purge_delay_option_is_the_one_we_mean` checks the index against its default).
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_allow_thp` in the same enum (checked the same way, against its default 1).
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Freed memory goes back to the kernel at once (mimalloc's purge delay 0) instead of after
/// its default 1 s. mimalloc purges a delayed page only when the thread that freed it calls
/// into the allocator again, and the threads that ran a large sync then mostly sit idle: the
/// resident size stayed at the first sync's peak for good. What it costs and saves is measured
/// in BENCHMARKS.md ("Allocator policy").
///
/// And no transparent huge pages: mimalloc asks for them on its arena (`MADV_HUGEPAGE`, which
/// the kernel honours in its default `madvise` mode), and a 2 MiB page is resident whole as
/// long as one object on it lives. At 10,000 Services that was 44 MiB of huge pages in a
/// 118 MiB process, and steady 118 -> 99 MiB without them (BENCHMARKS.md, "The gap between the
/// live heap and the resident size"). mimalloc has reserved and advised its first arena before
/// `main` runs, so its option alone comes too late for it: the process itself opts out
/// (`PR_SET_THP_DISABLE`, inherited by the tools kproxy runs, which do not need them either).
/// An operator's `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ALLOW_THP` wins.
#[cfg(not(feature = "system-allocator"))]
#[allow(unsafe_code)]
fn set_allocator_policy() {
    for (option, env, value) in [
        (MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
        (MI_OPTION_ALLOW_THP, "MIMALLOC_ALLOW_THP", 0),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mi_option_set writes one entry of mimalloc's static option table and is
            // not thread safe; this runs first thing in main, before the async runtime or any
            // other thread exists, and both options are plain integers mimalloc reads when it
            // maps or purges memory.
            unsafe { libmimalloc_sys::mi_option_set(option, value) }
        }
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Without it (a kernel before 3.15) huge pages only cost memory, never correctness.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}

#[cfg(feature = "system-allocator")]
fn set_allocator_policy() {}

/// Returning what a full sync freed. mimalloc hands a page back to the kernel only when the
/// thread owning it collects it, and a page freed from another thread (a watcher's converted
/// object dropped by the sync, a plan dropped after its apply) stays with its owner until then;
/// the async runtime's workers then mostly sit parked. So the sync bumps an epoch and collects
/// its own thread, and every worker collects once when it next parks and finds the epoch moved
/// (a load and a compare per park otherwise). Measured in BENCHMARKS.md ("The gap between the
/// live heap and the resident size").
#[cfg(not(feature = "system-allocator"))]
mod memory {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    static EPOCH: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        static COLLECTED: Cell<u64> = const { Cell::new(0) };
    }

    /// After a full sync, on the thread that ran it.
    pub fn release() {
        EPOCH.fetch_add(1, Ordering::Relaxed);
        collect_if_behind();
        // Wake the parked workers so that they collect now, not at their next event.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            for _ in 0..super::WORKER_THREADS {
                runtime.spawn(async {});
            }
        }
    }

    /// On a worker, each time it parks.
    #[allow(unsafe_code)]
    pub fn collect_if_behind() {
        let epoch = EPOCH.load(Ordering::Relaxed);
        let behind = COLLECTED.try_with(|c| c.replace(epoch) != epoch).unwrap_or(false);
        if behind {
            // SAFETY: mi_collect takes no pointer and is safe to call from any thread at any
            // time; it frees this thread's empty pages and purges free arena memory.
            unsafe { libmimalloc_sys::mi_collect(true) }
        }
    }
}

/// The async runtime's worker threads (the Ingress proxy runs its own).
const WORKER_THREADS: usize = 2;

use clap::Parser;

use kproxy::app;
use kproxy::cli::{Cli, Command, KUBE_VERSION};
use kproxy::config::{self, Config};
use kproxy::node_setup;

/// kube-proxy's klog verbosity mapped to tracing levels; RUST_LOG, when set, wins.
/// `--logging-format json` writes one JSON object per line (ts, level, msg, fields), as
/// component-base's JSON logger does.
fn init_tracing(verbosity: u8, json: bool) {
    let level = match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},kube=warn,hyper=warn,tower=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        // Colours only on a terminal: log files and `kubectl logs` get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).init();
    }
}

/// `--version` as kube-proxy prints it (`Kubernetes vX.Y.Z`), and `--version=raw`.
fn print_version(raw: bool) {
    let kproxy = env!("CARGO_PKG_VERSION");
    if raw {
        println!(
            "version.Info{{Major:\"1\", Minor:\"33\", GitVersion:\"{KUBE_VERSION}\", GitCommit:\"\", GitTreeState:\"\", \
             BuildDate:\"\", GoVersion:\"\", Compiler:\"rustc\", Platform:\"{}/{}\", Kproxy:\"{kproxy}\"}}",
            std::env::consts::OS,
            std::env::consts::ARCH
        );
    } else {
        println!("Kubernetes {KUBE_VERSION} (kproxy {kproxy})");
    }
}

fn main() -> ExitCode {
    set_allocator_policy();
    // The iptables native writer's child (kproxy re-executes itself): no flags, no logging.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(kproxy::dataplane::iptables::native::SUBCOMMAND) {
        let code = kproxy::dataplane::iptables::native::child_main(&args[1..]);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    let (flags, render_output) = match cli.command {
        Some(Command::Render { flags, output }) => (flags, Some(output)),
        None => (cli.flags, None),
    };
    match flags.version.as_deref() {
        Some("raw") => {
            print_version(true);
            return ExitCode::SUCCESS;
        }
        Some(v) if config::parse_go_bool(v) == Some(true) => {
            print_version(false);
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kproxy: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.verbosity, config.log_json);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(path) = flags
        .write_config_to
        .as_ref()
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
    {
        if let Err(e) = std::fs::write(&path, config::v1alpha1::encode(&config.kube)) {
            eprintln!("kproxy: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        tracing::info!(file = %path.display(), "Wrote configuration");
        return ExitCode::SUCCESS;
    }
    if flags.validate {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    if config.init_only {
        node_setup::run(&config);
        tracing::info!("--init-only: node setup done");
        return ExitCode::SUCCESS;
    }
    // kube and the Ingress proxy share one rustls; install its provider before any TLS use.
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(WORKER_THREADS).enable_all();
    #[cfg(not(feature = "system-allocator"))]
    {
        builder.on_thread_park(memory::collect_if_behind);
        kproxy::sync::set_memory_release(memory::release);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kproxy: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if config.cleanup {
            return app::cleanup(config).await;
        }
        if let Some(output) = render_output {
            let text = app::render(config, &output).await?;
            print!("{text}");
            return Ok(());
        }
        node_setup::run(&config);
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

#[cfg(all(test, not(feature = "system-allocator")))]
mod tests {
    /// The index is mimalloc's, not the crate's: a release that renumbers the options would
    /// make kproxy set some other option. Its default (1000 ms in mimalloc 3) identifies it.
    #[test]
    #[allow(unsafe_code)]
    fn purge_delay_option_is_the_one_we_mean() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one entry of mimalloc's option table; nothing in this test binary sets it.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000);
    }

    /// The same for `mi_option_allow_thp`, whose default is 1, between
    /// `page_cross_thread_max_reclaim` (32) and `minimal_purge_size` (0).
    #[test]
    #[allow(unsafe_code)]
    fn allow_thp_option_is_the_one_we_mean() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        // SAFETY: as above.
        let (value, before, after) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::MI_OPTION_ALLOW_THP),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_ALLOW_THP - 1),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_ALLOW_THP + 1),
            )
        };
        assert_eq!((before, value, after), (32, 1, 0));
    }
}
