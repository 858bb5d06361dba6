//! Builds the kernel programs (`enforcer-ebpf`) for the BPF target with aya-build and leaves the object in
//! `OUT_DIR/enforcer`, which `capture` embeds. Stable rustc needs `-Z build-std=core` for `bpfel-unknown-none`:
//! `RUSTC_BOOTSTRAP=1` is set here, for the nested cargo only, so host crates keep their fingerprints.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("enforcer crate has no parent directory"))?;
    let ebpf_dir = workspace.join("enforcer-ebpf");
    let common_dir = workspace.join("enforcer-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // The nested cargo inherits this process's environment only.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path to enforcer-ebpf"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "enforcer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
