//! The signature flags of the `node-agent` binary: accepted, and a configuration that would
//! refuse every bundle (or trust a broken key) stops the agent at start with the fix in the
//! message. Nothing here needs a cluster: the agent stops before (or at) the API client.

use std::{path::Path, process::Command, time::Duration};

fn agent(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
    cmd.args(["--node-name", "node-1", "--skip-preflight", "--metrics-addr", "127.0.0.1:0", "--log-format", "json"]).args(args);
    // No cluster: the API client fails at once after the flags are taken.
    cmd.env("KUBECONFIG", "/nonexistent/kubeconfig").env_remove("KUBERNETES_SERVICE_HOST").env_remove("KUBERNETES_SERVICE_PORT");
    cmd.env("HOME", "/nonexistent").env("RUST_LOG", "info");
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("node-agent {args:?} did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn key(dir: &Path) -> String {
    let (k, _, public) = livepatch::signature::write_keypair(&dir.join("release")).unwrap();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::copy(public, dir.join("keys/release.pub")).unwrap();
    livepatch::signature::key_id(&k.verifying_key())
}

#[test]
fn signature_flags() {
    let (_, help) = {
        let out = Command::new(env!("CARGO_BIN_EXE_node-agent")).arg("--help").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(help.contains("--trusted-keys-dir") && help.contains("--require-signature"), "{help}");

    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = agent(&["--require-signature"]);
    assert!(!ok && text.contains("--require-signature needs at least one trusted key"), "{text}");

    let missing = dir.path().join("nope");
    let (ok, text) = agent(&["--trusted-keys-dir", missing.to_str().unwrap()]);
    assert!(!ok && text.contains("--trusted-keys-dir: cannot read trusted keys"), "{text}");

    let id = key(dir.path());
    let keys = dir.path().join("keys");
    // Taken: the policy is logged with the key id, then the agent goes on to the API client
    // (which fails here: no cluster).
    let (ok, text) = agent(&["--trusted-keys-dir", keys.to_str().unwrap(), "--require-signature"]);
    assert!(!ok, "{text}");
    assert!(text.contains("bundle signatures") && text.contains(&id) && text.contains("\"required\":true"), "{text}");
    assert!(!text.contains("unexpected argument"), "{text}");

    std::fs::write(keys.join("broken.pub"), "AAAA\n").unwrap();
    let (ok, text) = agent(&["--trusted-keys-dir", keys.to_str().unwrap()]);
    assert!(!ok && text.contains("broken.pub"), "{text}");
}
