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
