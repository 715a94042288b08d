//! `portslice`: the CNI plugin when a runtime calls it (CNI_COMMAND is set), else the node
//! daemon and tools (`portslice daemon ...`).

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portslice_cni::cni::env::CniEnv;
use portslice_cni::cni::error::{CniError, code};
use portslice_cni::cni::version::Version;
use portslice_cni::cni::{config, timing, verbs};
use portslice_cni::daemon::{self, DaemonArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "portslice",
    version,
    about = "PortSlice: host-IP sharing with eBPF port steering"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon: load and pin the datapath, install the CNI plugin, serve metrics.
    // A flag given twice takes the last value, as the chart's args then a user's extra args.
    #[command(args_override_self = true)]
    Daemon(DaemonArgs),
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    init_logs("info");
    let cli = Cli::parse();
    match cli.command {
        Cmd::Daemon(args) => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the tokio runtime");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(daemon::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "daemon failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Logs go to stderr (stdout belongs to the CNI result); `PORTSLICE_LOG` sets the filter.
fn init_logs(default: &str) {
    let filter =
        EnvFilter::try_from_env("PORTSLICE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// CNI mode: read the environment and stdin, run the verb, print the result or the spec's error
/// on stdout, exit non-zero on error.
fn cni_main() -> ExitCode {
    timing::process_started();
    init_logs("warn");
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let outcome = match read {
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            "reading the network configuration from stdin failed",
        )
        .with_details(e.to_string())),
        Ok(_) => {
            CniEnv::from_lookup(|k| std::env::var(k).ok()).and_then(|env| verbs::run(&env, &stdin))
        }
    };
    if let Some(line) = timing::report() {
        eprintln!("{line}");
    }
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(text) => {
            if let Some(text) = text {
                let _ = writeln!(out, "{text}");
            }
            ExitCode::SUCCESS
        }
        Err(mut e) => {
            // Answer in the caller's version whenever we speak it (errors found before the
            // config was fully read included).
            if let Some(v) = config::peek_version(&stdin).filter(|v| Version::parse(v).is_ok()) {
                e = e.in_version(&v);
            }
            tracing::error!(code = e.code, "{e}");
            let _ = writeln!(out, "{}", e.to_json());
            ExitCode::FAILURE
        }
    }
}
