//! The checked-in CRD YAML must be exactly what the Rust types render, so the types stay the single
//! source of truth. Regenerate with `make crds`.
use std::path::Path;

#[test]
fn checked_in_crd_yaml_matches_the_rust_types() {
    let expected = portslice_crds::crd_yaml().expect("CRD renders as YAML");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for path in [
        "crds/portslice.io_portslices.yaml",
        "charts/portslice/files/portslice.io_portslices.yaml",
    ] {
        let file = root.join(path);
        let Ok(actual) = std::fs::read_to_string(&file) else {
            // The chart copy appears with the chart; the crds/ copy must always exist.
            assert!(
                path.starts_with("charts/"),
                "{} is missing: run `make crds`",
                file.display()
            );
            continue;
        };
        assert!(
            actual == expected,
            "{path} is stale: run `make crds` and commit the result"
        );
    }
}

#[test]
fn crd_carries_the_cel_rules_users_rely_on() {
    let yaml = portslice_crds::crd_yaml().expect("CRD renders as YAML");
    for rule in [
        "has(self.size) != has(self.ports)",
        "self.start <= self.end",
        "self.spec.?size == oldSelf.spec.?size",
        "self.spec.protocols == oldSelf.spec.protocols",
        "isCIDR(c)",
    ] {
        assert!(yaml.contains(rule), "CRD lacks CEL rule {rule:?}");
    }
}
