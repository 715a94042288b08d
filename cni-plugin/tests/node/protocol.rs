//! The CNI protocol at the process boundary: the built `portslice` binary invoked with an
//! environment and stdin, as a runtime does. Bad input gets the spec's error JSON on stdout, the
//! right code and a non-zero exit; logs go to stderr. No privileges needed.

use portslice_testkit::runtime::exec_plugin;
use serde_json::{Value, json};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn add_env() -> Vec<(String, String)> {
    env(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "proto-test"),
        ("CNI_NETNS", "/run/netns/does-not-exist"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ])
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "net", "type": "portslice", "nodeIP": "192.0.2.10",
           "pinRoot": "/sys/fs/bpf/portslice-no-such-root"})
}

/// stdout holds exactly one JSON document: the error.
fn assert_error(inv: &portslice_testkit::runtime::Invocation, code: u64, version: &str) {
    assert_ne!(inv.code, 0, "{inv:?}");
    let v: Value = serde_json::from_str(inv.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON doc ({e}): {inv:?}"));
    assert_eq!(v["code"], code, "{inv:?}");
    assert_eq!(v["cniVersion"], version, "{inv:?}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{inv:?}");
}

#[test]
fn version_reports_every_supported_version_in_the_callers_version() {
    let all = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    for v in all {
        let stdin = json!({"cniVersion": v}).to_string();
        let inv = exec_plugin(
            None,
            "portslice",
            &env(&[("CNI_COMMAND", "VERSION")]),
            &stdin,
        );
        assert!(inv.ok(), "{inv:?}");
        assert_eq!(
            inv.json(),
            json!({"cniVersion": v, "supportedVersions": all})
        );
    }
}

#[test]
fn malformed_json_is_code_6() {
    for stdin in ["", "{", "{\"cniVersion\": \"1.0.0\",", "[1,2"] {
        let inv = exec_plugin(None, "portslice", &add_env(), stdin);
        assert_error(&inv, 6, "1.1.0");
    }
}

#[test]
fn missing_or_bad_environment_is_code_4() {
    let stdin = conf("1.0.0").to_string();
    for drop in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let e: Vec<_> = add_env().into_iter().filter(|(k, _)| k != drop).collect();
        let inv = exec_plugin(None, "portslice", &e, &stdin);
        assert_error(&inv, 4, "1.0.0");
        assert!(
            inv.json()["msg"].as_str().unwrap().contains(drop),
            "{inv:?}"
        );
    }
    let mut e = add_env();
    e[0].1 = "FROB".into();
    assert_error(&exec_plugin(None, "portslice", &e, &stdin), 4, "1.0.0");
    let mut e = add_env();
    e.push(("CNI_ARGS".into(), "novalue".into()));
    assert_error(&exec_plugin(None, "portslice", &e, &stdin), 4, "1.0.0");
}

/// What a primary plugin hands on at `version` (ptp's shape).
fn prev_result(version: &str) -> Value {
    json!({"cniVersion": version,
           "interfaces": [{"name": "veth0"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
           "ips": [{"version": "4", "address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 1}],
           "routes": [{"dst": "0.0.0.0/0"}], "dns": {}, "unknownKey": [1, 2]})
}

/// ADD of a pod, with `args` as CNI_ARGS and the runtime's pod annotations.
fn add_pod(
    stdin: &Value,
    args: &str,
    annotations: Option<Value>,
) -> portslice_testkit::runtime::Invocation {
    let mut c = stdin.clone();
    if let Some(a) = annotations {
        c["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": a});
    }
    let mut e = add_env();
    e.push(("CNI_ARGS".into(), args.into()));
    exec_plugin(None, "portslice", &e, &c.to_string())
}

/// Configurations we cannot act on, each with the code a slice pod gets for it.
fn unusable_configs() -> Vec<(&'static str, Value, u64)> {
    let with_prev = |mut c: Value| {
        let v = c["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        c["prevResult"] = prev_result(&v);
        c
    };
    let mut no_node_ip = conf("0.3.1");
    no_node_ip.as_object_mut().unwrap().remove("nodeIP");
    let mut bad_cidr = conf("1.0.0");
    bad_cidr["clusterCIDRs"] = json!(["not-a-cidr"]);
    let mut bad_slices = conf("0.4.0");
    bad_slices["slices"] = json!({"x": "9-1"});
    vec![
        ("cniVersion 0.2.0", with_prev(conf("0.2.0")), 1),
        ("cniVersion 2.0.0", with_prev(conf("2.0.0")), 1),
        ("no nodeIP", with_prev(no_node_ip), 7),
        ("bad clusterCIDRs", with_prev(bad_cidr), 7),
        ("bad static slices", with_prev(bad_slices), 7),
    ]
}

#[test]
fn a_pod_without_a_slice_gets_prev_result_back_untouched_from_any_config() {
    for (what, stdin, _) in unusable_configs() {
        for annotations in [None, Some(json!({"app": "web"}))] {
            let inv = add_pod(
                &stdin,
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
                annotations.clone(),
            );
            assert!(inv.ok(), "{what}, annotations {annotations:?}: {inv:?}");
            assert_eq!(inv.json(), stdin["prevResult"], "{what}: untouched");
        }
    }
}

#[test]
fn a_slice_pod_fails_a_config_we_cannot_use_with_its_code() {
    for (what, stdin, code) in unusable_configs() {
        let version = stdin["cniVersion"].as_str().unwrap();
        let answer_in = if ["0.2.0", "2.0.0"].contains(&version) {
            "1.1.0"
        } else {
            version
        };
        let annotated = add_pod(&stdin, "", Some(json!({"portslice.io/slice": "media"})));
        assert_error(&annotated, code, answer_in);
        assert!(
            !annotated.stdout.contains("10.22.0.5"),
            "{what}: no result printed"
        );
        assert_error(
            &add_pod(&stdin, "PORTSLICE_RANGE=41000-41009", None),
            code,
            answer_in,
        );
        let mut network = stdin.clone();
        network["slice"] = json!("media");
        assert_error(&add_pod(&network, "", None), code, answer_in);
    }
}

#[test]
fn check_before_0_4_0_is_code_1() {
    for v in ["0.3.0", "0.3.1"] {
        let mut c = conf(v);
        c["prevResult"] = prev_result(v);
        let mut e = add_env();
        e[0].1 = "CHECK".into();
        assert_error(&exec_plugin(None, "portslice", &e, &c.to_string()), 1, v);
    }
}

#[test]
fn invalid_network_config_is_code_7_in_the_callers_version() {
    let mut c = conf("1.0.0");
    c["clusterCIDRs"] = json!(["not-a-cidr"]);
    let mut e = add_env();
    e[0].1 = "CHECK".into();
    let plain = exec_plugin(None, "portslice", &e, &c.to_string());
    assert!(
        plain.ok(),
        "CHECK of a pod in no slice passes a config we cannot use: {plain:?}"
    );
    e.push(("CNI_ARGS".into(), "PORTSLICE_RANGE=41000-41009".into()));
    assert_error(
        &exec_plugin(None, "portslice", &e, &c.to_string()),
        7,
        "1.0.0",
    );
    // A chained plugin's ADD without prevResult.
    for v in ["0.3.1", "1.0.0"] {
        assert_error(
            &exec_plugin(None, "portslice", &add_env(), &conf(v).to_string()),
            7,
            v,
        );
    }
}

#[test]
fn gc_and_status_need_1_1_0() {
    for verb in ["GC", "STATUS"] {
        let e = env(&[("CNI_COMMAND", verb), ("CNI_PATH", "/usr/lib/cni")]);
        assert_error(
            &exec_plugin(None, "portslice", &e, &conf("1.0.0").to_string()),
            1,
            "1.0.0",
        );
    }
}

#[test]
fn status_without_the_datapath_is_code_50_and_gc_without_it_is_a_no_op() {
    let e = env(&[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/usr/lib/cni")]);
    assert_error(
        &exec_plugin(None, "portslice", &e, &conf("1.1.0").to_string()),
        50,
        "1.1.0",
    );
    let mut c = conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([]);
    let e = env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")]);
    let inv = exec_plugin(None, "portslice", &e, &c.to_string());
    assert!(inv.ok() && inv.stdout.trim().is_empty(), "{inv:?}");
    // GC without the list is refused rather than treated as "nothing is valid".
    assert_error(
        &exec_plugin(None, "portslice", &e, &conf("1.1.0").to_string()),
        7,
        "1.1.0",
    );
}

#[test]
fn del_of_an_unknown_container_succeeds_without_output() {
    let e = env(&[
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "never-added"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]);
    for _ in 0..2 {
        let inv = exec_plugin(None, "portslice", &e, &conf("1.0.0").to_string());
        assert!(inv.ok() && inv.stdout.is_empty(), "{inv:?}");
    }
    // DEL reads nothing but our own state: it succeeds whatever the config says.
    for (what, stdin, _) in unusable_configs() {
        let inv = exec_plugin(None, "portslice", &e, &stdin.to_string());
        assert!(inv.ok() && inv.stdout.is_empty(), "{what}: {inv:?}");
    }
    let inv = exec_plugin(None, "portslice", &e, "not json");
    assert!(inv.ok() && inv.stdout.is_empty(), "{inv:?}");
}

#[test]
fn a_repeated_cni_args_key_is_code_4() {
    let mut c = conf("1.0.0");
    c["prevResult"] = prev_result("1.0.0");
    let mut e = add_env();
    e.push((
        "CNI_ARGS".into(),
        "PORTSLICE_RANGE=41000-41099;PORTSLICE_RANGE=1-2".into(),
    ));
    let inv = exec_plugin(None, "portslice", &e, &c.to_string());
    assert_error(&inv, 4, "1.0.0");
    assert!(
        inv.json()["msg"]
            .as_str()
            .unwrap()
            .contains("more than once"),
        "{inv:?}"
    );
}
