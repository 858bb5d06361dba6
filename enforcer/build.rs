//! Builds the kernel programs (`enforcer-ebpf`) for the BPF target with aya-build and leaves the object in
//! `OUT_DIR/enforcer`, which `capture` embeds. Stable rustc needs `-Z build-std=core` for `bpfel-unknown-none`:
//! `RUSTC_BOOTSTRAP=1` is set here, for the nested cargo only, so host crates keep their fingerprints.
//!
//! The object does not depend on the host profile or features, but aya-build builds it inside `OUT_DIR`, which is
//! new for every profile and feature set (`cargo build`, `cargo test`, the release daemon, the fuzz build): each
//! would spend minutes building the same object again. So a built object is kept under
//! `target/ebpf-cache/<key>/enforcer` of the workspace, keyed by everything it is built from (the two crates' files, `Cargo.lock`,
//! the toolchain and bpf-linker versions, the target), and copied from there when the key matches.

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("enforcer crate has no parent directory"))?;
    let ebpf_dir = workspace.join("enforcer-ebpf");
    let common_dir = workspace.join("enforcer-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("enforcer");
    let cached = workspace
        .join("target/ebpf-cache")
        .join(format!(
            "{:016x}",
            key(workspace, &[&ebpf_dir, &common_dir])?
        ))
        .join("enforcer");
    if cached.is_file() {
        std::fs::copy(&cached, &out)?;
        return Ok(());
    }
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
    )?;
    // Into the cache under a temporary name, then renamed: a concurrent build sees the whole object or none.
    let dir = cached.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir)?;
    let partial = dir.join(format!("enforcer.{}", std::process::id()));
    std::fs::copy(&out, &partial)?;
    std::fs::rename(&partial, &cached)?;
    Ok(())
}

/// What the object is built from: every file of `dirs` (path and contents, in a fixed order), `Cargo.lock`, the
/// versions of the toolchain the nested cargo runs (`rustup run stable`) and of bpf-linker, and the target.
fn key(workspace: &Path, dirs: &[&Path]) -> anyhow::Result<u64> {
    let mut h = DefaultHasher::new();
    let mut files = Vec::new();
    for dir in dirs {
        walk(dir, &mut files)?;
    }
    files.sort();
    files.push(workspace.join("Cargo.lock"));
    for f in &files {
        h.write(
            f.strip_prefix(workspace)
                .unwrap_or(f)
                .as_os_str()
                .as_encoded_bytes(),
        );
        h.write(&std::fs::read(f)?);
    }
    let version = |cmd: &mut Command| cmd.output().map(|o| o.stdout).unwrap_or_default();
    h.write(&version(
        Command::new("rustup").args(["run", "stable", "rustc", "-vV"]),
    ));
    h.write(&version(Command::new("bpf-linker").arg("--version")));
    for var in ["CARGO_CFG_TARGET_ENDIAN", "CARGO_CFG_TARGET_ARCH"] {
        h.write(std::env::var(var).unwrap_or_default().as_bytes());
    }
    Ok(h.finish())
}

/// Every file under `dir`, skipping `target` directories.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name() != Some("target".as_ref()) {
                walk(&path, files)?;
            }
        } else {
            files.push(path);
        }
    }
    Ok(())
}
