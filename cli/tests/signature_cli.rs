//! `livepatch keygen`, `sign` and `verify` end to end through the binary: a good signature
//! exits 0; another key, a tampered bundle, a garbage signature and an untrusted key exit 1 with
//! the reason; keys are never overwritten and the private key is mode 0600.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

fn lp(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_livepatch")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn bundle(path: &Path) {
    let manifest: livepatch::bundle::Manifest = serde_json::from_value(serde_json::json!({
        "format_version": 1, "arch": "x86_64",
        "target": {"build_id": "ab", "path": null, "pie": true},
        "new_build_id": null, "created_at": 0, "reference_source": "decoded",
        "span": {"lo": 4096, "len": 4096},
        "pieces": [{"name": "price", "kind": "code", "svma": 4096, "len": 16, "blob": 0}],
        "functions": [{"name": "price", "kind": "changed", "old_svma": 8192, "old_size": 16, "old_digest": "00", "new_svma": 4096, "new_size": 16}],
        "fixups": [], "changed_data": []
    }))
    .unwrap();
    fs::write(path, livepatch::bundle::Bundle::to_bytes(&manifest, &[0x90; 16])).unwrap();
}

#[test]
fn keygen_sign_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    bundle(Path::new(&d("fix.lpatch")));

    let (code, out) = lp(&["keygen", "--out", &d("release")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("key id") && out.contains("public key"), "{out}");
    assert_eq!(fs::metadata(d("release.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let (code, out) = lp(&["keygen", "--out", &d("release")]);
    assert!(code != 0 && out.contains("refusing to overwrite"), "{out}");
    assert_eq!(lp(&["keygen", "--out", &d("other")]).0, 0);
    fs::create_dir(d("trusted")).unwrap();
    fs::copy(d("release.pub"), d("trusted/release.pub")).unwrap();

    // Good: BUNDLE.sig by default, verified against a directory or a file.
    let (code, out) = lp(&["sign", &d("fix.lpatch"), "--key", &d("release.key")]);
    assert_eq!(code, 0, "{out}");
    let sig = fs::read_to_string(d("fix.lpatch.sig")).unwrap();
    assert!(sig.starts_with("livepatch-signature v1\nalgorithm: ed25519\nkey-id: "), "{sig}");
    for trusted in [d("trusted"), d("release.pub")] {
        let (code, out) = lp(&["verify", &d("fix.lpatch"), "--sig", &d("fix.lpatch.sig"), "--trusted", &trusted]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("good signature"), "{out}");
    }

    // Wrong key: signed by `other` under the trusted key's id.
    assert_eq!(lp(&["sign", &d("fix.lpatch"), "--key", &d("other.key"), "-o", &d("other.sig")]).0, 0);
    let other_id = fs::read_to_string(d("other.sig")).unwrap().lines().find_map(|l| l.strip_prefix("key-id: ").map(String::from)).unwrap();
    let release_id = sig.lines().find_map(|l| l.strip_prefix("key-id: ")).unwrap();
    fs::write(d("forged.sig"), fs::read_to_string(d("other.sig")).unwrap().replace(&other_id, release_id)).unwrap();
    let (code, out) = lp(&["verify", &d("fix.lpatch"), "--sig", &d("forged.sig"), "--trusted", &d("trusted")]);
    assert!(code == 1 && out.contains("does not verify with trusted key"), "{out}");
    // Untrusted key.
    let (code, out) = lp(&["verify", &d("fix.lpatch"), "--sig", &d("other.sig"), "--trusted", &d("trusted")]);
    assert!(code == 1 && out.contains("not a trusted key"), "{out}");
    // Tampered bundle.
    let mut bytes = fs::read(d("fix.lpatch")).unwrap();
    bytes[30] ^= 1;
    fs::write(d("tampered.lpatch"), &bytes).unwrap();
    let (code, out) = lp(&["verify", &d("tampered.lpatch"), "--sig", &d("fix.lpatch.sig"), "--trusted", &d("trusted")]);
    assert!(code == 1 && out.contains("for another bundle"), "{out}");
    // Garbage signature.
    fs::write(d("garbage.sig"), "hello\n").unwrap();
    let (code, out) = lp(&["verify", &d("fix.lpatch"), "--sig", &d("garbage.sig"), "--trusted", &d("trusted")]);
    assert!(code == 1 && out.contains("malformed signature"), "{out}");
    // Signing something that is not a bundle is refused.
    fs::write(d("not-a-bundle"), "text").unwrap();
    assert_ne!(lp(&["sign", &d("not-a-bundle"), "--key", &d("release.key")]).0, 0);
}
