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
