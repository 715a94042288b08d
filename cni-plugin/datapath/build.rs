//! Compiles the C eBPF programs with clang so the binary embeds exactly what the sources say.
//! The object lands in OUT_DIR and is embedded with `aya::include_bytes_aligned!`.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("portslice.bpf.o");
    for f in [
        "bpf/portslice.bpf.c",
        "bpf/portslice_abi.h",
        "bpf/maps.h",
        "bpf/parse.h",
        "bpf/frags.h",
        "bpf/icmp.h",
        "bpf/forward.h",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    // Debian keeps asm/types.h under the multiarch directory, which -target bpf does not search.
    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    // -mcpu=v3: atomics that return the old value (BPF_FETCH, kernel 5.12+) for the per-pod
    // fragment quota; clang's default CPU has only fire-and-forget adds.
    let status = Command::new(&clang)
        .args([
            "-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3",
        ])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg("bpf/portslice.bpf.c")
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("running {clang} (apt-get install clang libbpf-dev): {e}"));
    assert!(
        status.success(),
        "{clang} failed to compile bpf/portslice.bpf.c"
    );
}
