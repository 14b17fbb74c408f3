//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or an empty placeholder so that
//! `cargo build`/`cargo test` of the userspace crates work without the eBPF toolchain (the
//! agent then says how to build the object when asked to trace).
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let obj = env::var_os("H2TRACE_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../h2trace-ebpf/target/bpfel-unknown-none/release/h2trace")
        });
    println!("cargo:rerun-if-env-changed=H2TRACE_EBPF_OBJ");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("h2trace.bpf.o");
    match fs::read(&obj) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: embedding a placeholder (run `cargo xtask build-ebpf`)",
                obj.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
