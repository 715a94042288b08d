//! Compiles the fixture of the first release's datapath (`bpf/layout1/`, datapath layout 1,
//! kept verbatim as it shipped) so the upgrade tests can run a real layout-1 node and upgrade it.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("portslice_layout1.bpf.o");
    for f in ["bpf/layout1/portslice.bpf.c", "bpf/layout1/portslice_abi.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    // The flags it shipped with. Debian keeps asm/types.h under the multiarch directory.
    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    let status = Command::new(&clang)
        .args(["-g", "-O2", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg("bpf/layout1/portslice.bpf.c")
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("running {clang} (apt-get install clang libbpf-dev): {e}"));
    assert!(
        status.success(),
        "{clang} failed to compile the layout-1 fixture"
    );
}
