//! The chart's render-time checks agree with the rules the binaries apply at start, case by
//! case: `helm template` refuses exactly the pools `portslice_ports::Pool::new` refuses. Needs
//! helm (`PORTSLICE_E2E_HELM`, default the cached build), no cluster.
use std::path::PathBuf;
use std::process::Command;

use portslice_ports::{Pool, PortRange, parse_list};

fn helm() -> PathBuf {
    let helm = std::env::var_os("PORTSLICE_E2E_HELM").map_or_else(
        || {
            let cache =
                std::env::var("PORTSLICE_CACHE").unwrap_or_else(|_| "/var/cache/portslice".into());
            PathBuf::from(cache).join("bin/helm")
        },
        PathBuf::from,
    );
    assert!(
        helm.exists(),
        "{} is missing: run e2e/scripts/build-tools.sh helm",
        helm.display()
    );
    helm
}

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/portslice")
}

/// `helm template` with `pools` and the NodePort range: Ok(rendered) or Err(helm's message).
fn render(pools: &[&str], node_ports: &str) -> Result<String, String> {
    let mut cmd = Command::new(helm());
    cmd.arg("template").arg("t").arg(chart());
    for (i, p) in pools.iter().enumerate() {
        cmd.arg("--set-string").arg(format!("pools[{i}]={p}"));
    }
    cmd.arg("--set-string")
        .arg(format!("cluster.nodePortRange={node_ports}"));
    let out = cmd.output().expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn rule(pools: &[&str], node_ports: &str) -> Result<Pool, String> {
    let node_ports: PortRange = node_ports.parse().map_err(|e| format!("{e}"))?;
    let ranges = parse_list(&pools.join(",")).map_err(|e| e.to_string())?;
    Pool::new(ranges, node_ports).map_err(|e| e.to_string())
}

#[test]
fn helm_template_refuses_exactly_the_pools_the_binaries_refuse() {
    let cases: &[(&[&str], &str)] = &[
        (&["40000-59999"], "30000-32767"),
        (&["1024-29999", "32768-65535"], "30000-32767"),
        (&["40000-44999", "50000-54999"], "30000-32767"),
        (&["31000-40000"], "30000-32767"),
        (&["29999-30000"], "30000-32767"),
        (&["30000-32767"], "30000-32767"),
        (&["80-443"], "30000-32767"),
        (&["1023-2000"], "30000-32767"),
        (&["5-4"], "30000-32767"),
        (&["30000-32767"], "20000-20999"),
        (&["20500-21500"], "20000-20999"),
    ];
    for (pools, node_ports) in cases {
        let by_rule = rule(pools, node_ports);
        let by_chart = render(pools, node_ports);
        assert_eq!(
            by_rule.is_ok(),
            by_chart.is_ok(),
            "pools {pools:?} with NodePorts {node_ports}: rule says {by_rule:?}, chart says {:?}",
            by_chart.as_ref().map(|_| "rendered")
        );
        if let Ok(pool) = by_rule {
            let text = by_chart.unwrap();
            let flag = format!("--pool={}", pools.join(","));
            assert!(text.contains(&flag), "the operator gets {flag}");
            assert!(
                text.contains(&format!("value: \"{}\"", pools.join(","))),
                "the node daemon gets the same pool"
            );
            assert!(pool.port_count() > 0);
        }
    }
}

/// The chart installs (and upgrades) exactly the CRD the Rust types render, plus Helm's labels
/// and the keep policy; `helm template --set crds.install=false` leaves it out.
#[test]
fn the_chart_renders_exactly_the_generated_crd() {
    let out = Command::new(helm())
        .arg("template")
        .arg("t")
        .arg(chart())
        .args(["--show-only", "templates/crd.yaml"])
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rendered: serde_yaml::Value =
        serde_yaml::from_slice(&out.stdout).expect("the rendered CRD is YAML");
    let meta = rendered
        .get_mut("metadata")
        .and_then(serde_yaml::Value::as_mapping_mut)
        .expect("metadata");
    let annotations = meta.remove("annotations").expect("annotations");
    assert_eq!(annotations["helm.sh/resource-policy"], "keep");
    meta.remove("labels").expect("Helm's labels");
    let generated: serde_yaml::Value =
        serde_yaml::from_str(&portslice_crds::crd_yaml().expect("CRD renders")).expect("YAML");
    assert!(
        numbers_as_floats(rendered) == numbers_as_floats(generated),
        "charts/portslice/files is stale: run `make crds`"
    );
    let off = Command::new(helm())
        .arg("template")
        .arg("t")
        .arg(chart())
        .args(["--set", "crds.install=false"])
        .output()
        .expect("running helm");
    assert!(!String::from_utf8_lossy(&off.stdout).contains("kind: CustomResourceDefinition"));
}

/// Helm's toYaml writes `65535.0` as `65535`: the same number to the API server.
fn numbers_as_floats(v: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Number(n) => n
            .as_f64()
            .map_or(Value::Number(n), |f| Value::Number(f.into())),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(numbers_as_floats).collect()),
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .map(|(k, v)| (k, numbers_as_floats(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `helm template t charts/portslice` with `args`: Ok(rendered) or Err(helm's message).
fn template(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm())
        .arg("template")
        .arg("t")
        .arg(chart())
        .args(args)
        .output()
        .expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn kinds(rendered: &str) -> Vec<String> {
    rendered
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_string)
        .collect()
}

/// ServiceMonitor and PodMonitor appear only where the Prometheus Operator's API exists (as
/// `helm install` sees it in `.Capabilities`), unless forced on or off.
#[test]
fn monitors_render_only_where_the_prometheus_operator_api_exists() {
    let monitors = |args: &[&str]| {
        let k = kinds(&template(args).expect("renders"));
        (
            k.iter().any(|k| k == "ServiceMonitor"),
            k.iter().any(|k| k == "PodMonitor"),
        )
    };
    let api = "--api-versions=monitoring.coreos.com/v1";
    assert_eq!(monitors(&[]), (false, false), "no API, auto: none");
    assert_eq!(monitors(&[api]), (true, true), "API, auto: both");
    assert_eq!(
        monitors(&[
            api,
            "--set",
            "monitoring.serviceMonitor.enabled=false",
            "--set",
            "monitoring.podMonitor.enabled=false"
        ]),
        (false, false),
        "off wins over the API"
    );
    assert_eq!(
        monitors(&["--set", "monitoring.podMonitor.enabled=true"]),
        (false, true),
        "on without the API"
    );
    let pm = template(&[api, "--show-only", "templates/monitoring.yaml"]).unwrap();
    assert!(
        pm.contains("targetLabel: node"),
        "node series carry the node: {pm}"
    );
}

/// A value the chart does not know, or of the wrong type, is refused at install with the key
/// named, instead of being silently ignored.
#[test]
fn a_typo_in_values_is_refused_with_the_key_named() {
    for (set, want) in [
        ("node.uplnk=eth0", "uplnk"),
        ("operatr.replicas=1", "operatr"),
        ("node.ipDetection=dhcp", "ipDetection"),
        ("monitoring.podMonitor.enabled=maybe", "enabled"),
        ("cluster.podCIDRs[0]=10.244.0.0", "podCIDRs"),
    ] {
        let Err(err) = template(&["--set", set]) else {
            panic!("--set {set} was accepted");
        };
        assert!(err.contains(want), "--set {set}: {err}");
    }
    // Everything values.yaml documents passes its own schema, and so does the e2e suite's file.
    template(&[
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/values-e2e.yaml"),
    ])
    .expect("e2e/values-e2e.yaml fits the schema");
    template(&[
        "--set",
        "cluster.podCIDRs[0]=10.244.0.0/16",
        "--set",
        "cluster.serviceCIDRs[0]=fd00:10:96::/112",
    ])
    .expect("valid CIDRs");
}

/// The Grafana dashboard ships as a ConfigMap the sidecar loads (label `grafana_dashboard`),
/// holds valid dashboard JSON, and queries only `portslice_*` series. That each is one the
/// binaries export is checked against their real /metrics by the e2e suite.
#[test]
fn the_dashboard_ships_as_valid_json_for_the_grafana_sidecar() {
    let out = template(&["--show-only", "templates/monitoring.yaml"]).expect("renders");
    let cm: serde_yaml::Value = serde_yaml::from_str(&out).expect("one YAML document");
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = cm["data"]["portslice.json"].as_str().expect("dashboard");
    let names = portslice_e2e::metrics::dashboard_metrics(json).expect("a dashboard");
    for want in [
        "portslice_pool_used_ports",
        "portslice_pool_free_ports",
        "portslice_allocations_total",
        "portslice_reconcile_errors_total",
        "portslice_slice_rx_packets_total",
        "portslice_slice_tx_bytes_total",
        "portslice_slice_drops_total",
    ] {
        assert!(
            names.contains(want),
            "the dashboard shows {want}: {names:?}"
        );
    }
    let off = template(&["--set", "monitoring.dashboard.enabled=false"]).unwrap();
    assert!(!off.contains("grafana_dashboard"));
}
