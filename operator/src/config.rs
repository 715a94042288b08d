//! Configuration: command line flags, optionally on top of a YAML config file. A flag given on
//! the command line wins over the file, the file wins over the built-in default.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use portslice_ports::{
    DEFAULT_API_SERVER_PORT, DEFAULT_DAEMON_PORT, DEFAULT_NODE_PORT_RANGE, NodeCritical, Pool,
    PortRange, RangeSet, parse_list,
};

use crate::policy::{Policy, Quotas, ReservationRule};
use serde::{Deserialize, Serialize};

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

/// Every option of the operator, declared once: clap reads it from the command line (and the
/// environment where noted), serde from the config file under the same name in camelCase
/// (`--lease-name` is `leaseName`). Every field is optional so that [`Options::over`] can lay the
/// command line over the file; [`Config::resolve`] fills in the defaults.
#[derive(Parser, Serialize, Deserialize, Debug, Default, Clone)]
#[command(
    name = "portslice-operator",
    version,
    about = "Allocates cluster-unique port ranges to PortSlices"
)]
// A later flag replaces an earlier one (wrappers can append overrides); --pool accumulates.
#[command(args_override_self = true)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Options {
    /// YAML file with any of the options below (keys as in the flags, e.g. `pools: [40000-59999]`).
    #[arg(long, env = "PORTSLICE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Port ranges to allocate from, comma-separated and/or repeated, e.g. 40000-49999,50000-54999.
    /// A range in the NodePort range or below 1024 is refused. Default: 40000-59999.
    #[arg(long = "pool", value_name = "START-END[,...]", value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
    /// The cluster's NodePort range (kube-apiserver --service-node-port-range). Default:
    /// 30000-32767.
    #[arg(long, value_name = "START-END")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port_range: Option<String>,
    /// The API server's port on the nodes (its --secure-port): never held by a slice.
    /// Default: 6443.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server_port: Option<u16>,
    /// The PortSlice node daemon's ports (metrics and health; TCPMUX when served), never held by
    /// a slice. Default: 9465.
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemon_ports: Vec<u16>,
    /// Exact ports namespaces may reserve (file only): `[{ports: "5060-5061", protocols: [UDP,
    /// TCP], namespaces: [voice]}]`. Without a rule, no namespace may reserve exact ports.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<ReservationRule>,
    /// Per-namespace caps (file only): `{default: {ports: 10000, slices: 20}, namespaces: {voice:
    /// {ports: 2000}}}`. Default: none.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    /// How long a deleted slice's range stays reserved after its last pod is gone (e.g. 30s, 2m).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// How often a slice that waits for space (pool exhausted, conflict) is retried even without
    /// a deletion that frees space.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_interval: Option<String>,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Namespace of the leader election Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_namespace: Option<String>,
    /// Name of the leader election Lease.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    /// How long the Lease is valid after the leader's last renewal, in seconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_duration: Option<u64>,
    /// How long before the Lease expires the leader renews it, in seconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_grace: Option<u64>,
    /// This replica's name in the Lease (default: $POD_NAME, else hostname-pid).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Watch only this namespace (tests, single-tenant setups). Default: all namespaces.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_namespace: Option<String>,
    /// Number of slices reconciled at the same time.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u16>,
    /// Log format: text or json.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Also emit a Normal Event for every allocation (Warnings for conflicts, exhaustion and
    /// invalid specs, and the Released event, are always emitted). Off by default: it is one
    /// more API write per slice, and the Allocated condition already says it.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_events: Option<bool>,
    /// Publish every allocated slice as a ConfigMap (`envFrom`), a headless Service and an
    /// EndpointSlice (DNS A and SRV records). On by default.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<bool>,
}

impl Options {
    /// These options laid over `lower`: every option set here replaces `lower`'s. Generic over
    /// the fields (unset ones are not serialized), so a new option needs no code here.
    pub fn over(self, lower: Options) -> Options {
        let config = self.config.clone().or(lower.config.clone());
        let mut merged = serde_json::to_value(&lower).unwrap_or_default();
        if let (serde_json::Value::Object(base), Ok(serde_json::Value::Object(top))) =
            (&mut merged, serde_json::to_value(&self))
        {
            base.extend(top);
        }
        let mut out: Options = serde_json::from_value(merged).unwrap_or(self);
        out.config = config;
        out
    }
}

#[derive(clap::ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub pool: Pool,
    /// The pool less the node-critical ports: where `size` requests are served from.
    pub allocatable: RangeSet,
    pub node_port_range: PortRange,
    pub policy: Policy,
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
    pub publish: bool,
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
    /// Loads the config file named on the command line (if any), lays the command line over it
    /// and resolves everything.
    pub fn load(cli: Options, env: &Env) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Options::default(),
        };
        Self::resolve(cli.over(file), env)
    }

    fn resolve(o: Options, env: &Env) -> Result<Self, ConfigError> {
        let invalid = |what: &'static str, value: String, reason: String| ConfigError::Invalid {
            what,
            value,
            reason,
        };
        let node_port_range = match &o.node_port_range {
            Some(text) => text
                .parse::<PortRange>()
                .map_err(|e| invalid("NodePort range", text.clone(), e.to_string()))?,
            None => DEFAULT_NODE_PORT_RANGE,
        };
        let pool_text = if o.pools.is_empty() {
            "40000-59999".to_string()
        } else {
            o.pools.join(",")
        };
        let ranges = parse_list(&pool_text)
            .map_err(|e| invalid("pool", pool_text.clone(), e.to_string()))?;
        let pool = Pool::new(ranges, node_port_range)
            .map_err(|e| invalid("pool", pool_text.clone(), e.to_string()))?;
        let daemon_ports = if o.daemon_ports.is_empty() {
            vec![DEFAULT_DAEMON_PORT]
        } else {
            o.daemon_ports.clone()
        };
        let critical = NodeCritical::new(
            o.api_server_port.unwrap_or(DEFAULT_API_SERVER_PORT),
            node_port_range,
            &daemon_ports,
        );
        let allocatable = pool.allocatable(&critical);
        let policy = Policy::new(
            critical,
            &o.reservations,
            o.quotas.clone().unwrap_or_default(),
        )
        .map_err(|e| invalid("reservations", String::new(), e.to_string()))?;
        let quarantine = parse_duration(o.quarantine.as_deref().unwrap_or("30s"))?;
        let retry_interval = parse_duration(o.retry_interval.as_deref().unwrap_or("30s"))?;
        let lease_duration = o.lease_duration.unwrap_or(15);
        let lease_grace = o.lease_grace.unwrap_or(5);
        if lease_grace == 0 || lease_grace >= lease_duration {
            return Err(invalid(
                "lease grace",
                lease_grace.to_string(),
                format!("must be at least 1 and below the lease duration ({lease_duration}s)"),
            ));
        }
        let identity = o
            .identity
            .or_else(|| env.pod_name.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    env.hostname.as_deref().unwrap_or("portslice-operator"),
                    env.pid
                )
            });
        Ok(Self {
            pool,
            allocatable,
            node_port_range,
            policy,
            quarantine,
            retry_interval,
            metrics_addr: o
                .metrics_addr
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            lease_namespace: o
                .lease_namespace
                .or_else(|| env.pod_namespace.clone())
                .unwrap_or_else(|| "default".into()),
            lease_name: o.lease_name.unwrap_or_else(|| "portslice-operator".into()),
            lease_duration,
            lease_grace,
            identity,
            watch_namespace: o.watch_namespace,
            concurrency: o.concurrency.unwrap_or(32).max(1),
            log_format: o.log_format.unwrap_or_default(),
            allocation_events: o.allocation_events.unwrap_or(false),
            publish: o.publish.unwrap_or(true),
        })
    }
}

fn read_file(path: &Path) -> Result<Options, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_file(text: &str) -> Result<Options, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(Options::default());
    }
    serde_yaml::from_str(text)
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

    fn resolve(cli: Options, file: Options) -> Result<Config, ConfigError> {
        Config::resolve(cli.over(file), &env())
    }

    #[test]
    fn defaults_are_sane() {
        let c = resolve(Options::default(), Options::default()).unwrap();
        assert_eq!(c.pool.to_string(), "40000-59999");
        assert_eq!(c.node_port_range, DEFAULT_NODE_PORT_RANGE);
        assert_eq!(c.quarantine, Duration::from_secs(30));
        assert_eq!(c.lease_namespace, "default");
        assert_eq!(c.identity, "node1-7");
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn command_line_wins_over_file_wins_over_default() {
        let file = parse_file(
            "pools: [\"20000-20999\"]\nquarantine: 2m\nleaseName: from-file\nlogFormat: json\nconcurrency: 3\n",
        )
        .unwrap();
        let cli = Options::parse_from(["op", "--quarantine", "500ms", "--concurrency", "9"]);
        let c = resolve(cli, file.clone()).unwrap();
        assert_eq!(c.pool.to_string(), "20000-20999");
        assert_eq!(c.quarantine, Duration::from_millis(500));
        assert_eq!(c.lease_name, "from-file");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.concurrency, 9);
        let cli = Options::parse_from(["op", "--pool", "50000-50999"]);
        assert_eq!(
            resolve(cli, file).unwrap().pool.to_string(),
            "50000-50999",
            "the command line's pools replace the file's"
        );
    }

    #[test]
    fn the_policy_comes_from_the_file_and_the_ports_from_flags() {
        let file = parse_file(
            "pools: [\"1024-29999\"]\nreservations:\n- {ports: \"5060-5061\", namespaces: [voice]}\nquotas:\n  default: {ports: 100}\n  namespaces: {voice: {slices: 3}}\n",
        )
        .unwrap();
        let cli = Options::parse_from([
            "op",
            "--api-server-port",
            "16443",
            "--daemon-ports",
            "9465,1",
        ]);
        let c = resolve(cli, file).unwrap();
        use portslice_ports::Protocol;
        assert!(
            c.policy
                .check_reservation("voice", &"5060".parse().unwrap(), &[Protocol::UDP])
                .is_ok()
        );
        assert!(
            c.policy
                .check_reservation("web", &"5060".parse().unwrap(), &[Protocol::UDP])
                .is_err()
        );
        assert!(
            c.policy
                .check_reservation("voice", &"16443".parse().unwrap(), &[Protocol::TCP])
                .is_err()
        );
        assert_eq!(c.policy.quotas().for_namespace("web").ports, Some(100));
        assert!(
            !c.allocatable.contains(2379)
                && !c.allocatable.contains(16443)
                && c.allocatable.contains(6443)
        );
        assert!(
            parse_file("reservations: [{ports: 5060, namespace: [x]}]").is_err(),
            "typos are refused"
        );
    }

    #[test]
    fn pod_identity_comes_from_the_downward_api() {
        let env = Env {
            pod_name: Some("op-0".into()),
            pod_namespace: Some("portslice".into()),
            ..env()
        };
        let c = Config::resolve(Options::default(), &env).unwrap();
        assert_eq!(
            (c.identity.as_str(), c.lease_namespace.as_str()),
            ("op-0", "portslice")
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_value_in_the_message() {
        let refused = |args: &[&str]| {
            let mut argv = vec!["op"];
            argv.extend_from_slice(args);
            resolve(Options::parse_from(argv), Options::default())
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&["--pool", "30000-32767"]).contains("NodePort"));
        assert!(refused(&["--pool", "80-443"]).contains("below 1024"));
        assert!(refused(&["--pool", "5-4"]).contains("5-4"));
        assert!(
            refused(&["--pool", "40000-40999", "--node-port-range", "40500-40600"])
                .contains("NodePort")
        );
        assert!(refused(&["--lease-duration", "5", "--lease-grace", "5"]).contains("lease grace"));
        assert!(parse_file("pool: [1]").is_err(), "unknown keys are refused");
    }

    #[test]
    fn pools_take_commas_and_repeats_and_later_flags_win() {
        let cli = Options::parse_from([
            "op",
            "--pool",
            "40000-40999,42000-42999",
            "--quarantine",
            "5s",
            "--pool",
            "50000-50999",
            "--quarantine",
            "1s",
        ]);
        let c = Config::resolve(cli, &env()).unwrap();
        assert_eq!(c.pool.to_string(), "40000-40999,42000-42999,50000-50999");
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
