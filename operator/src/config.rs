//! Configuration: command line flags, optionally on top of a YAML config file. A flag given on
//! the command line wins over the file, the file wins over the built-in default.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use portslice_crds::PortRange;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
}

/// Command line. Every option is optional here so that the config file can fill it in.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "portslice-operator",
    version,
    about = "Allocates cluster-unique port ranges to PortSlices"
)]
// A later flag replaces an earlier one (wrappers can append overrides); --pool accumulates.
#[command(args_override_self = true)]
pub struct Cli {
    /// YAML file with any of the options below (keys as in the flags, e.g. `pools: [40000-59999]`).
    #[arg(long, env = "PORTSLICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Port range to allocate from (repeatable), e.g. 40000-59999. NodePorts and ports below 1024
    /// are always left out. Default: 40000-59999.
    #[arg(long = "pool", value_name = "START-END")]
    pub pools: Vec<String>,
    /// How long a deleted slice's range stays reserved after its last pod is gone (e.g. 30s, 2m).
    #[arg(long)]
    pub quarantine: Option<String>,
    /// How often a slice that waits for space (pool exhausted, conflict) is retried even without
    /// a deletion that frees space.
    #[arg(long)]
    pub retry_interval: Option<String>,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Namespace of the leader election Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// Name of the leader election Lease.
    #[arg(long)]
    pub lease_name: Option<String>,
    /// How long the Lease is valid after the leader's last renewal, in seconds.
    #[arg(long)]
    pub lease_duration: Option<u64>,
    /// How long before the Lease expires the leader renews it, in seconds.
    #[arg(long)]
    pub lease_grace: Option<u64>,
    /// This replica's name in the Lease (default: $POD_NAME, else hostname-pid).
    #[arg(long)]
    pub identity: Option<String>,
    /// Watch only this namespace (tests, single-tenant setups). Default: all namespaces.
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Number of slices reconciled at the same time.
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Also emit a Normal Event for every allocation (Warnings for conflicts, exhaustion and
    /// invalid specs, and the Released event, are always emitted). Off by default: it is one
    /// more API write per slice, and the Allocated condition already says it.
    #[arg(long)]
    pub allocation_events: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    pools: Option<Vec<String>>,
    quarantine: Option<String>,
    retry_interval: Option<String>,
    metrics_addr: Option<SocketAddr>,
    lease_namespace: Option<String>,
    lease_name: Option<String>,
    lease_duration: Option<u64>,
    lease_grace: Option<u64>,
    identity: Option<String>,
    watch_namespace: Option<String>,
    concurrency: Option<u16>,
    log_format: Option<LogFormat>,
    allocation_events: Option<bool>,
}

#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub pools: Vec<PortRange>,
    pub quarantine: Duration,
    pub retry_interval: Duration,
    pub metrics_addr: SocketAddr,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: u64,
    pub lease_grace: u64,
    pub identity: String,
    pub watch_namespace: Option<String>,
    pub concurrency: u16,
    pub log_format: LogFormat,
    pub allocation_events: bool,
}

/// Facts from the environment, passed in so that resolution stays pure and testable.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub hostname: Option<String>,
    pub pid: u32,
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            pod_namespace: std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty()),
            pod_name: std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string()),
            pid: std::process::id(),
        }
    }
}

impl Config {
    /// Loads the config file named on the command line (if any) and resolves everything.
    pub fn load(cli: Cli, env: &Env) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(cli, file_from(file), env)
    }

    fn resolve(cli: Cli, file: Cli, env: &Env) -> Result<Self, ConfigError> {
        let pools = if !cli.pools.is_empty() {
            cli.pools
        } else if !file.pools.is_empty() {
            file.pools
        } else {
            vec!["40000-59999".to_string()]
        };
        let pools = pools
            .iter()
            .map(|p| {
                p.parse::<PortRange>().map_err(|e| ConfigError::Invalid {
                    what: "pool",
                    value: p.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        crate::allocator::normalize(&pools).map_err(|e| ConfigError::Invalid {
            what: "pool",
            value: format!("{pools:?}"),
            reason: e.to_string(),
        })?;
        let quarantine = parse_duration(
            &cli.quarantine
                .or(file.quarantine)
                .unwrap_or_else(|| "30s".into()),
        )?;
        let retry_interval = parse_duration(
            &cli.retry_interval
                .or(file.retry_interval)
                .unwrap_or_else(|| "30s".into()),
        )?;
        let lease_duration = cli.lease_duration.or(file.lease_duration).unwrap_or(15);
        let lease_grace = cli.lease_grace.or(file.lease_grace).unwrap_or(5);
        if lease_grace == 0 || lease_grace >= lease_duration {
            return Err(ConfigError::Invalid {
                what: "lease grace",
                value: lease_grace.to_string(),
                reason: format!(
                    "must be at least 1 and below the lease duration ({lease_duration}s)"
                ),
            });
        }
        let identity = cli
            .identity
            .or(file.identity)
            .or_else(|| env.pod_name.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    env.hostname.as_deref().unwrap_or("portslice-operator"),
                    env.pid
                )
            });
        Ok(Self {
            pools,
            quarantine,
            retry_interval,
            metrics_addr: cli
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            lease_namespace: cli
                .lease_namespace
                .or(file.lease_namespace)
                .or_else(|| env.pod_namespace.clone())
                .unwrap_or_else(|| "default".into()),
            lease_name: cli
                .lease_name
                .or(file.lease_name)
                .unwrap_or_else(|| "portslice-operator".into()),
            lease_duration,
            lease_grace,
            identity,
            watch_namespace: cli.watch_namespace.or(file.watch_namespace),
            concurrency: cli.concurrency.or(file.concurrency).unwrap_or(32).max(1),
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            allocation_events: cli
                .allocation_events
                .or(file.allocation_events)
                .unwrap_or(false),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_file(text: &str) -> Result<FileConfig, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(text)
}

fn file_from(f: FileConfig) -> Cli {
    Cli {
        config: None,
        pools: f.pools.unwrap_or_default(),
        quarantine: f.quarantine,
        retry_interval: f.retry_interval,
        metrics_addr: f.metrics_addr,
        lease_namespace: f.lease_namespace,
        lease_name: f.lease_name,
        lease_duration: f.lease_duration,
        lease_grace: f.lease_grace,
        identity: f.identity,
        watch_namespace: f.watch_namespace,
        concurrency: f.concurrency,
        log_format: f.log_format,
        allocation_events: f.allocation_events,
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        what: "duration",
        value: s.to_string(),
        reason: reason.into(),
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| invalid("expected a number followed by ms, s, m or h"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(invalid("unit must be ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| invalid("too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            hostname: Some("node1".into()),
            pid: 7,
            ..Env::default()
        }
    }

    #[test]
    fn defaults_are_sane() {
        let c = Config::resolve(Cli::default(), Cli::default(), &env()).unwrap();
        assert_eq!(
            c.pools,
            vec![PortRange {
                start: 40000,
                end: 59999
            }]
        );
        assert_eq!(c.quarantine, Duration::from_secs(30));
        assert_eq!(c.lease_namespace, "default");
        assert_eq!(c.identity, "node1-7");
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn command_line_wins_over_file_wins_over_default() {
        let file = file_from(
            parse_file(
                "pools: [\"20000-20999\"]\nquarantine: 2m\nleaseName: from-file\nlogFormat: json\n",
            )
            .unwrap(),
        );
        let cli = Cli {
            quarantine: Some("500ms".into()),
            ..Cli::default()
        };
        let c = Config::resolve(cli, file, &env()).unwrap();
        assert_eq!(
            c.pools,
            vec![PortRange {
                start: 20000,
                end: 20999
            }]
        );
        assert_eq!(c.quarantine, Duration::from_millis(500));
        assert_eq!(c.lease_name, "from-file");
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn pod_identity_comes_from_the_downward_api() {
        let env = Env {
            pod_name: Some("op-0".into()),
            pod_namespace: Some("portslice".into()),
            ..env()
        };
        let c = Config::resolve(Cli::default(), Cli::default(), &env).unwrap();
        assert_eq!(
            (c.identity.as_str(), c.lease_namespace.as_str()),
            ("op-0", "portslice")
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_value_in_the_message() {
        let cli = Cli {
            pools: vec!["30000-32767".into()],
            ..Cli::default()
        };
        assert!(
            Config::resolve(cli, Cli::default(), &env())
                .unwrap_err()
                .to_string()
                .contains("NodePort")
        );
        let cli = Cli {
            pools: vec!["5-4".into()],
            ..Cli::default()
        };
        assert!(
            Config::resolve(cli, Cli::default(), &env())
                .unwrap_err()
                .to_string()
                .contains("5-4")
        );
        let cli = Cli {
            lease_duration: Some(5),
            lease_grace: Some(5),
            ..Cli::default()
        };
        assert!(Config::resolve(cli, Cli::default(), &env()).is_err());
        assert!(parse_file("pool: [1]").is_err(), "unknown keys are refused");
    }

    #[test]
    fn pools_accumulate_and_later_flags_win() {
        let cli = Cli::parse_from([
            "op",
            "--pool",
            "40000-40999",
            "--quarantine",
            "5s",
            "--pool",
            "50000-50999",
            "--quarantine",
            "1s",
        ]);
        let c = Config::resolve(cli, Cli::default(), &env()).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.quarantine, Duration::from_secs(1));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
    }
}
