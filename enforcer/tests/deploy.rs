//! The Kubernetes manifests (deploy/kubernetes): valid against the Kubernetes API schemas (kubernetes-validate, which
//! bundles them, so this runs offline), the ConfigMap's configuration and policy load as the daemon loads them, and
//! the DaemonSet grants exactly the capabilities of the packaged systemd unit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files = manifests();
    assert_eq!(files.len(), 3, "{files:?}");
    let out = Command::new("/opt/enforcer-test/venv/bin/kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("kubernetes-validate (installed by cargo xtask setup): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 3, "{text}");
}

#[test]
fn the_configmap_holds_a_configuration_and_policy_the_daemon_loads() {
    let cm = yaml(&deploy_dir().join("configmap.yaml"));
    let config = cm["data"]["enforcer.yaml"]
        .as_str()
        .expect("data.enforcer.yaml");
    let config: enforcer::config::Config =
        serde_saphyr::from_str(config).unwrap_or_else(|e| panic!("enforcer.yaml: {e}"));
    assert_eq!(
        config.policy.as_deref(),
        Some(Path::new("/etc/enforcer/policy.yaml"))
    );
    assert_eq!(config.cgroup_root, Path::new("/sys/fs/cgroup"));
    assert!(config.profiles.contains_key("agents"));
    let policy = cm["data"]["policy.yaml"]
        .as_str()
        .expect("data.policy.yaml");
    enforcer::policy::Policy::from_yaml(policy, "configmap policy.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_daemonset_grants_the_units_capabilities() {
    let ds = yaml(&deploy_dir().join("daemonset.yaml"));
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    let added: Vec<String> = caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(|c| c.as_str())
        .map(|c| format!("CAP_{c}"))
        .collect();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/enforcer.service"),
    )
    .expect("unit");
    let granted: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet=")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(added, granted);
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(ds["spec"]["template"]["spec"]["hostPID"], true);
}
