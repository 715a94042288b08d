//! Compiles the fixtures of the earlier releases' datapaths, kept verbatim as they shipped, so the
//! upgrade tests can run a real node of each and upgrade it:
//! - `bpf/layout1/`: the first release (datapath layout 1, pins straight under the root);
//! - `bpf/layout2/`: the release before dual stack (layout 2, IPv4-only config, fragment keys and
//!   echo slots, since renamed).
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    // Debian keeps asm/types.h under the multiarch directory.
    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    // The flags each shipped with (layout 2 needs BPF_FETCH atomics: -mcpu=v3).
    for (dir, extra) in [("layout1", None), ("layout2", Some("-mcpu=v3"))] {
        for f in ["portslice.bpf.c", "portslice_abi.h"] {
            println!("cargo:rerun-if-changed=bpf/{dir}/{f}");
        }
        let obj = out.join(format!("portslice_{dir}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-g", "-O2", "-Wall", "-Werror", "-target", "bpf"])
            .args(extra)
            .arg(format!("-I{multiarch}"))
            .arg("-c")
            .arg(format!("bpf/{dir}/portslice.bpf.c"))
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("running {clang} (apt-get install clang libbpf-dev): {e}"));
        assert!(
            status.success(),
            "{clang} failed to compile the {dir} fixture"
        );
    }
}
